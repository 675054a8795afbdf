"""FlexIPPipeline: FlexIP's gated preservation and personalization adapters (arXiv 2504.07405) attached to a
diffusers pipeline of the Stable Diffusion 1.5 or SDXL family.

diffusers runs the task (text-to-image, image-to-image, inpainting, ControlNet, AnimateDiff clips) in the pipeline's own
`__call__`; FlexIP adds what is its own, the way diffusers' IP-Adapter support does: gated cross-attention
processors, branch tokens passed through `cross_attention_kwargs`, and the per-step gate through
`callback_on_step_end`.
"""
from __future__ import annotations

import inspect
import logging
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flexip_core.generation.adapters import FlexIPAdapter, ImageFeatures
from flexip_core.generation.attention import BranchInputs, install_processors, pick_backend
from flexip_core.generation.devices import LowVRAM, SafeVaeDecoder, apply_low_vram, reports_out_of_memory
from flexip_core.generation.encoders import SubjectEmbedding, SubjectEncoder
from flexip_core.generation.gate import GateCurve, GateSchedule, as_schedule, check_unit
from flexip_core.generation.preview import PreviewDecoder
from flexip_core.generation.schedulers import make_scheduler, scheduler_name
from flexip_core.generation.settings import MAX_BATCH, MAX_SEED, MAX_SIDE, Generation, check_whole
from flexip_core.generation.speed import speed_up_unet
from flexip_core.generation.video import DECODE_FRAMES, check_clip_memory
from flexip_core.loading.profiles import Defaults, Profile, load_world

logger = logging.getLogger(__name__)

# The diffusers pipelines FlexIP attaches to: per model family, the pipeline class of each task.
FAMILIES = {
    "sd15": {"text-to-image": "StableDiffusionPipeline", "image-to-image": "StableDiffusionImg2ImgPipeline",
             "inpainting": "StableDiffusionInpaintPipeline", "controlnet": "StableDiffusionControlNetPipeline",
             "animate": "AnimateDiffPipeline"},
    "sdxl": {"text-to-image": "StableDiffusionXLPipeline", "image-to-image": "StableDiffusionXLImg2ImgPipeline",
             "inpainting": "StableDiffusionXLInpaintPipeline", "controlnet": "StableDiffusionXLControlNetPipeline"},
}
TASKS = {cls: task for classes in FAMILIES.values() for task, cls in classes.items()}  # class name -> task
FAMILY_OF = {cls: family for family, classes in FAMILIES.items() for cls in classes.values()}  # class name -> family
# AnimateDiff's motion modules were trained on linear betas (guoyww/AnimateDiff's inference configs; diffusers' and
# AnimateLCM's examples set them): FlexIP's named schedulers on the animate task are built with them.
MOTION_SCHEDULER = {"beta_schedule": "linear"}
# What FlexIP itself passes to the wrapped pipeline: set through FlexIP's own arguments, not pipeline_kwargs.
OWN_ARGUMENTS = ("prompt", "prompt_embeds", "negative_prompt", "negative_prompt_embeds", "num_inference_steps",
                 "guidance_scale", "generator", "num_images_per_prompt", "output_type", "callback_on_step_end",
                 "callback_on_step_end_tensor_inputs", "ip_adapter_image", "ip_adapter_image_embeds", "height",
                 "width", "return_dict", "num_frames",
                 # SDXL: the second text encoder's prompts and the pooled text embeddings come from the same prompt
                 "prompt_2", "negative_prompt_2", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")


class GenerationCancelled(Exception):
    """Raised by a callback to stop a generation; propagates out of the pipeline call."""


@dataclass
class FlexIPOutput:
    images: list[Image.Image]  # one per gate value (or branch-weight pair); of a clip, its first frame
    parameters: list[dict]  # per image: its Generation's parameters plus the model and branch weights used
    arrays: np.ndarray | None = None  # (N, H, W, 3) floats in [0, 1] when output_type="np"; clips: (N, F, H, W, 3)
    warnings: list[str] = field(default_factory=list)  # non-fatal notes, e.g. a truncated prompt
    kv_projections: int = 0  # key/value projections computed during the run (cached ones are not recounted)
    generations: list[Generation] = field(default_factory=list)  # per image: the settings that made it
    frames: list[list[Image.Image]] | None = None  # the animate task: per clip (one per γ), its F frames


def pipeline_class(pipe) -> str:
    """The supported diffusers class a pipeline is (or derives from), or a ValueError naming those."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in TASKS:
            return cls.__name__
    raise ValueError(f"FlexIP attaches to {', '.join(TASKS)} (the Stable Diffusion 1.5 and SDXL families); got "
                     f"{type(pipe).__name__}")


def task_of(pipe) -> str:
    """The task of a supported diffusers pipeline (its class or a subclass), or a ValueError naming those."""
    return TASKS[pipeline_class(pipe)]


class FlexIPPipeline:
    """A diffusers SD1.5- or SDXL-family pipeline with FlexIP attached: its subject encoder, adapter and gate."""

    def __init__(self, pipe, *, encoder: SubjectEncoder, adapter: FlexIPAdapter, profile: Profile | None = None,
                 gate_curve: GateCurve | None = None, attention: str | None = None,
                 low_vram: LowVRAM | bool | None = None, device=None, own_processors: dict | None = None,
                 fused_attention: bool = True, preview_vae=None, compile: bool | str | None = False,
                 channels_last: bool = False):
        self.task = task_of(pipe)
        self.family = FAMILY_OF[pipeline_class(pipe)]
        self.pipe, self.encoder, self.adapter, self.profile = pipe, encoder, adapter, profile
        self.gate_curve = gate_curve or (profile.gate_curve if profile else GateCurve())
        self.world = load_world(profile.world) if profile and profile.world else None  # e.g. the toy world
        self.device = torch.device(device) if device is not None else pipe._execution_device
        self.dtype = pipe.unet.dtype
        self.backend = pick_backend(attention, self.device)
        self.low_vram = LowVRAM.parse(low_vram)
        adapter.to(self.device, self.dtype).eval().requires_grad_(False)  # small: stays on the device
        self._own_processors = own_processors or dict(pipe.unet.attn_processors)  # restored by detach()
        self.scheduler_config = _scheduler_config(pipe.scheduler)  # the base's: what named schedulers are built from
        if self.task == "animate":
            self.scheduler_config.update(MOTION_SCHEDULER)
            if getattr(pipe, "motion_adapter", None) is not None:  # unused when generating: the UNetMotionModel
                pipe.motion_adapter.to("cpu")  # holds copies of its weights
        if profile and profile.defaults.scheduler:  # the profile asks for its scheduler; a call may ask for another
            pipe.scheduler = make_scheduler(profile.defaults.scheduler, self.scheduler_config)
        self.fused_attention = fused_attention  # the text and both branches in one attention call (SDPA)
        install_processors(pipe.unet, adapter, self.backend, fused_attention)
        self.channels_last = channels_last
        self.compiled = speed_up_unet(pipe.unet, self.device, compile, channels_last)  # the torch.compile mode, or None
        self.offload_hooks = apply_low_vram(self.low_vram, pipe, [encoder.clip, encoder.dino], self.device)
        # fp16 VAE kept from NaN/black images; SDXL's own VAE asks for fp32 decoding (force_upcast), as diffusers does
        upcast = self.family == "sdxl" and bool(getattr(pipe.vae.config, "force_upcast", False))
        self.vae_decoder = SafeVaeDecoder(pipe.vae, self.device, upcast=upcast)
        tiny = preview_vae.to(self.device) if preview_vae is not None else None  # ~1 M parameters: stays on the device
        self.preview_decoder = PreviewDecoder(self.family, tiny, pipe.vae_scale_factor)  # step previews, fast decodes
        self._lock = threading.Lock()  # one call at a time on the wrapped pipeline

    # --- building ------------------------------------------------------------------------------------
    @classmethod
    def attach(cls, pipe, *, adapter=None, preservation=None, personalization=None, clip_encoder, dino_encoder=None,
               gate_curve=None, attention: str | None = None) -> FlexIPPipeline:
        """Attach FlexIP to a diffusers pipeline object; the denoising then runs in that pipeline's `__call__`.

        Args:
            pipe: a `StableDiffusionPipeline`, `StableDiffusionImg2ImgPipeline`, `StableDiffusionInpaintPipeline`
                (9- or 4-channel UNet) or `StableDiffusionControlNetPipeline` (one or several ControlNets), or the
                SDXL ones: `StableDiffusionXLPipeline`, `StableDiffusionXLImg2ImgPipeline`,
                `StableDiffusionXLInpaintPipeline`, `StableDiffusionXLControlNetPipeline`.
            adapter: a native FlexIP adapter (file, Hub 'repo:file', or a FlexIPAdapter) holding both branches.
            preservation, personalization: IP-Adapter files (or native sources) for each branch, when no `adapter`.
            clip_encoder: the CLIP vision tower (folder, Hub 'repo[:subfolder]', or a loaded
                `CLIPVisionModelWithProjection`); the IP-Adapter SD1.5 files and the SDXL `vit-h` ones need OpenCLIP
                ViT-H/14 (h94/IP-Adapter:models/image_encoder).
            dino_encoder: DINOv2 (same forms), needed only by FlexIP-trained preservation adapters.
            gate_curve: γ -> branch weights (a `GateCurve` or its dict); default w_pres = s·γ, w_pers = s·(1-γ).
            attention: "sdpa", "xformers" or None/"auto" (xformers on CUDA when it runs there).
        """
        from flexip_core.loading.assembly import load_adapter_for_unet, load_subject_encoder

        task_of(pipe)
        dtype, device = pipe.unet.dtype, pipe._execution_device
        flexip = load_adapter_for_unet(pipe.unet, adapter=adapter, preservation=preservation,
                                       personalization=personalization)
        encoder = load_subject_encoder(flexip, clip_encoder, dino_encoder, dtype, device)
        curve = gate_curve if isinstance(gate_curve, GateCurve) or gate_curve is None else GateCurve.from_dict(
            gate_curve)
        return cls(pipe, encoder=encoder, adapter=flexip, gate_curve=curve, attention=attention)

    @classmethod
    def from_profile(cls, name: str | None = None, *, device=None, dtype=None, attention: str | None = None,
                     low_vram: LowVRAM | bool | None = None, **overrides) -> FlexIPPipeline:
        """Build the profile's diffusers pipeline and attach FlexIP to it.

        Args:
            name: a profile name (assets/profiles/NAME.json) or a profile .json path; None: the best available
                (sd15 on a GPU with its weights cached, else the offline mini, as the studio and CLI choose).
            device, dtype: where and in what precision to run ("auto": CUDA fp16, else CPU fp32).
            attention: "sdpa", "xformers" or None/"auto".
            low_vram: True for diffusers' model CPU offload plus VAE slicing and tiling (or a LowVRAM).
            **overrides: profile fields replaced for this load (base=, adapter=, preservation=, pipeline=, ...), among
                them the speed options: compile=True (torch.compile of the UNet for fixed shapes, CUDA graphs on
                CUDA; or a torch.compile mode name), channels_last=True, and preview_vae= (a tiny autoencoder).
        """
        from flexip_core.loading.assembly import assemble
        from flexip_core.loading.profiles import default_profile

        return assemble(cls, name or default_profile(), device=device, dtype=dtype, attention=attention,
                        low_vram=low_vram, **overrides)

    def for_task(self, task: str, pipe=None, **components) -> FlexIPPipeline:
        """This FlexIP (the same adapter, encoders, gate curve and profile) on the diffusers pipeline of another task.

        Args:
            task: "text-to-image", "image-to-image", "inpainting", "controlnet" or (SD1.5) "animate".
            pipe: a pipeline of that task to attach to (e.g. one over an inpainting base); None builds it from this
                pipeline's own components with diffusers' `from_pipe` (nothing is loaded again; for "animate" diffusers
                makes a UNetMotionModel: a copy of the UNet with the motion modules inserted).
            **components: what that task adds to `from_pipe` (controlnet=; motion_adapter=, a diffusers
                `MotionAdapter`, for "animate").
        """
        import diffusers

        classes = FAMILIES[self.family]
        if task not in classes:
            raise ValueError(f"unknown task {task!r}; one of {', '.join(classes)}")
        if self.task == "animate" and task != "animate":
            raise ValueError("this pipeline's UNet carries AnimateDiff's motion modules; for the other tasks use the "
                             "FlexIPPipeline it was made from, or a text-to-image profile (sd15)")
        if pipe is None:
            if task == self.task and not components:
                return self
            if task == "animate" and components.get("motion_adapter") is None:
                raise ValueError("the animate task needs an AnimateDiff motion adapter: for_task('animate', "
                                 "motion_adapter=MotionAdapter.from_pretrained('guoyww/animatediff-motion-adapter-v1-5-3'))")
            # from_pipe casts every component to its dtype argument (float32 unless given), shared ones included
            pipe = getattr(diffusers, classes[task]).from_pipe(self.pipe, dtype=self.dtype, **components)
            pipe.set_progress_bar_config(disable=True)
            if task == "animate" and (self.low_vram is None or not self.low_vram.cpu_offload):
                pipe.unet.to(self.device)  # diffusers builds the UNetMotionModel on the CPU
        elif task_of(pipe) != task:
            raise ValueError(f"{type(pipe).__name__} is a {task_of(pipe)} pipeline, not {task}")
        shared = pipe.unet is self.pipe.unet  # its UNet already carries FlexIP's processors
        derived = FlexIPPipeline(pipe, encoder=self.encoder, adapter=self.adapter, profile=self.profile,
                                 gate_curve=self.gate_curve, attention=self.backend,
                                 low_vram=None if shared else self.low_vram, device=self.device,
                                 own_processors=self._own_processors if shared else None,
                                 fused_attention=self.fused_attention, preview_vae=self.preview_decoder.autoencoder,
                                 compile=None if shared else self.compiled,
                                 channels_last=self.channels_last and not shared)
        derived.scheduler_config = {**self.scheduler_config, **(MOTION_SCHEDULER if task == "animate" else {})}
        derived.compiled = self.compiled  # a shared UNet is compiled already
        return derived

    def detach(self):
        """Give the pipeline back its own attention processors; returns it (this object is then unusable)."""
        self.pipe.unet.set_attn_processor(self._own_processors)
        for hook in self.offload_hooks:
            hook.remove()
        return self.pipe

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def text_encoder(self):
        return self.pipe.text_encoder

    @property
    def tokenizer(self):
        return self.pipe.tokenizer

    @property
    def defaults(self) -> Defaults:
        """The profile's defaults; without a profile, SD1.5's 512 px and guidance 7.5, or diffusers' SDXL ones (the
        UNet's native size, 1024 px for SDXL 1.0, and guidance 5)."""
        if self.profile:
            return self.profile.defaults
        if self.family == "sdxl":
            # only diffusers' SDXL text-to-image pipeline has default_sample_size; the others take the UNet's
            sample = getattr(self.pipe, "default_sample_size", self.pipe.unet.config.sample_size)
            side = sample * self.pipe.vae_scale_factor
            return Defaults(height=side, width=side, guidance_scale=5.0, scheduler=None, max_side=MAX_SIDE)
        return Defaults(scheduler=None)

    # --- subject -------------------------------------------------------------------------------------
    @reports_out_of_memory("encode the subject photos")
    def encode_subject(self, images: list[Image.Image], weights: list[float] | None = None) -> SubjectEmbedding:
        """Encode the subject's photos once (cached by content) and combine them.

        Args:
            images: one or more photos of one subject (PIL images).
            weights: one non-negative weight per photo (None: equal weights).
        """
        return self.encoder.encode_subject(images, weights)

    def identity_score(self, images: list[Image.Image], subject: SubjectEmbedding,
                       references: list[Image.Image] | None = None) -> list[float | None]:
        """Each image's identity score: the cosine of its CLIP embedding with the subject's, or the profile's world's
        own metric (the toy world's oracle) given the reference photos."""
        if self.world is not None and references:
            return self.world.identity_scores(images, references)
        embeds = self.encoder.image_embeds(images)  # (B, E)
        reference = subject.features.clip_embeds  # (1, E)
        return torch.nn.functional.cosine_similarity(embeds, reference).tolist()

    @property
    def identity_metric(self) -> str:
        return self.world.IDENTITY_METRIC if self.world is not None else "clip"

    def reference_notes(self, references: list[Image.Image]) -> list[str]:
        """Warnings about the subject photos for this model (the toy world: a photo that is not one of its toys)."""
        return self.world.reference_notes(references) if self.world is not None and references else []

    # --- inputs --------------------------------------------------------------------------------------
    def branch_weights_for(self, gates: list[float], strength, branch_weights) -> list[tuple[float, float]]:
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
            weights = [self.gate_curve.weights(g, strength) for g in gates]
        if not 1 <= len(weights) <= MAX_BATCH:
            raise ValueError(f"give from 1 to {MAX_BATCH} gate values per call, got {len(weights)}")
        return weights

    def model_text(self, text: str, what: str, warnings: list[str]) -> str:
        """The text as the text encoder gets it: whole, unless the profile's world filters it (the toy world keeps
        only the words its captions used, with a warning naming those left out)."""
        if self.world is None:
            return text
        kept, note = self.world.model_text(text, what)
        if note:
            logger.warning(note)
            warnings.append(note)
        return kept

    def _truncation_note(self, prompt: str, warnings: list[str]) -> None:
        """A warning when a text encoder cuts the prompt (SDXL: either of its two tokenizers; the first one that
        does is named)."""
        for attribute in ("tokenizer", "tokenizer_2"):
            tokenizer = getattr(self.pipe, attribute, None)
            if tokenizer is None:
                continue  # e.g. an SDXL refiner has only the second text encoder
            length = len(tokenizer(prompt, truncation=False, verbose=False).input_ids)
            if length > tokenizer.model_max_length:
                message = (f"prompt is {length} tokens; the text encoder takes {tokenizer.model_max_length}, so the "
                           "end was cut off")
                logger.warning(message)
                warnings.append(message)
                return

    def _encode_prompt(self, prompt: str, negative: str, cfg: bool, clip_skip):
        """(text, negative text, pooled, negative pooled) through the pipeline's own encode_prompt (LoRA scale,
        clip_skip, textual inversion). SD1.5: (1, 77, 768) tokens and no pooled embedding; SDXL: both text
        encoders' tokens side by side, (1, 77, 2048), and the second one's pooled embedding, (1, 1280). An empty
        negative prompt is given as None, so that SDXL's force_zeros_for_empty_prompt applies as in diffusers
        (SD1.5 encodes None and "" alike)."""
        out = self.pipe.encode_prompt(prompt=prompt, device=self.device, num_images_per_prompt=1,
                                      do_classifier_free_guidance=cfg, negative_prompt=negative or None,
                                      clip_skip=clip_skip)
        return tuple(out) if len(out) == 4 else (*out, None, None)

    def _check_pipeline_kwargs(self, pipeline_kwargs: dict) -> dict:
        if not isinstance(pipeline_kwargs, dict):
            raise ValueError(f"pipeline_kwargs must be a dict, got {type(pipeline_kwargs).__name__}")
        taken = sorted(set(pipeline_kwargs) & set(OWN_ARGUMENTS))
        if taken:
            second = " (SDXL's second text encoder gets FlexIP's prompt and negative prompt too)" if {
                "prompt_2", "negative_prompt_2"} & set(taken) else ""
            raise ValueError(f"pipeline_kwargs may not set {', '.join(taken)}: FlexIP passes those itself (give them "
                             f"as FlexIP's own arguments){second}")
        accepted = inspect.signature(self.pipe.__call__).parameters
        unknown = sorted(set(pipeline_kwargs) - set(accepted))
        if unknown:
            raise ValueError(f"{type(self.pipe).__name__} takes no {', '.join(unknown)}")
        return pipeline_kwargs

    def _branch_tokens(self, branch: str, subject: SubjectEmbedding, text, neg_text, n: int, cfg: bool):
        """(tokens (2N or N, T, C), bias (T,) or None) of one branch: unconditional rows first when CFG is on
        (diffusers' order). A branch that reads per-photo tokens gets each photo's tokens side by side, with the
        log of the photo's share as an attention bias: the photos act as a weighted set."""
        provider = getattr(self.adapter, branch)
        photos = len(subject.photo_weights)
        per_photo = photos > 1 and bool(getattr(self.adapter.config, branch).needs & {"clip_hidden", "dino"})
        to_device = lambda t: t.to(self.device, self.dtype)

        def tokens(features: ImageFeatures, words) -> torch.Tensor:
            if not per_photo:
                return provider(features.map(to_device), words)  # (1, T, C)
            rows = ImageFeatures(*(None if t is None else to_device(t).expand(photos, *t.shape[1:])
                                   for t in (features.clip_embeds, features.clip_hidden, features.dino)))
            out = provider(rows, words.expand(photos, -1, -1))  # (P, T, C)
            return out.reshape(1, -1, out.shape[-1])  # (1, P*T, C): each photo's tokens side by side

        rows = [tokens(subject.features, text).expand(n, -1, -1)]
        if cfg:
            rows.insert(0, tokens(subject.uncond, neg_text).expand(n, -1, -1))
        stacked = torch.cat(rows)
        if not per_photo:
            return stacked, None
        shares = torch.tensor(subject.photo_weights, device=self.device, dtype=torch.float32)
        bias = shares.log().repeat_interleave(stacked.shape[1] // photos)  # (P*T,)
        return stacked, bias

    # --- generation ----------------------------------------------------------------------------------
    @reports_out_of_memory("generate these images")
    @torch.no_grad()
    def __call__(self, prompt: str = "", subject: SubjectEmbedding | None = None, gate=0.5, strength: float = 1.0,
                 negative_prompt: str | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, height: int | None = None, width: int | None = None,
                 seed: int = 0, scheduler: str | None = None, callback=None, gate_schedule=None,
                 branch_weights=None, output_type: str = "pil", pipeline_kwargs: dict | None = None,
                 generation: Generation | None = None, num_images: int = 1, decode: str = "full",
                 num_frames: int | None = None, fps: int | None = None) -> FlexIPOutput:
        """Generate one image per γ (a same-seed sweep in one batched call), or a batch of images at one γ with
        consecutive seeds, through the wrapped pipeline; on the animate task (AnimateDiffPipeline) one clip each.

        Args:
            prompt: what to make of the subject.
            subject: `encode_subject(photos)`'s result.
            gate: γ in [0, 1] (1 keeps identity, 0 follows the prompt), or a list of them: one image each.
            strength: overall adapter strength s in [0, 2], scaling both branch weights.
            negative_prompt: what to steer away from.
            num_inference_steps, guidance_scale: as in diffusers (the profile's defaults when None).
            height, width: output size in pixels, for the tasks that take one (not image-to-image); default: the
                profile's for text-to-image, the input image's otherwise.
            seed: 0 to 2**32-1; every image of a sweep starts from the same noise.
            scheduler: a scheduler name for this call (flexip_core.generation.schedulers); None keeps the pipeline's.
            callback: `callback(step, total, previews)` after every step; raising GenerationCancelled in it stops.
            gate_schedule: the steps each branch acts in: a GateSchedule, or f = identity in the first f only.
            branch_weights: (w_pres, w_pers), or one pair per image, instead of the gate curve.
            output_type: "pil" or "np" (also fills `arrays`).
            pipeline_kwargs: passed unchanged to the wrapped pipeline (`image=`, `mask_image=`, `strength=` of
                image-to-image, `controlnet_conditioning_scale=`, ...).
            generation: a `Generation` giving all the settings at once (its gate is used unless `gate` is a list).
            num_images: a batch at one γ: seeds seed, seed + 1, ... in one batched call (1 to 16).
            decode: "full" (the VAE) or "fast": the images decoded by `decode_fast`'s decoder (the profile's tiny
                autoencoder, else the linear projection), for images shown while the slider is dragged.
            num_frames: the animate task's frames per clip (default: the profile's, 16), up to what the motion
                adapter's positional embeddings cover (32 for AnimateDiff's and AnimateLCM's). `frames` holds each
                clip's frames, `images` its first frame, `arrays` (N, F, H, W, 3).
            fps: the animate task's frames per second, recorded with the clip for writing it (default: the profile's).
        """
        pipeline_kwargs = self._check_pipeline_kwargs(dict(pipeline_kwargs or {}))
        # 1. One Generation value, checked once
        gates = list(gate) if isinstance(gate, (list, tuple, np.ndarray)) else [gate]
        if not 1 <= len(gates) <= MAX_BATCH:
            raise ValueError(f"give from 1 to {MAX_BATCH} gate values per call, got {len(gates)}")
        if generation is None:
            generation = self._generation(prompt, negative_prompt, gates[0], strength, seed, num_inference_steps,
                                          guidance_scale, height, width, scheduler, gate_schedule, pipeline_kwargs)
        elif isinstance(gate, (list, tuple, np.ndarray)):
            generation = generation.at(gates[0])
        else:
            gates = [generation.gate]
        if self.task == "animate":  # a clip: the call's frames and rate, else the generation's, else the profile's
            generation = replace(generation, task="animate",
                                 num_frames=_given(num_frames, generation.num_frames, self.defaults.num_frames),
                                 fps=_given(fps, generation.fps, self.defaults.fps))
        elif num_frames is not None or fps is not None:
            raise ValueError(f"num_frames and fps make a clip (the animate task); this pipeline is {self.task}")
        max_side = self.defaults.max_side
        generation.check(max_side)
        frames = generation.num_frames or 1  # AnimateDiff folds each clip's frames into the batch: N·F rows
        if self.task == "animate":
            self._check_frames(frames)
        for g in gates:
            check_unit(g, "gate (γ)")
        check_whole(num_images, "num_images", 1, MAX_BATCH)
        if num_images > 1 and (len(gates) > 1 or branch_weights is not None):
            raise ValueError("num_images makes a batch at one γ; a γ sweep (several gate values or branch weights) "
                             "and a batch do not combine")
        gates = gates * num_images
        seeds = [(generation.seed + i) % (MAX_SEED + 1) for i in range(num_images)]  # one per image of a batch
        if not isinstance(subject, SubjectEmbedding):
            raise ValueError("no subject: call encode_subject([photos]) and pass its result as subject=")
        if output_type not in ("pil", "np"):
            raise ValueError(f"output_type must be 'pil' or 'np', got {output_type!r}")
        if decode not in ("full", "fast"):
            raise ValueError(f"decode must be 'full' (the VAE) or 'fast' (the preview decoder), got {decode!r}")
        weights = self.branch_weights_for(gates, generation.strength, branch_weights)
        n, warnings = len(weights), []
        cfg = generation.guidance_scale > 1 and self.pipe.unet.config.time_cond_proj_dim is None  # diffusers' rule
        if self.task == "animate" and self.device.type == "cuda":  # refuse what cannot fit before running out
            check_clip_memory(frames, generation.height, generation.width, clips=n, cfg=cfg, dtype=self.dtype,
                              device=self.device, decode_frames=DECODE_FRAMES)

        # 2. Encode the prompt once (diffusers' own encode_prompt: LoRA scale, clip_skip, textual inversion)
        text_prompt = self.model_text(generation.prompt, "prompt", warnings)
        self._truncation_note(text_prompt, warnings)
        negative = self.model_text(generation.negative_prompt, "negative prompt", warnings) if cfg else ""
        text, neg_text, pooled, neg_pooled = self._encode_prompt(
            text_prompt, negative, cfg, pipeline_kwargs.pop("clip_skip", None))  # (1, 77, C); (1, P) or None

        # 3. Branch tokens (computed once per generation, only for branches that act) and the step gate
        gate_steps = _StepGate(np.array(weights), generation.windows, cfg, self.device, self.dtype, frames)
        (pres, pres_bias), (pers, pers_bias) = (
            self._branch_tokens(name, subject, text, neg_text, n, cfg) if gate_steps.ever_on(i) else (None, None)
            for i, name in enumerate(("preservation", "personalization")))
        if frames > 1:  # each clip's tokens for each of its frames, in AnimateDiff's repeat_interleave order
            pres, pers = (None if t is None else t.repeat_interleave(frames, dim=0)  # (2N·F or N·F, T, C)
                          for t in (pres, pers))
        # a compiled UNet recomputes the keys and values in its graph: a per-generation cache would be state it guards
        cache = {} if self.compiled is None else None
        inputs = BranchInputs(pres, pers, *gate_steps.at(0, 1), pres_bias=pres_bias, pers_bias=pers_bias, cache=cache)

        # 4. Run the wrapped pipeline: its own timesteps, latents, guidance and scheduler steps
        cancelled: list[GenerationCancelled] = []

        def on_step_end(pipe, i, t, tensors):
            total = pipe.num_timesteps
            if i + 1 < total:
                inputs.w_pres, inputs.w_pers, inputs.pres_on, inputs.pers_on = gate_steps.at(i + 1, total)
            if callback is not None and not cancelled:
                try:
                    latents = tensors["latents"]  # (N, 4, h, w); clips: (N, 4, F, h, w), shown by their first frame
                    shown = latents[:, :, 0] if latents.ndim == 5 else latents  # (N, 4, h, w)
                    callback(i + 1, total, self.preview_decoder.previews(shown))
                except GenerationCancelled as stop:
                    cancelled.append(stop)
                    pipe._interrupt = True  # diffusers skips the remaining steps
            return {}

        size = {} if self.task == "image-to-image" else {"height": generation.height, "width": generation.width}
        if self.task == "animate":
            size["num_frames"] = frames
        # diffusers pastes the crop back after decoding, and only onto PIL output
        decode_in_pipe = pipeline_kwargs.get("padding_mask_crop") is not None
        attention_kwargs = {**(pipeline_kwargs.pop("cross_attention_kwargs", None) or {}), "flexip": inputs}
        negative_rows = neg_text.expand(n, -1, -1) if cfg else None
        pooled_rows = {}  # SDXL: the pooled text embedding conditions through its added time embedding
        if pooled is not None:
            pooled_rows["pooled_prompt_embeds"] = pooled.expand(n, -1)  # (N, P)
            if cfg:
                pooled_rows["negative_pooled_prompt_embeds"] = neg_pooled.expand(n, -1)  # (N, P)
        with self._lock:  # a diffusers pipeline keeps per-call state (guidance, interrupt, scheduler steps)
            own_scheduler = self.pipe.scheduler
            if generation.scheduler is not None:  # a fresh scheduler for this call only
                self.pipe.scheduler = make_scheduler(generation.scheduler, self.scheduler_config)
            try:
                result = self.pipe(
                    prompt_embeds=text.expand(n, -1, -1), negative_prompt_embeds=negative_rows,
                    num_inference_steps=generation.num_inference_steps, guidance_scale=generation.guidance_scale,
                    generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds * (n // len(seeds))],
                    output_type="pil" if decode_in_pipe else "latent", return_dict=False,
                    cross_attention_kwargs=attention_kwargs,
                    callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"],
                    **size, **pooled_rows, **pipeline_kwargs)[0]
            finally:
                self.pipe.scheduler = own_scheduler
        if cancelled:
            raise cancelled[0]

        if self.profile and self.profile.notice:
            warnings.append(self.profile.notice)

        # 5. Decode (fp16-safe) unless diffusers did
        if decode_in_pipe:
            arrays = np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in result])  # (N, H, W, 3)
        else:
            decoder = self._decode if decode == "full" else self.preview_decoder.decode
            arrays = self._decode_latents(result, decoder)  # (N, H, W, 3); clips: (N, F, H, W, 3)
        clips = [self._processor.numpy_to_pil(clip) for clip in arrays] if arrays.ndim == 5 else None
        images = [clip[0] for clip in clips] if clips else self._processor.numpy_to_pil(arrays)
        height_px, width_px = arrays.shape[-3:-1]
        used = generation.scheduler or scheduler_name(own_scheduler)  # recorded by name where it has one
        made = [replace(generation, gate=float(g) if branch_weights is None else generation.gate, height=height_px,
                        width=width_px, scheduler=used, seed=seed)
                for g, seed in zip(gates if len(gates) == n else gates * n, seeds * (n // len(seeds)))]
        params = [self._parameters(g, w, branch_weights is not None) for g, w in zip(made, weights)]
        return FlexIPOutput(images, params, arrays if output_type == "np" else None, warnings, inputs.kv_calls[0],
                            made, frames=clips)

    def decode_fast(self, latents: torch.Tensor) -> list[Image.Image]:
        """Images from latents in milliseconds, for what is shown while the slider moves: the profile's tiny autoencoder
        (TAESD) when it is there, else the linear projection upsampled to the image size. Final images use the VAE.

        Args:
            latents: (B, 4, h, w) latents as the UNet sees them (scaled by the VAE's scaling factor).
        """
        return self._processor.numpy_to_pil(self.preview_decoder.decode(latents))

    def _generation(self, prompt, negative_prompt, gate, strength, seed, steps, guidance, height, width, scheduler,
                    gate_schedule, pipeline_kwargs) -> Generation:
        d = self.defaults
        if self.task == "image-to-image" and (height is not None or width is not None):
            raise ValueError(f"{type(self.pipe).__name__} takes its size from its input image; leave height and "
                             "width out")
        if self.task in ("text-to-image", "animate"):
            height, width = height or d.height, width or d.width
        inputs = {k: v for k, v in pipeline_kwargs.items()
                  if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
        return Generation(
            prompt=prompt, negative_prompt=negative_prompt or "", gate=gate, strength=strength, seed=seed,
            num_inference_steps=d.num_inference_steps if steps is None else steps,
            guidance_scale=d.guidance_scale if guidance is None else guidance, height=height, width=width,
            scheduler=scheduler, windows=as_schedule(gate_schedule) or GateSchedule(), task=self.task,
            task_inputs=tuple(sorted((k, float(v) if not isinstance(v, str) else v) for k, v in inputs.items())))

    @property
    def _processor(self):
        """diffusers' image post-processor of the wrapped pipeline (AnimateDiff's is its video processor)."""
        return getattr(self.pipe, "image_processor", None) or self.pipe.video_processor

    def _check_frames(self, frames: int) -> None:
        """A clip no longer than the motion adapter's positional embeddings, which diffusers cannot extend."""
        most = self.pipe.unet.config.get("motion_max_seq_length")
        if most is not None and frames > most:
            raise ValueError(f"num_frames is {frames}; this motion adapter's positional embeddings cover {most} frames "
                             f"(motion_max_seq_length): give 1 to {most} frames")

    def _decode_latents(self, latents: torch.Tensor, decoder) -> np.ndarray:
        """(N, 4, h, w) latents -> (N, H, W, 3) images by `decoder`; a clip's (N, 4, F, h, w) -> (N, F, H, W, 3),
        DECODE_FRAMES frames at a time (diffusers' AnimateDiff decodes 16 at a time, in the same frame order)."""
        if latents.ndim == 4:
            return decoder(latents)
        clips, channels, frames = latents.shape[:3]
        flat = latents.permute(0, 2, 1, 3, 4).reshape(clips * frames, channels, *latents.shape[3:])  # (N·F, 4, h, w)
        arrays = np.concatenate([decoder(flat[i:i + DECODE_FRAMES]) for i in range(0, len(flat), DECODE_FRAMES)])
        return arrays.reshape(clips, frames, *arrays.shape[1:])  # (N, F, H, W, 3)

    def _decode(self, latents: torch.Tensor) -> np.ndarray:
        decoded = self.vae_decoder(latents)  # (N, 3, H, W) in [-1, 1]
        watermark = getattr(self.pipe, "watermark", None)  # SDXL's invisible watermark, when the pipeline applies one
        if watermark is not None:
            decoded = watermark.apply_watermark(decoded)
        denormalize = None
        if getattr(self.pipe, "safety_checker", None) is not None:  # a user's pipeline with diffusers' checker
            decoded, flagged = self.pipe.run_safety_checker(decoded, self.device, self.dtype)
            denormalize = [not f for f in flagged] if flagged is not None else None
        return self._processor.postprocess(decoded, output_type="np", do_denormalize=denormalize)

    def _parameters(self, generation: Generation, weights: tuple[float, float], direct: bool) -> dict:
        profile = self.profile
        entry = generation.to_parameters()
        if direct:
            entry["gate"] = None  # branch weights given directly: no γ
        entry.update(w_pres=weights[0], w_pers=weights[1], identity_metric=self.identity_metric,
                     profile=profile.name if profile else None,
                     base=_public_name(profile.base) if profile else None,
                     adapter=_public_name(profile.adapter) if profile else None)
        return entry


class _StepGate:
    """Per-image branch weights at each step: the gate's weights times the branch windows, CFG rows included, each
    row repeated for every frame of a clip (AnimateDiff's batch is N·F rows, each clip's frames side by side)."""

    def __init__(self, weights: np.ndarray, windows: GateSchedule, cfg: bool, device, dtype, frames: int = 1):
        self.weights, self.windows, self.cfg = weights, windows, cfg  # weights: (N, 2)
        self.device, self.dtype, self.frames = device, dtype, frames
        self._table = None  # (total steps, every step's weights on the device, every step's branch flags)

    def ever_on(self, branch: int) -> bool:
        return bool(self.weights[:, branch].any())

    def at(self, step: int, total: int) -> tuple[torch.Tensor, torch.Tensor, bool, bool]:
        """(w_pres, w_pers) of shape (2N or N,), times F for clips, and whether each branch acts at this step."""
        if self._table is None or self._table[0] != total:
            # every step's weights in one copy per generation: a copy from pageable host memory waits for the device's
            # queue, and one per step would keep the loop, bound by launches at batch 2, from running ahead
            w = np.stack([self.weights * np.array(self.windows.factors(s, total)) for s in range(total)])  # (T, N, 2)
            host = torch.tensor(w, dtype=self.dtype)
            on_cuda = self.device.type == "cuda"
            tensor = (host.pin_memory() if on_cuda else host).to(self.device, non_blocking=on_cuda)
            tensor = torch.cat([tensor, tensor], dim=1) if self.cfg else tensor  # (T, 2N or N, 2)
            tensor = tensor.repeat_interleave(self.frames, dim=1) if self.frames > 1 else tensor  # (T, 2N·F or N·F, 2)
            self._table = (total, tensor, [(bool(row[:, 0].any()), bool(row[:, 1].any())) for row in w])
        _, tensor, flags = self._table
        return tensor[step, :, 0], tensor[step, :, 1], *flags[step]


def _given(*values):
    """The first value that is not None."""
    return next(value for value in values if value is not None)


def _scheduler_config(scheduler) -> dict:
    return {"_class_name": type(scheduler).__name__, **scheduler.config}


def _public_name(source: str | None) -> str | None:
    """A model source as safe to publish: Hub ids as they are, local paths by their last part only."""
    if source is None or not Path(source).exists():
        return source
    return Path(source).name
