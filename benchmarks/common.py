"""What every benchmark shares: run modes, interleaved timing, random models in the real architectures, results."""
from __future__ import annotations

import copy
import itertools
import logging
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Mode:
    """How big and how often: one instance per command-line mode."""

    name: str  # "quick" (default), "full" or "smoke"
    arch: str  # "sd15": SD1.5 + ViT-H/14 + DINOv2-L architectures with random weights; "tiny": the test models
    size: int  # generated image side in pixels (latents are size / 8)
    steps: int  # denoising steps of a generation (items 2 and 5)
    sweep_steps: int  # denoising steps of each sweep run (item 3)
    warmup: int  # untimed runs of each case before timing (first calls pay for allocation)
    unet_rounds: int  # interleaved rounds of UNet steps (item 1)
    slider_rounds: int  # interleaved (first generation, slider move) pairs (item 2)
    sweep_rounds: int  # interleaved (batched, sequential) pairs (item 3)
    releases: int  # slider releases timed through the server (item 5)
    flops_size: int | None = None  # also count UNet-step FLOPs (not time) at this image side; None: skip
    sweep_gates: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)  # the γ values of item 3


MODES = {
    "quick": Mode("quick", "sd15", size=128, steps=4, sweep_steps=2, warmup=1, unet_rounds=5, slider_rounds=2,
                  sweep_rounds=2, releases=4, flops_size=512),
    "full": Mode("full", "sd15", size=128, steps=10, sweep_steps=4, warmup=2, unet_rounds=15, slider_rounds=4,
                 sweep_rounds=4, releases=15, flops_size=512),
    "smoke": Mode("smoke", "tiny", size=64, steps=2, sweep_steps=2, warmup=1, unet_rounds=2, slider_rounds=1,
                  sweep_rounds=1, releases=2),
}

PROMPT = "a photo of sks dog on the beach"


# --- results -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """A figure with a limit: printed last as `TARGET name: ratio X.XX (<= Y) PASS|FAIL`."""

    name: str  # short identifier, e.g. "unet_flexip_vs_plain"
    value: float | None  # the measured ratio or count (None: not measured)
    limit: float  # the largest value that passes
    kind: str = "ratio"  # "ratio" or "count" (how the value is printed)

    @property
    def passed(self) -> bool:
        return self.value is not None and self.value <= self.limit

    def line(self) -> str:
        limit = f"{self.limit:.2f}" if self.kind == "ratio" else f"{self.limit:g}"
        if self.value is None:
            return f"TARGET {self.name}: not measured (<= {limit}) FAIL"
        shown = f"ratio {self.value:.2f}" if self.kind == "ratio" else f"count {self.value:g}"
        return f"TARGET {self.name}: {shown} (<= {limit}) {'PASS' if self.passed else 'FAIL'}"


@dataclass
class Section:
    """One numbered benchmark: table rows, targets, notes and the raw figures written to JSON."""

    number: int  # 1 to 5, the item
    title: str  # one line naming what is compared
    rows: list[tuple[str, str]] = field(default_factory=list)  # (figure, value) lines of the table
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # why a target misses, what was skipped, caveats
    data: dict = field(default_factory=dict)  # raw seconds, bytes and settings
    skipped: str | None = None  # reason, when the section could not run

    def add(self, figure: str, value: str) -> None:
        self.rows.append((figure, value))


def seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1.0 else f"{value:.2f} s"


def gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.2f} GiB"


# --- timing ------------------------------------------------------------------------------------------------
@dataclass
class Timings:
    """Seconds per case and round: wall clock (what a user waits) and this process's CPU time (user + system,
    less disturbed by other processes taking turns on the cores)."""

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]


def interleaved(cases: dict[str, Callable[[], object]], rounds: int, warmup: int, rotate: bool = True) -> Timings:
    """Run each case once per round (in an order that rotates each round when `rotate`) and time it.

    Cases measured side by side share the machine's noise (other users of the two cores), so their ratio is
    meaningful where their absolute times are not. The warm-up runs are not kept.
    """
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    timings = Timings({name: [] for name in names}, {name: [] for name in names})
    for r in range(rounds):
        shift = r % len(names) if rotate else 0
        for name in names[shift:] + names[:shift]:
            wall, cpu = time.perf_counter(), time.process_time()
            cases[name]()
            timings.cpu[name].append(time.process_time() - cpu)
            timings.wall[name].append(time.perf_counter() - wall)
            logger.debug("%s: %.3f s wall, %.3f s CPU", name, timings.wall[name][-1], timings.cpu[name][-1])
    return timings


def median(values: list[float]) -> float:
    return statistics.median(values)


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median of the per-round ratios: robust to the load changing between rounds."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def ratio_spread(numerator: list[float], denominator: list[float]) -> str:
    """'min..max' of the per-round ratios: how far one round can be from another on this machine."""
    ratios = [a / b for a, b in zip(numerator, denominator)]
    return f"{min(ratios):.2f}..{max(ratios):.2f}"


# --- machine -----------------------------------------------------------------------------------------------
def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    memory = None
    try:
        with open("/proc/meminfo") as handle:
            memory = int(next(line for line in handle if line.startswith("MemTotal")).split()[1]) * 1024
    except (OSError, StopIteration):
        pass
    import diffusers
    import transformers

    return dict(cpu=cpu, cores=os.cpu_count(), torch_threads=torch.get_num_threads(), memory_bytes=memory,
                load_average=round(os.getloadavg()[0], 2),
                python=platform.python_version(), torch=torch.__version__, diffusers=diffusers.__version__,
                transformers=transformers.__version__, system=f"{platform.system()} {platform.release()}")


def describe_machine(info: dict) -> str:
    memory = gib(info["memory_bytes"]) if info.get("memory_bytes") else "? GiB"
    return (f"{info['cpu']}, {info['cores']} cores (torch threads {info['torch_threads']}), {memory} RAM, "
            f"{info['system']}, Python {info['python']}, torch {info['torch']}, diffusers {info['diffusers']}, "
            f"transformers {info['transformers']}; load average {info['load_average']} at the start "
            f"(other users of the cores)")


# --- photos ------------------------------------------------------------------------------------------------
def synthetic_photo(seed: int, size: int = 256) -> Image.Image:
    """A reproducible RGB 'subject photo' (a blob on a gradient); a new seed gives new pixels, so a new
    encoding. The benchmarks need no photo files, so they run from a clean clone."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([xx, yy, 1 - xx], -1) * rng.uniform(0.3, 1.0, 3)  # (S, S, 3)
    cx, cy, radius = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
    blob = ((xx - cx) ** 2 + (yy - cy) ** 2 < radius**2)[..., None]
    pixels = np.where(blob, rng.uniform(0, 1, 3), base) + rng.normal(0, 0.03, (size, size, 3))
    return Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8))


# --- random models in the real architectures ----------------------------------------------------------------
def fill_random(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights in the usual scale (uniform ±1/sqrt(fan_in); norms 1, biases 0), written fast.

    Drawing 2 G random numbers costs minutes on a 2-core CPU; a 1 M-value random pool tiled over each tensor
    costs a memory copy. Timings do not depend on the values, only on their being finite and not denormal.
    """
    generator = torch.Generator().manual_seed(seed)
    pool = torch.rand(2**20, generator=generator) * 2 - 1  # (P,) in [-1, 1)
    offsets = itertools.count(0, 7919)
    with torch.no_grad():
        for name, param in itertools.chain(module.named_parameters(), module.named_buffers()):
            if not param.is_floating_point():
                continue  # integer buffers such as position ids keep their computed values
            if param.dim() < 2:
                if name.endswith("bias"):
                    param.zero_()
                elif param.dim() == 1 and "." in name:  # norm weights, layer scales
                    param.fill_(1.0)
                continue
            flat = param.view(-1)
            scale = 1.0 / math.sqrt(param[0].numel())
            start = next(offsets) % pool.numel()
            rolled = torch.cat([pool[start:], pool[:start]]) * scale
            for i in range(0, flat.numel(), rolled.numel()):
                chunk = flat[i:i + rolled.numel()]
                chunk.copy_(rolled[: chunk.numel()])
    return module


def build_random(factory: Callable[[], torch.nn.Module], seed: int = 0) -> torch.nn.Module:
    """`factory()` with the libraries' slow weight initialisation skipped, then fill_random; eval mode."""
    from transformers.initialization import no_init_weights

    with no_init_weights():
        module = factory()
    return fill_random(module, seed).eval().requires_grad_(False)


def shared_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A structural copy whose parameters and buffers are the original tensors: no extra weight memory, so
    two attention-processor set-ups of one UNet can be timed side by side."""
    memo = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo)


@dataclass
class Bench:
    """The models one run measures: a FlexIPPipeline plus what the comparisons need."""

    pipe: object  # flexip_core.FlexIPPipeline, FlexIP processors installed on pipe.unet
    arch: str  # "sd15" or "tiny"
    description: str  # one line naming the architectures
    encoder_params: int  # parameters of the image encoders (CLIP + DINOv2)


def sd15_pipeline(mode: Mode):
    """FlexIPPipeline over random SD1.5, OpenCLIP ViT-H/14 and DINOv2-L (configs: flexip_core.loading.architectures)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        Dinov2Config,
        Dinov2Model,
    )

    from flexip_core import FlexIPPipeline
    from flexip_core.generation.adapter_config import AdapterConfig, BranchConfig
    from flexip_core.generation.adapters import FlexIPAdapter, cross_attention_layers
    from flexip_core.generation.encoders import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, SubjectEncoder
    from flexip_core.loading import architectures as arch
    from flexip_core.loading.assembly import encoder_preprocess
    from flexip_core.loading.profiles import Defaults, Profile
    from flexip_core.loading.tiny_tokenizer import save_tiny_tokenizer

    started = time.perf_counter()
    unet = build_random(lambda: UNet2DConditionModel(**arch.SD15_UNET), seed=1)
    vae = build_random(lambda: AutoencoderKL(**arch.SD15_VAE), seed=2)
    text_encoder = build_random(lambda: CLIPTextModel(CLIPTextConfig(**arch.SD15_TEXT_ENCODER)), seed=3)
    clip = build_random(lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**arch.VIT_H14_VISION)), seed=4)
    dino = build_random(lambda: Dinov2Model(Dinov2Config(**arch.DINOV2_LARGE)), seed=5)
    config = AdapterConfig(BranchConfig("flexip_preservation"), BranchConfig("flexip_personalization"),
                           cross_attention_layers(unet))
    adapter = build_random(lambda: FlexIPAdapter(config), seed=6)
    with tempfile.TemporaryDirectory() as folder:  # the tiny BPE vocabulary: other ids than CLIP's, same cost
        tokenizer = save_tiny_tokenizer(Path(folder))
    encoder = SubjectEncoder(clip, encoder_preprocess(clip, CLIP_MEAN, CLIP_STD), dino,
                             encoder_preprocess(dino, IMAGENET_MEAN, IMAGENET_STD, largest=224), needs=adapter.needs)
    profile = Profile(name="sd15-architecture-random", base="(random SD1.5 architecture)",
                      clip_encoder="(random ViT-H/14)", dino_encoder="(random DINOv2-L)",
                      description="benchmark: random weights in the real architectures",
                      defaults=Defaults(height=mode.size, width=mode.size, num_inference_steps=mode.steps,
                                        guidance_scale=7.5, scheduler="dpmpp_2m", max_side=1024), dtype="float32")
    sd = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                 scheduler=PNDMScheduler.from_config(arch.SD15_SCHEDULER), safety_checker=None,
                                 feature_extractor=None, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    pipe = FlexIPPipeline(sd, encoder=encoder, adapter=adapter, profile=profile, attention="sdpa")
    logger.info("built the random sd15-architecture pipeline in %.0f s", time.perf_counter() - started)
    return pipe


def tiny_pipeline(mode: Mode):
    from flexip_core import FlexIPPipeline

    return FlexIPPipeline.from_profile("tiny", device="cpu", dtype="float32", attention="sdpa")


def build_bench(mode: Mode) -> Bench:
    pipe = sd15_pipeline(mode) if mode.arch == "sd15" else tiny_pipeline(mode)
    encoders = [pipe.encoder.clip] + ([pipe.encoder.dino] if pipe.encoder.dino is not None else [])
    params = sum(p.numel() for m in encoders for p in m.parameters())
    unet_params = sum(p.numel() for p in pipe.unet.parameters())
    kind = "SD1.5 UNet/VAE/text encoder, OpenCLIP ViT-H/14, DINOv2-L" if mode.arch == "sd15" else "tiny test"
    description = (f"{kind} architectures, random weights, fp32, CPU (UNet {unet_params / 1e6:.0f} M parameters, "
                   f"image encoders {params / 1e6:.0f} M)")
    return Bench(pipe=pipe, arch=mode.arch, description=description, encoder_params=params)
