"""GPU check of the animate task: `python benchmarks/gpu_check.py --family animate [--smoke] [--json report.json]`.

FlexIP on diffusers' AnimateDiffPipeline, random weights in the real SD1.5 and AnimateDiff v3 (motion adapter
v1-5-3) architectures, fp16, CFG 7.5, 16 frames at 512x512, DDIM with the motion modules' linear betas:
1. Iterations per second of plain AnimateDiff and of FlexIP with both branches (gate 0.5), each from a 25- and a
   2-step run, so prompt encoding and decoding cancel out.
2. Seconds per 25-step clip (the sd15-animate profile's steps), decoded; its peak GPU memory, the part of it above
   the loaded weights, and what the memory check (video.estimate_clip_memory) predicts for that part.
3. Seconds per clip at the fast profile's 6 LCM steps (guidance 2; AnimateLCM's LoRA is fused, so it costs nothing
   per step), alone and as a sweep of 3 γ in one batch.
--smoke: the same code on CPU with the tiny configs (8 frames at 64 px, 1 and 2 steps): checks that it runs.

Registered in gpu_check.py's CHECKS; its helpers (random models, timing) are gpu_check's, imported when it runs.
"""
from __future__ import annotations

import dataclasses
import gc
import time
from pathlib import Path

import torch

GPU_RUN = (512, 2, 25, 7.5)  # size, steps of the short and the long run, guidance: gpu_check.GPU_RUNS' fields
FRAMES = 16  # frames per clip on the GPU (AnimateDiff's usual clip)
SMOKE_FRAMES = 8  # and in a smoke run
FAST_STEPS, FAST_GUIDANCE = 6, 2.0  # the sd15-animate-fast profile's defaults
SWEEP = (0.2, 0.5, 0.8)  # γ values of the batched sweep


def check_animate(run, folder: Path, report: dict, started: float) -> int:
    """The animate check (module docstring) on gpu_check's `run` settings; fills `report`, returns the exit code."""
    from diffusers import AnimateDiffPipeline, DDIMScheduler

    from benchmarks.gpu_check import (
        GATE,
        PROMPT,
        build,
        flexip_parts,
        iterations_per_second,
        one_image,
        random_photo,
        timed,
    )
    from flexip_core.generation.pipeline import FlexIPPipeline
    from flexip_core.generation.video import estimate_clip_memory

    device, dtype, size, short, long = run.device, run.dtype, run.size, run.short, run.long
    frames = SMOKE_FRAMES if run.smoke else FRAMES
    # SD1.5 (the tiny one in a smoke run), ViT-H/14, IP-Adapter files in the SD1.5 layout
    base, clip, tokenizer, files = build(dataclasses.replace(run, family="sd15"), folder)
    motion = _motion_adapter(run)
    with torch.device(device):  # diffusers creates the UNetMotionModel on the default device: not on the CPU first
        pipe = AnimateDiffPipeline(vae=base["vae"], text_encoder=base["text_encoder"], tokenizer=tokenizer,
                                   unet=base.pop("unet"), motion_adapter=motion, scheduler=base["scheduler"])
    pipe.motion_adapter.to("cpu")  # its weights now live in the UNet
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, beta_schedule="linear")
    pipe.set_progress_bar_config(disable=True)
    gc.collect()
    report.update(build_s=round(time.perf_counter() - started, 1), frames=frames, steps={"short": short, "long": long})
    common = dict(num_frames=frames, height=size, width=size, guidance_scale=run.guidance_scale)

    # 1. plain AnimateDiff, then FlexIP attached to the same pipeline (both branches), latents only
    generator = lambda: torch.Generator("cpu").manual_seed(0)  # noqa: E731
    report["plain_it_s"] = iterations_per_second(device, lambda n: pipe(
        PROMPT, num_inference_steps=n, generator=generator(), output_type="latent", **common), short, long)
    adapter, encoder = flexip_parts(pipe.unet, clip, files)
    flexip = FlexIPPipeline(pipe, encoder=encoder, adapter=adapter)
    subject = flexip.encode_subject([random_photo()])
    report["flexip_backend"] = flexip.backend
    report["flexip_it_s"] = iterations_per_second(device, lambda n: flexip(
        PROMPT, subject=subject, gate=GATE, num_inference_steps=n, **common), short, long)

    # 2. one whole clip, decoded, and its memory
    weights = _allocated(device)
    seconds, peak = one_image(device, lambda: flexip(PROMPT, subject=subject, gate=GATE, num_inference_steps=long,
                                                     **common))
    report["clip_s"], report["clip_peak_gb"], report["weights_gb"] = round(seconds, 2), peak, weights
    estimate = estimate_clip_memory(frames, size, size, clips=1, cfg=run.guidance_scale > 1, dtype=dtype)
    report["estimate_gb"] = round(estimate / 2**30, 2)

    # 3. the fast profile's steps: one clip, and a sweep of 3 γ in one batch
    fast = dict(common, subject=subject, num_inference_steps=FAST_STEPS, guidance_scale=FAST_GUIDANCE, scheduler="lcm")
    flexip(PROMPT, gate=GATE, **dict(fast, num_inference_steps=1))  # warm-up
    report["fast_clip_s"] = round(timed(device, lambda: flexip(PROMPT, gate=GATE, **fast)), 2)
    report["fast_sweep_s"] = round(timed(device, lambda: flexip(PROMPT, gate=list(SWEEP), **fast)), 2)
    return 0


def _motion_adapter(run):
    if run.smoke:
        from flexip_core.loading.tiny import build_tiny_motion_adapter

        return build_tiny_motion_adapter().to(run.device, run.dtype)
    from flexip_core.loading.architectures import build_motion_adapter

    return build_motion_adapter(run.device, run.dtype)


def _allocated(device) -> float | None:
    """GB of GPU memory held now (the loaded weights), after a collection; None off CUDA."""
    gc.collect()
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    return round(torch.cuda.memory_allocated(device) / 2**30, 2)


def print_report(r: dict) -> None:
    size, frames, steps = r["size"], r["frames"], r["steps"]
    print(f"AnimateDiff, {frames} frames at {size}x{size}, CFG {GPU_RUN[3]}; it/s from a {steps['long']}- and a "
          f"{steps['short']}-step run:")
    plain = r["plain_it_s"]
    print(f"plain AnimateDiff      {plain:8.2f} it/s  (1.00x)")
    print(f"FlexIP, both branches  {r['flexip_it_s']:8.2f} it/s  ({r['flexip_it_s'] / plain:.2f}x, "
          f"{r['flexip_backend']})")
    print(f"one {steps['long']}-step clip     {r['clip_s']:8.2f} s per {frames}-frame clip, decoded")
    if r["clip_peak_gb"] is not None:
        above = r["clip_peak_gb"] - r["weights_gb"]
        print(f"  peak GPU memory {r['clip_peak_gb']} GB: weights {r['weights_gb']} GB + {above:.2f} GB while "
              f"making it; the memory check estimates {r['estimate_gb']} GB for that part (margin included)")
    print(f"fast, {FAST_STEPS} LCM steps      {r['fast_clip_s']:8.2f} s per clip; {len(SWEEP)} γ in one batch "
          f"{r['fast_sweep_s']:.2f} s")
    print(f"total {r['total_s']} s (building random models {r['build_s']} s)")
