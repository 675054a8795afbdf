"""FlexIPPipeline: Stable Diffusion 1.5 with FlexIP's gated preservation and personalization adapters."""
from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from flexip_core.generation.adapters import FlexIPAdapter, ImageFeatures
from flexip_core.generation.attention import BranchInputs, install_processors, pick_backend
from flexip_core.generation.devices import LowVRAM, SafeVaeDecoder, apply_low_vram, reports_out_of_memory
from flexip_core.generation.encoders import SubjectEmbedding, SubjectEncoder
from flexip_core.generation.gate import GateSchedule, as_schedule, check_unit
from flexip_core.generation.preview import latents_to_previews
from flexip_core.generation.schedulers import make_scheduler
from flexip_core.loading.profiles import Defaults, Profile

logger = logging.getLogger(__name__)

MAX_BATCH = 16  # most images (gate values) in one call
MAX_STEPS = 500  # more denoising steps than this is refused as absurd
MAX_SEED = 2**63 - 1


def check_settings(strength, num_inference_steps, guidance_scale, height, width, seed, max_side: int) -> None:
    """The numbers of a generation, checked without any model: the pipeline checks every call with it, and the
    command lines before they load weights (a bad --size must not wait for gigabytes to load)."""
    check_unit(strength, "strength", high=2.0)
    if not isinstance(num_inference_steps, (int, np.integer)) or not 1 <= num_inference_steps <= MAX_STEPS:
        raise ValueError(f"num_inference_steps must be a whole number from 1 to {MAX_STEPS}, "
                         f"got {num_inference_steps!r}")
    if (not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale)
            or not 0 <= guidance_scale <= 50):
        raise ValueError(f"guidance_scale must be a number from 0 to 50, got {guidance_scale!r}")
    for label, side in (("height", height), ("width", width)):
        if not isinstance(side, (int, np.integer)) or side % 8 or not 64 <= side <= max_side:
            raise ValueError(f"{label} must be a multiple of 8 from 64 to {max_side}, got {side!r}")
    if not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be a whole number from 0 to 2**63-1, got {seed!r}")


class GenerationCancelled(Exception):
    """Raised by a callback to stop a generation; propagates out of the pipeline call."""


@dataclass
class FlexIPOutput:
    images: list[Image.Image]  # one per gate value (or branch-weight pair)
    parameters: list[dict]  # settings used for each image (what the PNG `parameters` chunk records)
    arrays: np.ndarray | None = None  # (N, H, W, 3) floats in [0, 1] when output_type="np"
    warnings: list[str] = field(default_factory=list)  # non-fatal notes, e.g. a truncated prompt
    kv_projections: int = 0  # key/value projections computed during the run (cached ones are not recounted)


class FlexIPPipeline:
    """Components of a SD1.5 pipeline, the subject encoder and the FlexIP adapter; one __call__."""

    def __init__(self, *, unet, vae, text_encoder, tokenizer, scheduler, encoder: SubjectEncoder,
                 adapter: FlexIPAdapter, profile: Profile, device: torch.device, dtype: torch.dtype,
                 attention: str | None = None, low_vram: LowVRAM | bool | None = None):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.scheduler_config = {"_class_name": type(scheduler).__name__, **scheduler.config}  # also when built in code
        self.encoder, self.adapter, self.profile = encoder, adapter, profile
        self.device, self.dtype = torch.device(device), dtype
        self.backend = pick_backend(attention, self.device)
        self.low_vram = LowVRAM.parse(low_vram)
        offload = self.low_vram is not None and self.low_vram.cpu_offload and self.device.type == "cuda"
        for module in (unet, vae, text_encoder, adapter):
            place = "cpu" if offload and module is not adapter else self.device  # offloaded models start on the CPU
            same_dtype = next(module.parameters()).dtype == self.dtype
            module.to(place) if same_dtype else module.to(place, self.dtype)
            module.eval().requires_grad_(False)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        install_processors(unet, adapter, self.backend)
        models = [encoder.clip, encoder.dino, text_encoder, unet, vae]  # in the order they run
        self.offload_hooks = apply_low_vram(self.low_vram, models, vae, self.device)
        self.vae_decoder = SafeVaeDecoder(vae, self.device)  # fp16 VAE kept from NaN/black images

    @property
    def defaults(self) -> Defaults:
        return self.profile.defaults

    @classmethod
    def from_profile(cls, name: str = "tiny", *, device=None, dtype=None, attention: str | None = None,
                     low_vram: LowVRAM | bool | None = None, **overrides) -> FlexIPPipeline:
        """Load a profile by name or path; keyword overrides replace its parts (base=, adapter=, ...)."""
        from flexip_core.loading.assembly import assemble

        return assemble(cls, name, device=device, dtype=dtype, attention=attention, low_vram=low_vram, **overrides)

    # --- subject -------------------------------------------------------------------------------
    @reports_out_of_memory("encode the subject photos")
    def encode_subject(self, images: list[Image.Image], weights: list[float] | None = None) -> SubjectEmbedding:
        """Encode the subject's photos once (cached by content) and combine them."""
        return self.encoder.encode_subject(images, weights)

    def identity_score(self, images: list[Image.Image], subject: SubjectEmbedding,
                       references: list[Image.Image] | None = None) -> list[float | None]:
        """Each image's identity score by the profile's identity_metric: the cosine similarity of its CLIP embedding
        to the subject's, or ("toyworld", given the reference photos) the oracle's share of the first reference's
        identity attributes found in it (None where the oracle finds no toy in the reference)."""
        if self.profile.identity_metric == "toyworld" and references:
            from toyworld.oracle import identity_kept

            return identity_kept(images, references[0])
        embeds = self.encoder.image_embeds(images)  # (B, E)
        reference = subject.features.clip_embeds  # (1, E)
        return torch.nn.functional.cosine_similarity(embeds, reference).tolist()

    def reference_notes(self, references: list[Image.Image]) -> list[str]:
        """Warnings about the subject photos for this model: on a toy-world model (identity_metric 'toyworld'),
        that the first photo is not one of its toys (it has no identity score then)."""
        if self.profile.identity_metric != "toyworld" or not references:
            return []
        from toyworld.oracle import NOT_A_TOY, read_toy

        return [NOT_A_TOY] if read_toy(references[0]) is None else []

    # --- inputs ----------------------------------------------------------------------------------
    def check_inputs(self, prompt, subject, strength, num_inference_steps, guidance_scale, height, width, seed):
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        if not isinstance(subject, SubjectEmbedding):
            raise ValueError("no subject: call pipe.encode_subject([photos]) and pass its result as subject=")
        check_settings(strength, num_inference_steps, guidance_scale, height, width, seed, self.defaults.max_side)

    def branch_weights_for(self, gate, strength, branch_weights) -> list[tuple[float, float]]:
        """Per-image (w_pres, w_pers) from the gate curve, or taken as given."""
        if branch_weights is not None:
            pairs = [branch_weights] if isinstance(branch_weights[0], (int, float)) else list(branch_weights)
            for pair in pairs:
                if len(pair) != 2:
                    raise ValueError(f"branch_weights must be (w_pres, w_pers) pairs, got {pair!r}")
                for w in pair:
                    check_unit(w, "branch weight", high=2.0)
            weights = [(float(a), float(b)) for a, b in pairs]
        else:
            gates = gate if isinstance(gate, (list, tuple, np.ndarray)) else [gate]
            weights = [self.profile.gate_curve.weights(g, strength) for g in gates]
        if not 1 <= len(weights) <= MAX_BATCH:
            raise ValueError(f"give from 1 to {MAX_BATCH} gate values per call, got {len(weights)}")
        return weights

    def model_text(self, text: str, what: str, warnings: list[str]) -> str:
        """The text as the text encoder gets it: whole, except for a toy-world model (identity_metric 'toyworld'),
        which gets only the words its captions used (any other word, never trained, makes it draw noise) with a
        warning naming those left out."""
        if self.profile.identity_metric != "toyworld":
            return text
        from toyworld.world import known_words, unknown_words_note

        note = unknown_words_note(text, what)
        if note is None:
            return text
        logger.warning(note)
        warnings.append(note)
        return known_words(text)

    @torch.no_grad()
    def encode_prompt(self, prompt: str, warnings: list[str]) -> torch.Tensor:
        """(1, 77, C) text-encoder hidden states; over-long prompts are truncated with a warning."""
        limit = self.tokenizer.model_max_length
        full = self.tokenizer(prompt, truncation=False, verbose=False).input_ids  # verbose: transformers' own warning
        if len(full) > limit:
            message = f"prompt is {len(full)} tokens; the text encoder takes {limit}, so the end was cut off"
            logger.warning(message)
            warnings.append(message)
        ids = self.tokenizer(prompt, padding="max_length", max_length=limit, truncation=True,
                             return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.device))[0]

    def _branch_tokens(self, provider, features: ImageFeatures, uncond: ImageFeatures, text, neg_text, n, cfg):
        """(2N or N, tokens, C) for one branch: unconditional rows first when CFG is on."""
        to_device = lambda f: f.map(lambda t: t.to(self.device, self.dtype))
        cond = provider(to_device(features), text)  # (1, T, C)
        rows = [cond.expand(n, -1, -1)]
        if cfg:
            rows.insert(0, provider(to_device(uncond), neg_text).expand(n, -1, -1))
        return torch.cat(rows)

    # --- generation ------------------------------------------------------------------------------
    @reports_out_of_memory("generate these images")
    @torch.no_grad()
    def __call__(self, prompt: str, subject: SubjectEmbedding | None = None, gate=0.5, strength: float = 1.0,
                 negative_prompt: str | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, height: int | None = None, width: int | None = None,
                 seed: int = 0, scheduler: str | None = "profile", callback=None, gate_schedule=None,
                 branch_weights=None, output_type: str = "pil") -> FlexIPOutput:
        d = self.defaults
        steps = d.num_inference_steps if num_inference_steps is None else num_inference_steps
        guidance = d.guidance_scale if guidance_scale is None else guidance_scale
        height, width = height or d.height, width or d.width
        scheduler_name = d.scheduler if scheduler == "profile" else scheduler
        # 1. Check inputs
        self.check_inputs(prompt, subject, strength, steps, guidance, height, width, seed)
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string or None, got {type(negative_prompt).__name__}")
        if output_type not in ("pil", "np"):
            raise ValueError(f"output_type must be 'pil' or 'np', got {output_type!r}")
        weights = self.branch_weights_for(gate, strength, branch_weights)
        schedule = as_schedule(gate_schedule) or GateSchedule()
        sched = make_scheduler(scheduler_name, self.scheduler_config)
        n, cfg, warnings = len(weights), guidance > 1.0, []

        # 2. Encode the prompt
        text = self.encode_prompt(self.model_text(prompt, "prompt", warnings), warnings)  # (1, 77, C)
        negative = self.model_text(negative_prompt or "", "negative prompt", warnings)
        neg_text = self.encode_prompt(negative, warnings) if cfg else None
        rows = [text.expand(n, -1, -1)] + ([neg_text.expand(n, -1, -1)] if cfg else [])
        encoder_hidden_states = torch.cat(rows[::-1])  # (2N, 77, C): unconditional rows first

        # 3. Prepare timesteps (some schedulers, e.g. PNDM, run more model calls than steps)
        sched.set_timesteps(steps, device=self.device)
        total = len(sched.timesteps)

        # 4. Branch weights per image and model call, and the branch tokens (computed once, only if used)
        per_step = np.array([[schedule.factors(i, total) for i in range(total)]] * n)  # (N, total, 2)
        w = np.array(weights)[:, None, :] * per_step  # (N, total, 2)
        pres = pers = None
        if w[..., 0].any():
            pres = self._branch_tokens(self.adapter.preservation, subject.features, subject.uncond, text, neg_text,
                                       n, cfg)
        if w[..., 1].any():
            pers = self._branch_tokens(self.adapter.personalization, subject.features, subject.uncond, text, neg_text,
                                       n, cfg)
        cache, kv_calls = {}, [0]

        # 5. Prepare latents: one draw from the seed, shared by every image (a same-seed sweep)
        generators = [torch.Generator("cpu").manual_seed(int(seed)) for _ in range(n)]
        shape = (n, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        latents = randn_tensor(shape, generator=generators, device=self.device, dtype=text.dtype)
        latents = latents * sched.init_noise_sigma
        step_kwargs = {"generator": generators} if "generator" in inspect.signature(sched.step).parameters else {}

        # 6. Denoising loop
        for i, t in enumerate(sched.timesteps):
            w_step = torch.tensor(w[:, i, :], device=self.device, dtype=self.dtype)  # (N, 2)
            w_step = torch.cat([w_step, w_step]) if cfg else w_step  # (2N or N, 2)
            inputs = BranchInputs(pres, pers, w_step[:, 0], w_step[:, 1], bool(w[:, i, 0].any()),
                                  bool(w[:, i, 1].any()), cache, kv_calls)
            model_in = torch.cat([latents, latents]) if cfg else latents
            model_in = sched.scale_model_input(model_in, t)
            noise = self.unet(model_in, t, encoder_hidden_states=encoder_hidden_states,
                              cross_attention_kwargs={"flexip": inputs}, return_dict=False)[0]
            if cfg:
                uncond, cond = noise.chunk(2)
                noise = uncond + guidance * (cond - uncond)
            latents = sched.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
            if callback is not None:
                callback(i + 1, total, latents_to_previews(latents))

        # 7. Decode
        decoded = self.vae_decoder(latents)
        arrays = self.image_processor.postprocess(decoded, output_type="np")  # (N, H, W, 3)
        params = self._parameters(prompt, negative_prompt, gate, weights, branch_weights, strength, seed, steps,
                                  guidance, height, width, scheduler_name, gate_schedule)
        images = self.image_processor.numpy_to_pil(arrays)
        return FlexIPOutput(images, params, arrays if output_type == "np" else None, warnings, kv_calls[0])

    def _parameters(self, prompt, negative_prompt, gate, weights, branch_weights, strength, seed, steps, guidance,
                    height, width, scheduler, gate_schedule) -> list[dict]:
        gates = gate if isinstance(gate, (list, tuple, np.ndarray)) else [gate] * len(weights)
        common = dict(prompt=prompt, negative_prompt=negative_prompt or "", strength=float(strength), seed=int(seed),
                      num_inference_steps=int(steps), guidance_scale=float(guidance), height=int(height),
                      width=int(width), scheduler=scheduler or "default", gate_schedule=gate_schedule,
                      profile=self.profile.name, base=_public_name(self.profile.base),
                      adapter=_public_name(self.profile.adapter))
        out = []
        for g, (w_pres, w_pers) in zip(gates, weights):
            entry = dict(common, gate=None if branch_weights is not None else float(g))
            entry.update(w_pres=w_pres, w_pers=w_pers)
            out.append(entry)
        return out


def _public_name(source: str | None) -> str | None:
    """A model source as safe to publish: Hub ids as they are, local paths by their last part only."""
    if source is None or not Path(source).exists():
        return source
    return Path(source).name
