"""Training the FlexIP adapters with Hugging Face accelerate (modality-aware scheme of FlexIP, arXiv 2504.07405).

    accelerate launch -m flexip_core.train --config train.toml [--set max_steps=100 ...]
    torchrun --nproc_per_node 2 -m flexip_core.train --config train.toml      # on CPU: gloo

Frozen: UNet, VAE, text encoder(s), CLIP and DINOv2. Trained: both adapters' token providers and every
cross-attention layer's branch key/value projections. The base is SD1.5 or SDXL, as the profile's pipeline class
says (SDXL's two text encoders, pooled text and size ids: flexip_core.training.conditioning). Each sample draws
its gate gamma from its modality's range (invariant high, variant low), mapped to (w_pres, w_pers) by the
profile's gate curve at strength 1; text, image and both are dropped for a few percent of samples
(classifier-free guidance); the loss is diffusers' noise-prediction MSE (epsilon, v or sample, as the
scheduler's prediction_type says).

Every random draw of micro-step k on process r comes from a generator seeded by (seed, r, k), and the data
order is a pure function of (seed, step) (for shards, of the seed and the stream positions a checkpoint keeps:
flexip_core.training.shards), so resuming from a checkpoint continues the same run exactly.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from flexip_core.generation.adapter_config import AdapterConfig, BranchConfig
from flexip_core.generation.adapters import FlexIPAdapter, ImageFeatures, cross_attention_layers
from flexip_core.training.conditioning import SD15Text, SDXLText, sdxl_time_ids
from flexip_core.training.config import TrainConfig
from flexip_core.training.data import MODALITIES, PairDataset, PairPixels, StepBatchSampler, read_manifest
from flexip_core.training.shards import ShardBatches, check_streams, expand_shards, resume_positions

logger = logging.getLogger(__name__)

ADAPTER_FILE = "flexip_adapter.safetensors"  # the final adapter, in the native format the app loads


# --- the modality-aware draws ------------------------------------------------------------------
def draw_gammas(modality: torch.Tensor, config: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """(B,) training gamma: uniform in the invariant range for modality 0, in the variant range for 1."""
    ranges = torch.tensor([config.invariant_gamma, config.variant_gamma], dtype=torch.float64)  # (2, 2) by MODALITIES
    low, high = ranges[modality, 0], ranges[modality, 1]  # (B,) each
    return low + (high - low) * torch.rand(modality.shape, generator=generator, dtype=torch.float64)


def draw_dropout(batch: int, config: TrainConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(drop_text, drop_image), each (B,) bool: one uniform draw per sample picks text, image, both or none."""
    u = torch.rand(batch, generator=generator)
    image_only = u < config.drop_image
    text_only = (u >= config.drop_image) & (u < config.drop_image + config.drop_text)
    both = (u >= config.drop_image + config.drop_text) & (u < config.drop_image + config.drop_text + config.drop_both)
    return text_only | both, image_only | both


def draw_timesteps(batch: int, num_train_timesteps: int, power: float, generator: torch.Generator) -> torch.Tensor:
    """(B,) training timesteps with density proportional to t^(power - 1) (power 1: uniform)."""
    if power == 1.0:
        return torch.randint(0, num_train_timesteps, (batch,), generator=generator)
    u = torch.rand(batch, generator=generator) ** (1.0 / power)
    return (u * num_train_timesteps).long().clamp(max=num_train_timesteps - 1)


def micro_step_generator(seed: int, rank: int, micro_step: int) -> torch.Generator:
    """CPU generator for one process's micro-step: draws depend on (seed, rank, step), never on history."""
    state = np.random.SeedSequence([seed, rank, micro_step]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator("cpu").manual_seed(int(state) & (2**63 - 1))


# --- models -------------------------------------------------------------------------------------
@dataclass
class Frozen:
    """The frozen parts of the run, and how they turn records into latents, text states and image features."""

    unet: torch.nn.Module
    vae: torch.nn.Module  # in fp32 for SDXL under mixed precision (its VAE overflows in fp16, as diffusers notes)
    text: SD15Text | SDXLText  # captions -> text states (SDXL: pooled embeds and size ids too)
    encoder: object  # SubjectEncoder (CLIP, and DINOv2 when an adapter needs it)
    noise_scheduler: object  # DDPMScheduler with the base's betas and prediction_type
    gate_curve: object  # the profile's GateCurve
    device: torch.device
    dtype: torch.dtype  # dtype of the frozen weights (the mixed-precision dtype, else fp32)

    @property
    def tokenizer(self):
        """What PairDataset tokenizes captions with (SD1.5's tokenizer; None for SDXL, whose pipeline does)."""
        return self.text.tokenizer


@dataclass
class EncodedBatch:
    """A batch after the frozen encoders (kept on CPU between steps)."""

    latent_mean: torch.Tensor  # (B, 4, R/8, R/8) VAE posterior mean
    latent_std: torch.Tensor  # (B, 4, R/8, R/8) VAE posterior std (latents are re-sampled every step)
    text: torch.Tensor  # (B, 77, C) text-encoder hidden states
    features: ImageFeatures  # (B, ...) reference image features
    modality: torch.Tensor  # (B,) index into data.MODALITIES
    pooled: torch.Tensor | None = None  # (B, P) SDXL pooled text embeddings
    time_ids: torch.Tensor | None = None  # (B, 6) SDXL size ids: original (h, w), crop (top, left), target (h, w)

    def select(self, idx: torch.Tensor) -> EncodedBatch:
        def pick(t):
            return None if t is None else t[idx]

        return EncodedBatch(self.latent_mean[idx], self.latent_std[idx], self.text[idx],
                            self.features.map(lambda t: t[idx]), self.modality[idx], pick(self.pooled),
                            pick(self.time_ids))


class AdapterTrainingModel(torch.nn.Module):
    """The trainable adapter plus the frozen UNet it is injected into.

    The UNet is held in a tuple, outside the module tree, so that DDP buckets, checkpoints and
    `.state_dict()` see the adapter only (a checkpoint is megabytes, not the whole UNet).
    """

    def __init__(self, adapter: FlexIPAdapter, unet: torch.nn.Module):
        super().__init__()
        self.adapter = adapter
        self._unet = (unet,)

    def forward(self, noisy_latents, timesteps, text, clip_embeds, clip_hidden, dino, w_pres, w_pers,
                added_cond_kwargs=None):
        """`added_cond_kwargs`: SDXL's {"text_embeds": (B, P), "time_ids": (B, 6)}; None for SD1.5."""
        from flexip_core.generation.attention import BranchInputs

        # The adapter's own dtype: fp32 (accelerate's autocast does mixed precision), or bf16 where DeepSpeed casts
        # the trained weights itself (no autocast there)
        dtype = next(self.adapter.parameters()).dtype
        features = ImageFeatures(*(None if t is None else t.to(dtype) for t in (clip_embeds, clip_hidden, dino)))
        pres = self.adapter.preservation(features, text.to(dtype))  # (B, Np, C)
        pers = self.adapter.personalization(features, text.to(dtype))  # (B, Nq, C)
        inputs = BranchInputs(pres, pers, w_pres, w_pers, True, True, cache=None)
        return self._unet[0](noisy_latents, timesteps, encoder_hidden_states=text,
                             cross_attention_kwargs={"flexip": inputs}, added_cond_kwargs=added_cond_kwargs,
                             return_dict=False)[0]  # (B, 4, h, w)


def _scratch_adapter(config: TrainConfig, unet, clip, dino) -> FlexIPAdapter:
    widths = dict(cross_attention_dim=unet.config.cross_attention_dim, clip_embed_dim=clip.config.projection_dim,
                  clip_hidden_dim=clip.config.hidden_size)
    if dino is not None:
        widths["dino_dim"] = dino.config.hidden_size
    branches = [BranchConfig(kind=kind, **widths, **config.adapter_sizes)
                for kind in (config.preservation_kind, config.personalization_kind)]
    with torch.random.fork_rng(devices=[]):  # the same initial weights for the same seed, on every process
        torch.manual_seed(config.seed)
        adapter = FlexIPAdapter(AdapterConfig(*branches, cross_attention_layers(unet)))
    adapter.init_kv_from_unet(unet)
    return adapter


def _initial_adapter(config: TrainConfig, profile, unet, load_clip, load_dino) -> tuple[FlexIPAdapter, object, object]:
    """(adapter, clip, dino) for config.init; DINOv2 is loaded only when the adapter needs it."""
    from flexip_core.loading.sources import resolve_file
    from flexip_core.loading.weights import load_adapter

    clip = load_clip()
    if config.init == "scratch":
        kinds = (config.preservation_kind, config.personalization_kind)
        needs_dino = any("dino" in BranchConfig(kind=kind).needs for kind in kinds)
        dino = load_dino() if needs_dino else None
        return _scratch_adapter(config, unet, clip, dino), clip, dino
    layers = cross_attention_layers(unet)
    if config.init == "profile":
        from flexip_core.loading.assembly import load_adapter_for

        adapter = load_adapter_for(profile, unet)
    elif config.init == "ip_adapter":
        from flexip_core.loading.ip_adapter import adapter_from_ip_adapter_files

        adapter = adapter_from_ip_adapter_files(config.init_preservation, config.init_personalization, layers,
                                                cross_attention_dim=unet.config.cross_attention_dim)
    else:
        adapter = load_adapter(resolve_file(config.init, "init"), layers=layers)
    return adapter, clip, (load_dino() if "dino" in adapter.needs else None)


def load_models(config: TrainConfig, device: torch.device, dtype: torch.dtype) -> tuple[Frozen, FlexIPAdapter]:
    """The frozen base and encoders in `dtype` on `device`, and the trainable adapter in fp32."""
    from diffusers import DDPMScheduler
    from transformers import CLIPVisionModelWithProjection, Dinov2Model

    from flexip_core.generation.encoders import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, SubjectEncoder
    from flexip_core.loading.assembly import apply_overrides, check_encoders, encoder_preprocess, resolve_placeholders
    from flexip_core.loading.profiles import load_profile
    from flexip_core.loading.sources import load_base, load_pretrained
    from flexip_core.training.conditioning import base_family, text_conditioning, text_to_image_class

    profile = resolve_placeholders(apply_overrides(load_profile(config.profile), config.profile_overrides))
    family = base_family(profile.pipeline)  # the task pipeline a profile names is trained as its text-to-image one
    pipe = load_base(profile.base, dtype, config=profile.base_config, lora=profile.lora,
                     pipeline=text_to_image_class(family))
    parts = pipe.components
    unet = parts["unet"]
    text = text_conditioning(family, pipe)
    text.check_unet(unet)

    def load_clip():
        return load_pretrained(CLIPVisionModelWithProjection, profile.clip_encoder, dtype, part="clip_encoder")

    def load_dino():
        if not profile.dino_encoder:
            raise ValueError(f"profile {profile.name!r}: the adapter needs DINOv2 features; "
                             "set profile_overrides.dino_encoder")
        return load_pretrained(Dinov2Model, profile.dino_encoder, dtype, part="dino_encoder")

    adapter, clip, dino = _initial_adapter(config, profile, unet, load_clip, load_dino)
    check_encoders(adapter, clip, dino, profile.clip_encoder, profile.dino_encoder)
    for module in (unet, parts["vae"], *text.modules, clip, dino):
        if module is not None:
            module.to(device, dtype).eval().requires_grad_(False)
    if family == "sdxl" and dtype != torch.float32 and parts["vae"].config.force_upcast:
        parts["vae"].to(torch.float32)  # diffusers' SDXL pipelines and training scripts run this VAE in fp32
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    encoder = SubjectEncoder(
        clip, encoder_preprocess(clip, CLIP_MEAN, CLIP_STD),
        dino, encoder_preprocess(dino, IMAGENET_MEAN, IMAGENET_STD, largest=224) if dino is not None else None,
        needs=adapter.needs,
    )
    noise_scheduler = DDPMScheduler.from_config(parts["scheduler"].config)
    adapter.to(device, torch.float32).train().requires_grad_(True)
    frozen = Frozen(unet, parts["vae"], text, encoder, noise_scheduler, profile.gate_curve, device, dtype)
    return frozen, adapter


@torch.no_grad()
def encode_batch(frozen: Frozen, raw: dict) -> EncodedBatch:
    """Pixels and captions from PairDataset -> latent moments, text states, image features and, for SDXL, pooled
    text and size ids (on CPU)."""
    target = raw["target"]  # (B, 3, R, R)
    posterior = frozen.vae.encode(target.to(frozen.device, frozen.vae.dtype)).latent_dist
    text = frozen.text.encode(raw, frozen.device)  # (B, 77, C), SDXL: (B, P) pooled
    features = frozen.encoder.features_from_pixels(raw["clip"], raw.get("dino"))
    pooled = time_ids = None
    if text.pooled is not None:
        pooled = text.pooled.float().cpu()
        time_ids = sdxl_time_ids(raw["original_size"], raw["crop_top_left"], target.shape[-1])  # (B, 6)
    return EncodedBatch(posterior.mean.float().cpu(), posterior.std.float().cpu(), text.hidden.float().cpu(),
                        features, torch.as_tensor(raw["modality"]).long(), pooled, time_ids)


class EncodedStore:
    """Every record encoded once, indexed by record number (built in shards, one per process, then shared)."""

    def __init__(self, frozen: Frozen, dataset: PairDataset, accelerator, batch_size: int):
        from accelerate.utils import gather_object

        rank, world = accelerator.process_index, accelerator.num_processes
        shard = list(range(rank, len(dataset), world))
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, shard), batch_size=batch_size)
        parts = []
        for raw in loader:
            parts.append((raw["index"].tolist(), encode_batch(frozen, raw)))
        parts = gather_object(parts)
        order = [i for indices, _ in parts for i in indices]
        position = torch.empty(len(dataset), dtype=torch.long)
        position[torch.tensor(order)] = torch.arange(len(order))

        def cat(name):
            tensors = [getattr(b, name) for _, b in parts]
            return None if tensors[0] is None else torch.cat(tensors)[position]

        self.encoded = EncodedBatch(cat("latent_mean"), cat("latent_std"),  # (N, 4, h, w) each
                                    cat("text"), ImageFeatures.cat([b.features for _, b in parts]).map(
                                        lambda t: t[position]),  # (N, 77, C), (N, ...)
                                    cat("modality"), cat("pooled"), cat("time_ids"))  # (N,), SDXL: (N, P), (N, 6)

    def batch(self, indices: list[int]) -> EncodedBatch:
        return self.encoded.select(torch.tensor(indices))


# --- the loss ----------------------------------------------------------------------------------
@dataclass
class Draws:
    """What one micro-step drew for its samples (reported to on_step callbacks and the log)."""

    gammas: torch.Tensor  # (B,) training gamma
    modality: torch.Tensor  # (B,) modality index
    drop_text: torch.Tensor  # (B,) bool
    drop_image: torch.Tensor  # (B,) bool


def training_loss(model, frozen: Frozen, batch: EncodedBatch, config: TrainConfig, generator: torch.Generator,
                  empty_text: torch.Tensor, uncond: ImageFeatures,
                  empty_pooled: torch.Tensor | None = None) -> tuple[torch.Tensor, Draws]:
    """Noise-prediction MSE of one micro-batch with modality-aware gammas and CFG dropout.

    `empty_text` (1, 77, C) and, for SDXL, `empty_pooled` (1, P) stand in for the text of text-dropped samples.
    """
    size = batch.modality.shape[0]
    drop_text, drop_image = draw_dropout(size, config, generator)
    gammas = draw_gammas(batch.modality, config, generator)
    latent_noise = torch.randn(batch.latent_mean.shape, generator=generator)
    noise = torch.randn(batch.latent_mean.shape, generator=generator)
    timesteps = draw_timesteps(size, frozen.noise_scheduler.config.num_train_timesteps, config.timestep_power,
                               generator)

    device = frozen.device
    vae_config = frozen.vae.config
    shift = getattr(vae_config, "shift_factor", None) or 0.0
    spread = batch.latent_std * latent_noise if config.sample_latents else 0.0
    latents = (batch.latent_mean + spread - shift) * vae_config.scaling_factor  # (B, 4, h, w)
    latents, noise, timesteps = latents.to(device), noise.to(device), timesteps.to(device)
    noisy = frozen.noise_scheduler.add_noise(latents, noise, timesteps)
    prediction_type = frozen.noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = frozen.noise_scheduler.get_velocity(latents, noise, timesteps)
    elif prediction_type == "sample":
        target = latents
    else:
        raise ValueError(f"the base scheduler's prediction_type {prediction_type!r} is not supported")

    text = torch.where(drop_text.view(-1, 1, 1), empty_text, batch.text).to(device, frozen.dtype)  # (B, 77, C)
    added = None
    if batch.pooled is not None:  # SDXL: the pooled text drops with the text; the size ids stay
        pooled = torch.where(drop_text.view(-1, 1), empty_pooled, batch.pooled).to(device, frozen.dtype)  # (B, P)
        # fp32 size ids: the UNet embeds them in fp32 (sizes such as 1365 are not exact in bf16)
        added = {"text_embeds": pooled, "time_ids": batch.time_ids.to(device)}  # (B, P), (B, 6)

    def choose(cond, none):
        if cond is None:
            return None
        dropped = drop_image.view(-1, *([1] * (cond.dim() - 1)))  # (B, 1, ...)
        return torch.where(dropped, none.expand_as(cond), cond).to(device)

    feats = [choose(c, u) for c, u in zip((batch.features.clip_embeds, batch.features.clip_hidden, batch.features.dino),
                                          (uncond.clip_embeds, uncond.clip_hidden, uncond.dino))]
    weights = torch.tensor([frozen.gate_curve.weights(float(g), 1.0) for g in gammas], device=device)  # (B, 2)
    prediction = model(noisy.to(frozen.dtype), timesteps, text, *feats, weights[:, 0], weights[:, 1],
                       added_cond_kwargs=added)
    loss = F.mse_loss(prediction.float(), target.float())
    return loss, Draws(gammas, batch.modality.clone(), drop_text, drop_image)


# --- the run -----------------------------------------------------------------------------------
class RunState:
    """Progress that accelerate checkpoints alongside the weights (registered for checkpointing)."""

    def __init__(self, layout: dict):
        self.step = 0  # optimizer steps done
        self.layout = layout  # what the data order depends on: a resume with other values is not the same run
        self.same_layout = True  # False after resuming a checkpoint of another layout
        self.streams: list[dict] = []  # shards: each process's data stream positions (ShardBatches.state)

    def state_dict(self) -> dict:
        return {"step": self.step, **self.layout, "streams": self.streams}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.streams = list(state.get("streams", []))
        changed = {k: (state.get(k), v) for k, v in self.layout.items() if state.get(k) != v}
        self.same_layout = not changed
        if changed:
            logger.warning("resuming with a different layout %s (checkpoint, now): the run continues but will not "
                           "equal an uninterrupted one", changed)


@dataclass
class StepReport:
    """Passed to `on_step` after each optimizer step, on every process."""

    step: int  # optimizer steps done
    loss: float  # loss averaged over micro-steps and processes
    lr: float  # learning rate used
    draws: list[Draws]  # this process's draws, one per micro-step
    seconds: float  # wall time of the step


@dataclass
class TrainResult:
    adapter_path: Path  # the final adapter (native format)
    steps: int  # optimizer steps done in all
    losses: list[float]  # loss of each step run by this call
    seconds_per_step: float  # mean wall time per step, the first step of this call left out when there are several


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.glob("step-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))


def _resume_dir(config: TrainConfig) -> Path | None:
    if config.resume_from is None:
        return None
    if config.resume_from == "latest":
        found = checkpoint_dirs(config.output_dir)
        if not found:
            logger.info("resume_from='latest' but %s has no checkpoint: starting a fresh run", config.output_dir)
        return found[-1] if found else None
    path = Path(config.resume_from)
    if not path.is_dir():
        raise ValueError(f"resume_from: checkpoint folder not found: {path}")
    return path


def _make_accelerator(config: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    log_with = None
    if config.report_to != "none":
        try:
            import tensorboard  # noqa: F401

            log_with = "tensorboard"
        except ImportError:
            if config.report_to == "tensorboard":
                raise ValueError("report_to='tensorboard' but tensorboard is not installed "
                                 "(pip install tensorboard)") from None
    # Without CUDA, accelerate only forms a gloo process group when told to use the CPU.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cpu = not torch.cuda.is_available() and world > 1
    project = ProjectConfiguration(project_dir=config.output_dir, logging_dir=str(Path(config.output_dir) / "logs"))
    accelerator = Accelerator(mixed_precision=config.mixed_precision,
                              gradient_accumulation_steps=config.gradient_accumulation_steps, cpu=cpu,
                              log_with=log_with, project_config=project)
    deepspeed = accelerator.state.deepspeed_plugin
    if deepspeed is not None:  # accelerate --config_file assets/train/accelerate/zero2.yaml
        # No DataLoader goes through accelerator.prepare, so DeepSpeed's "auto" batch size is set here (accelerate's
        # advice), and its clipping follows max_grad_norm
        deepspeed.deepspeed_config["train_micro_batch_size_per_gpu"] = config.train_batch_size
        deepspeed.deepspeed_config["gradient_clipping"] = config.max_grad_norm
    return accelerator


def _weight_dtype(accelerator) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(str(accelerator.mixed_precision), torch.float32)


def _trim_log(path: Path, step: int) -> None:
    """Drop log lines past the resumed step (an interrupted run may have logged steps it never checkpointed)."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


def train(config: TrainConfig, on_step: Callable[[StepReport], None] | None = None) -> TrainResult:
    """Run (or resume) a training run; returns where the final adapter was written."""
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from flexip_core.generation.attention import install_processors, pick_backend
    from flexip_core.loading.weights import save_adapter

    accelerator = _make_accelerator(config)
    if not accelerator.is_main_process:
        logging.getLogger("flexip_core").setLevel(logging.WARNING)  # one copy of each progress message
    output_dir = Path(config.output_dir)
    rank, world = accelerator.process_index, accelerator.num_processes
    logger.info("training on %d process(es), %s, mixed precision %s", world, accelerator.device,
                accelerator.mixed_precision)
    dtype = _weight_dtype(accelerator)

    # 1. Frozen models and the adapter (the main process builds any local models first)
    with accelerator.main_process_first():
        frozen, adapter = load_models(config, accelerator.device, dtype)
    install_processors(frozen.unet, adapter, pick_backend(config.attention, accelerator.device))
    trainable = sum(p.numel() for p in adapter.parameters())
    logger.info("adapter: %s + %s, %d cross-attention layers, %.2fM trainable parameters",
                adapter.config.preservation.kind, adapter.config.personalization.kind, len(adapter.config.layers),
                trainable / 1e6)

    # 2. Data: a manifest's records, or shards streamed
    if config.shards is not None:
        shard_urls = expand_shards(config.shards)
        check_streams(len(shard_urls), world, config.num_workers)
        data_layout = {"shards": len(shard_urls), "num_workers": config.num_workers,
                       "shuffle_buffer": config.shuffle_buffer}
        logger.info("%d shards for %d process(es) x %d data worker(s)", len(shard_urls), world,
                    max(1, config.num_workers))
    else:
        records, _ = read_manifest(config.manifest, config.verify_images, report=accelerator.is_main_process)
        dataset = PairDataset(records, config.resolution, frozen.encoder.clip_preprocess,
                              frozen.encoder.dino_preprocess, frozen.tokenizer)
        data_layout = {"records": len(records)}
    empty = frozen.text.empty(frozen.device).to("cpu", torch.float32)  # (1, 77, C), SDXL: (1, P) pooled
    uncond = frozen.encoder.uncond()  # (1, ...) the "no image" features, as at inference

    # 3. Optimizer, schedule, accelerate
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=config.learning_rate, betas=config.adam_betas,
                                  weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    # accelerate steps a prepared schedule once per process per optimizer step, hence the factor.
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps * world,
                                 num_training_steps=config.max_steps * world)
    model = AdapterTrainingModel(adapter, frozen.unet)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    state = RunState({"seed": config.seed, "world_size": world, "train_batch_size": config.train_batch_size,
                      "gradient_accumulation_steps": config.gradient_accumulation_steps, **data_layout})
    accelerator.register_for_checkpointing(state)

    # 4. Resume
    resume = _resume_dir(config)
    if resume is not None:
        accelerator.load_state(str(resume))
        logger.info("resumed from %s at step %d", resume, state.step)
    log_path = output_dir / "logs" / "train_log.jsonl"
    if accelerator.is_main_process:
        (output_dir / "logs").mkdir(parents=True, exist_ok=True)
        if resume is not None:
            _trim_log(log_path, state.step)
        else:
            log_path.unlink(missing_ok=True)
        (output_dir / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2))
    if accelerator.log_with:
        accelerator.init_trackers("flexip", config={k: v for k, v in config.to_dict().items()
                                                    if isinstance(v, (int, float, str, bool))})
    accelerator.wait_for_everyone()

    # 5. The batch source: shards streamed, or records encoded once up front, or decoded and encoded per micro-step
    accum = config.gradient_accumulation_steps
    shard_batches = None
    if config.shards is not None:
        pixels = PairPixels(config.resolution, frozen.encoder.clip_preprocess, frozen.encoder.dino_preprocess,
                            frozen.tokenizer)
        saved, first_epoch = resume_positions(state.streams, rank, state.same_layout)
        shard_batches = ShardBatches(shard_urls, pixels, seed=config.seed, rank=rank, world_size=world,
                                     batch_size=config.train_batch_size, num_workers=config.num_workers,
                                     shuffle_buffer=config.shuffle_buffer, micro_step=state.step * accum, saved=saved,
                                     first_epoch=first_epoch)
        batches = (encode_batch(frozen, raw) for raw in shard_batches)
    else:
        sampler = StepBatchSampler(len(records), config.train_batch_size, rank, world, config.seed,
                                   start=state.step * accum, stop=config.max_steps * accum)
        if len(records) <= config.precompute_limit:
            store = EncodedStore(frozen, dataset, accelerator, config.encode_batch_size)
            batches = (store.batch(indices) for indices in sampler)
        else:
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=config.num_workers)
            batches = (encode_batch(frozen, raw) for raw in loader)

    # 6. Training loop
    progress = tqdm(total=config.max_steps, initial=state.step, desc="train", disable=not accelerator.is_main_process)
    losses, times = [], []
    params = [p for p in adapter.parameters() if p.requires_grad]
    while state.step < config.max_steps:
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
        micro_losses, draws = [], []
        for k in range(accum):
            micro_step = state.step * accum + k
            batch = next(batches)
            with accelerator.accumulate(model):
                generator = micro_step_generator(config.seed, rank, micro_step)
                loss, drawn = training_loss(model, frozen, batch, config, generator, empty.hidden, uncond,
                                            empty.pooled)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            micro_losses.append(loss.detach())
            draws.append(drawn)
        if not accelerator.sync_gradients:
            raise RuntimeError("gradient accumulation fell out of step with the optimizer; this is a bug")
        state.step += 1
        step_loss = accelerator.reduce(torch.stack(micro_losses).mean(), "mean").item()
        skipped = None
        if shard_batches is not None:  # bad samples every process met during this step
            count = torch.tensor(shard_batches.take_skipped(), device=accelerator.device)
            skipped = int(accelerator.reduce(count, "sum").item())
        if not math.isfinite(step_loss):
            raise ValueError(f"loss became {step_loss} at step {state.step}; lower learning_rate, "
                             "or train in bf16 or without mixed precision")
        seconds = time.perf_counter() - started
        losses.append(step_loss)
        times.append(seconds)
        if accelerator.is_main_process:
            gammas = torch.cat([d.gammas for d in draws])
            modality = torch.cat([d.modality for d in draws])
            entry = {"step": state.step, "loss": step_loss, "lr": lr, "seconds": round(seconds, 4),
                     "processes": world}
            if skipped is not None:
                entry["skipped_samples"] = skipped
            for index, name in enumerate(MODALITIES):
                chosen = gammas[modality == index]
                if len(chosen):
                    entry[f"gamma_{name}"] = round(float(chosen.mean()), 4)
            with log_path.open("a") as handle:
                handle.write(json.dumps(entry) + "\n")
            if accelerator.log_with:
                accelerator.log({"loss": step_loss, "lr": lr}, step=state.step)
            progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
        progress.update(1)
        if config.checkpoint_every and state.step % config.checkpoint_every == 0:
            if shard_batches is not None:  # every process's stream positions, kept by the main process
                from accelerate.utils import gather_object

                state.streams = gather_object([shard_batches.state()])
            _save_checkpoint(accelerator, config, state.step)
        if on_step is not None:
            on_step(StepReport(state.step, step_loss, lr, draws, seconds))
    progress.close()

    # 7. The final adapter, in the native format FlexIPPipeline.from_profile(..., adapter=PATH) loads
    accelerator.wait_for_everyone()
    path = output_dir / ADAPTER_FILE
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(model).adapter
        save_adapter(final, path, metadata={"trained_steps": str(state.step), "profile": config.profile,
                                            "base": str(config.profile_overrides.get("base", "")),
                                            "train_config": json.dumps(config.to_dict())})
        logger.info("wrote %s after %d steps", path, state.step)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    timed = times[1:] if len(times) > 1 else times
    return TrainResult(path, state.step, losses, float(np.mean(timed)) if timed else float("nan"))


def _save_checkpoint(accelerator, config: TrainConfig, step: int) -> None:
    folder = Path(config.output_dir) / "checkpoints" / f"step-{step:06d}"
    accelerator.save_state(str(folder))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and config.checkpoints_total_limit is not None:
        for old in checkpoint_dirs(config.output_dir)[:-config.checkpoints_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    logger.info("checkpoint %s", folder)
