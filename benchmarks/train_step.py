"""Training-step benchmark (issue 35, item 5): the trainer's own code on the SD1.5 architecture with random weights.

The run's settings come from the paper-scale config (assets/train/sd15-paper.toml: FlexIP's scratch adapters, DINOv2
and CLIP ViT-H/14) at bf16 mixed precision, batch 8 at 512 px, loaded by the trainer's `load_models` from random
models written to disk as local copies; each step is the training loop's own micro-step (flexip_core.training.train,
step 6: `training_loss` with modality-aware γ and dropout, backward, clipping, AdamW), with and without gradient
checkpointing. It prints steps per second and peak GPU memory, the frozen encoders' seconds per batch (at the paper's
scale every batch is encoded as it streams: the VAE, the text encoder, CLIP ViT-H/14 and DINOv2-L), and what one
epoch of the paper's data (12.3 M pairs) costs on 8 GPUs at the measured speed.

    python benchmarks/train_step.py [--json report.json]    # on CUDA (bf16), about 3 minutes on an H100
    python benchmarks/train_step.py --smoke                  # the same code on CPU: the tiny profile, batch 2, 64 px
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

logger = logging.getLogger("train_step")

REPO = Path(__file__).resolve().parent.parent
PAIRS = 12_300_000  # the paper's training pairs (invariant 11.1 M + variant 1.23 M, rounded as the paper gives it)
GPUS = 8  # one node
# (config file, batch, resolution, warm-up steps, timed steps) on CUDA and in a smoke run
RUNS = {"cuda": ("sd15-paper.toml", 8, 512, 2, 10), "smoke": ("tiny.toml", 2, 64, 1, 2)}


def write_sd15(folder: Path, device, dtype) -> Path:
    """Random SD1.5, CLIP ViT-H/14 and DINOv2-L written as local copies, and a profile file naming them (the sd15
    profile's gate curve); returns the profile's path."""
    from transformers import Dinov2Config, Dinov2Model

    from flexip_core.loading.architectures import DINOV2_LARGE, build_sd15, build_vit_h14
    from flexip_core.loading.profiles import PROFILE_DIR
    from flexip_core.loading.tiny import save_base
    from flexip_core.loading.tiny_tokenizer import save_tiny_tokenizer

    base = build_sd15(device, dtype)
    save_base(folder / "base", tokenizer=save_tiny_tokenizer(folder / "tokenizer"), **base)
    build_vit_h14(device, dtype).save_pretrained(folder / "image_encoder", safe_serialization=True)
    with torch.device(device):
        torch.manual_seed(0)
        Dinov2Model(Dinov2Config(**DINOV2_LARGE)).to(dtype).save_pretrained(folder / "dino", safe_serialization=True)
    shipped = json.loads((PROFILE_DIR / "sd15.json").read_text())
    profile = {"name": "sd15-random", "description": "SD1.5 with random weights (benchmarks/train_step.py)",
               "base": str(folder / "base"), "clip_encoder": str(folder / "image_encoder"),
               "dino_encoder": str(folder / "dino"), "gate_curve": shipped["gate_curve"]}
    path = folder / "sd15-random.json"
    path.write_text(json.dumps(profile, indent=2))
    return path


def synthetic_batch(pixels, batch: int, seed: int = 0) -> dict:
    """A collated batch of training items as PairDataset makes them (target, reference crops, caption ids),
    from random photos: half invariant (the reference is the target), half variant."""
    from torch.utils.data import default_collate

    rng = np.random.default_rng(seed)
    items = []
    for i in range(batch):
        target = Image.fromarray(rng.integers(0, 255, (pixels.resolution, pixels.resolution, 3), dtype=np.uint8))
        reference = target if i % 2 == 0 else Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8))
        items.append(pixels(target, reference, "a photo of a dog on the beach", i % 2))
    return default_collate(items)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(config, warmup: int, steps: int) -> dict:
    """Seconds per training step (pre-encoded batch) with and without gradient checkpointing, peak GPU memory of
    each, and seconds per batch of the frozen encoders; the models are loaded once by the trainer's own loader."""
    from accelerate import Accelerator

    from flexip_core.generation.attention import install_processors, pick_backend
    from flexip_core.training.data import PairPixels
    from flexip_core.training.train import (
        AdapterTrainingModel,
        encode_batch,
        load_models,
        micro_step_generator,
        training_loss,
    )

    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    device = accelerator.device
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(str(accelerator.mixed_precision), torch.float32)
    frozen, adapter = load_models(config, device, dtype)
    install_processors(frozen.unet, adapter, pick_backend(config.attention, device))
    pixels = PairPixels(config.resolution, frozen.encoder.clip_preprocess, frozen.encoder.dino_preprocess,
                        frozen.tokenizer)
    raw = synthetic_batch(pixels, config.train_batch_size)
    empty = frozen.text.empty(device).to("cpu", torch.float32)  # (1, 77, C)
    uncond = frozen.encoder.uncond()
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=config.learning_rate, betas=config.adam_betas,
                                  weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    model, optimizer = accelerator.prepare(AdapterTrainingModel(adapter, frozen.unet), optimizer)
    params = [p for p in adapter.parameters() if p.requires_grad]
    out = {"trainable_parameters_m": round(sum(p.numel() for p in params) / 1e6, 1)}

    def encode() -> object:
        return encode_batch(frozen, raw)

    batch = encode()
    encode_times = []
    for _ in range(steps):
        sync(device)
        started = time.perf_counter()
        batch = encode()
        sync(device)
        encode_times.append(time.perf_counter() - started)
    out["encode_s"] = float(np.median(encode_times))

    def step(index: int) -> float:  # flexip_core.training.train's loop body (step 6), one micro-step per step
        sync(device)
        started = time.perf_counter()
        with accelerator.accumulate(model):
            generator = micro_step_generator(config.seed, 0, index)
            loss, _ = training_loss(model, frozen, batch, config, generator, empty.hidden, uncond, empty.pooled)
            accelerator.backward(loss)
            if accelerator.sync_gradients and config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss.item()  # the loop reads the loss every step, as train() logs it
        sync(device)
        return time.perf_counter() - started

    for checkpointing in (False, True):
        if checkpointing:
            frozen.unet.enable_gradient_checkpointing()  # what load_models does for gradient_checkpointing = true
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        for i in range(warmup):
            step(i)
        times = [step(warmup + i) for i in range(steps)]
        name = "checkpointing" if checkpointing else "plain"
        out[name] = {"step_s": float(np.median(times)), "steps_per_s": round(1.0 / float(np.median(times)), 3),
                     "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda"
                     else None}
    return out


def epoch_cost(step_s: float, encode_s: float, batch: int, gpus: int = GPUS, pairs: int = PAIRS) -> dict:
    """One epoch of `pairs` on `gpus` data-parallel GPUs at `batch` per GPU: optimizer steps, hours and GPU-hours,
    with the batches pre-encoded and encoded as they stream (the gradient all-reduce of the adapter not counted)."""
    steps = math.ceil(pairs / (gpus * batch))
    hours = {"pre_encoded": steps * step_s / 3600, "encoding_each_batch": steps * (step_s + encode_s) / 3600}
    return {"pairs": pairs, "gpus": gpus, "batch_per_gpu": batch, "steps": steps,
            "hours": {k: round(v, 1) for k, v in hours.items()},
            "gpu_hours": {k: round(v * gpus, 1) for k, v in hours.items()}}


def print_report(r: dict) -> None:
    print(f"{r['device']}: {r['architecture']} (random weights), {r['mixed_precision']}, batch {r['batch']} at "
          f"{r['resolution']} px, {r['trainable_parameters_m']} M trainable adapter parameters")
    print(f"frozen encoders (VAE, text, CLIP, DINOv2) per batch: {r['encode_s']:.3f} s")
    for name in ("plain", "checkpointing"):
        v = r[name]
        memory = f", peak GPU memory {v['peak_gb']} GB" if v["peak_gb"] is not None else ""
        print(f"training step, {'gradient checkpointing' if name == 'checkpointing' else 'no checkpointing':<22} "
              f"{v['steps_per_s']:7.3f} steps/s ({v['step_s']:.3f} s){memory}")
        e = r["epoch"][name]
        print(f"  one epoch of {e['pairs'] / 1e6:.1f} M pairs on {e['gpus']} GPUs at {e['batch_per_gpu']} per GPU: "
              f"{e['steps']:,} steps, {e['hours']['pre_encoded']:,} h ({e['gpu_hours']['pre_encoded']:,} GPU-hours) "
              f"pre-encoded; {e['hours']['encoding_each_batch']:,} h "
              f"({e['gpu_hours']['encoding_each_batch']:,} GPU-hours) encoding each batch as it streams")
    print(f"total {r['total_s']} s")


def main(argv: list[str] | None = None) -> int:
    """Time the trainer's step and print what an epoch of the paper's data costs.

    Args:
        argv: command-line arguments: --smoke (CPU, the tiny profile and tiny.toml, batch 2 at 64 px), --json PATH.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, the tiny profile: checks the script runs")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from diffusers.utils import logging as diffusers_logging

    from flexip_core.training.config import load_config

    diffusers_logging.set_verbosity_error()
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA GPU: run with --smoke on CPU", file=sys.stderr)
        return 2
    started = time.perf_counter()
    config_name, batch, resolution, warmup, steps = RUNS["smoke" if args.smoke else "cuda"]
    if args.smoke:
        torch.set_num_threads(1)  # the tiny models on shared cores: see gpu_check's smoke run
    with tempfile.TemporaryDirectory(prefix="train-step-") as folder:
        profile = "tiny" if args.smoke else str(write_sd15(Path(folder), torch.device("cuda"), torch.bfloat16))
        config = load_config(REPO / "assets" / "train" / config_name, {
            "profile": profile, "manifest": str(Path(folder) / "unused.jsonl"), "shards": None,
            "output_dir": str(Path(folder) / "run"), "train_batch_size": batch, "resolution": resolution,
            "gradient_accumulation_steps": 1, "mixed_precision": "bf16", "gradient_checkpointing": False,
            "report_to": "none", "num_workers": 0})
        figures = measure(config, warmup, steps)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else "CPU (smoke run)"
    report = {"date": datetime.date.today().isoformat(), "device": device, "torch": torch.__version__,
              "config": f"assets/train/{config_name}", "architecture": "the tiny models" if args.smoke else "SD1.5",
              "mixed_precision": "bf16", "batch": batch,
              "resolution": resolution, "timed_steps": steps, **figures,
              "epoch": {name: epoch_cost(figures[name]["step_s"], figures["encode_s"], batch)
                        for name in ("plain", "checkpointing")}}
    report["total_s"] = round(time.perf_counter() - started, 1)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
