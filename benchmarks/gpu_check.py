"""GPU check for a lent card: the real SD1.5 or SDXL architecture with random weights (no Hub), fp16.

--family sd15 (the default), 512x512:
1. xformers and SDPA agree on one UNet step with FlexIP's gated processor, both branches on (max abs diff <= 2e-3).
2. Iterations per second of plain SD, diffusers' IP-Adapter (Plus) and FlexIP with both branches; each from
   the difference of a long and a short run, so text encoding and VAE decoding cancel out.
3. Seconds for one 4-step fast-profile image (LoRA fused, LCM scheduler, no CFG), subject already encoded.
4. Peak GPU memory of one FlexIP image with and without the low-VRAM option.
5. Issue 35 (benchmarks/gpu_speed.py, gpu_server.py): FlexIP fused (one attention call for the text and both
   branches, the default) and unfused side by side, and channels-last (--compile: also compiled, CUDA graphs), with
   the operations each dispatches per UNet step; then the real studio server (app.py) on the random weights written
   to disk: slider release -> first preview and -> final image for sd15 (20 steps) and sd15-fast (4 steps), a
   5-γ sweep batched vs sequential (--no-server leaves it out); the targets against the figures, printed last.

--family sdxl, 1024x1024 (SDXL base 1.0, ViT-H/14 IP-Adapter files in the published sdxl_models layout):
1. Iterations per second of plain SDXL (SDPA), diffusers' IP-Adapter Plus SDXL (scale 0.6) and FlexIP with both
   branches (gate 0.5, SDPA), from a 13-step and a 3-step run; plain diffusers returns latents, so its fp16 VAE
   (which overflows at 1024 px) never runs, and FlexIP decodes in fp32 as it does for users (force_upcast).
2. Seconds and peak GPU memory of one 13-step FlexIP image with and without the low-VRAM option.
3. Seconds for one 13-step FlexIP image through ControlNet (a random ControlNet copied from the UNet) and through
   inpainting (the base's 4-channel UNet and a mask).

    python benchmarks/gpu_check.py [--json report.json]                 # on CUDA, ~6 minutes on an H100 (estimated)
    python benchmarks/gpu_check.py --family sdxl [--json report.json]   # on CUDA, sized for well under 4 minutes
    python benchmarks/gpu_check.py [--family sdxl] --smoke              # the same code on CPU with the tiny configs

--family animate: FlexIP on AnimateDiff, seconds per 16-frame 512x512 clip and its memory (benchmarks/gpu_animate.py).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import gpu_server, gpu_speed
from flexip_core.generation.adapters import cross_attention_layers
from flexip_core.generation.attention import BranchInputs, install_processors, xformers_available, xformers_usable
from flexip_core.generation.encoders import CLIP_MEAN, CLIP_STD, Preprocess, SubjectEncoder
from flexip_core.generation.pipeline import FlexIPPipeline
from flexip_core.loading.ip_adapter import adapter_from_ip_adapter_files
from flexip_core.loading.tiny import write_lora, write_synthetic_ip_adapter_files
from flexip_core.loading.tiny_tokenizer import save_tiny_tokenizer

logger = logging.getLogger("gpu_check")
PROMPT = "a photo of a dog on the beach, watercolor"
TOLERANCE = 2e-3  # xformers vs SDPA, one UNet step in fp16
IP_ADAPTER_SCALE = 0.6  # diffusers' IP-Adapter Plus, as in a typical slider setting
GATE = 0.5  # FlexIP: both branches on


@dataclass(frozen=True)
class Settings:
    """Where and at what size one check runs."""

    family: str  # "sd15" or "sdxl"
    smoke: bool  # CPU, fp32, the tiny configs: checks that the script runs
    device: torch.device
    dtype: torch.dtype
    size: int  # image side in pixels
    short: int  # steps of the short run (and of each warm-up)
    long: int  # steps of the long run, and of each single timed image (SDXL)
    guidance_scale: float  # each family's usual CFG scale
    server: bool = True  # sd15: also time the real studio server (app.py) on the random weights
    compile: bool = False  # sd15: also time FlexIP with the UNet compiled (minutes of compiling on a GPU)


# family -> (size, short, long, guidance) on CUDA; a smoke run is 64 px, 1 and 2 steps
GPU_RUNS = {"sd15": (512, 5, 25, 7.5), "sdxl": (1024, 3, 13, 5.0)}


def settings(family: str, smoke: bool) -> Settings | None:
    """The run's settings, or None when it needs CUDA and there is none."""
    guidance = GPU_RUNS[family][3]
    if smoke:
        # one thread: the tiny models are bound by per-op overhead, and on shared cores several threads wait on each
        # other (a tiny SDXL step went from 0.03 s to 1.5 s on 2 busy cores)
        torch.set_num_threads(1)
        return Settings(family, True, torch.device("cpu"), torch.float32, 64, 1, 2, guidance)
    if not torch.cuda.is_available():
        return None
    torch.backends.cuda.matmul.allow_tf32 = True
    size, short, long, guidance = GPU_RUNS[family]
    return Settings(family, False, torch.device("cuda"), torch.float16, size, short, long, guidance)


# --- timing --------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device, fn) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def iterations_per_second(device, run, short: int, long: int) -> float:
    """(long - short) / (t_long - t_short): fixed costs (prompt encoding, VAE decoding) cancel."""
    run(short)  # warm-up (kernel selection, allocator)
    t_short = timed(device, lambda: run(short))
    t_long = timed(device, lambda: run(long))
    return (long - short) / max(t_long - t_short, 1e-9)


def one_image(device, fn) -> tuple[float, float | None]:
    """(seconds, peak GPU memory in GB; None off CUDA) of one call, started from an emptied allocator."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    seconds = timed(device, fn)
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None
    return seconds, peak


# --- models --------------------------------------------------------------------------------------------------
def build(run: Settings, folder: Path):
    """Random base (its components by name), CLIP encoder, tokenizer and synthetic IP-Adapter files in the
    published layout of the family."""
    device, dtype = run.device, run.dtype
    sizes = {}
    if run.smoke:
        from flexip_core.loading.tiny import build_tiny_base, build_tiny_encoders, build_tiny_sdxl_base

        base = build_tiny_sdxl_base() if run.family == "sdxl" else build_tiny_base()
        clip, _ = build_tiny_encoders()
        base = {k: (v.to(device, dtype) if isinstance(v, torch.nn.Module) else v) for k, v in base.items()}
        clip = clip.to(device, dtype)
    else:
        from flexip_core.loading.architectures import IP_ADAPTER_PLUS_SDXL_VIT_H, build_sd15, build_sdxl, build_vit_h14

        base = build_sdxl(device, dtype) if run.family == "sdxl" else build_sd15(device, dtype)
        clip = build_vit_h14(device, dtype)
        if run.family == "sdxl":  # the published Plus SDXL resampler: 1280 wide, 20 heads (SD1.5's is the width)
            sizes = dict(resampler_dim=IP_ADAPTER_PLUS_SDXL_VIT_H.resampler_dim)
    tokenizer = save_tiny_tokenizer(folder / "tokenizer")  # ids stay inside any vocabulary; no download
    # SD1.5 writes both formats as it always has; SDXL's files are 1.4 GB each in fp32, so safetensors only
    formats = ("safetensors", "bin") if run.family == "sd15" else ("safetensors",)
    files = write_synthetic_ip_adapter_files(base["unet"], folder / "ip", clip_embed_dim=clip.config.projection_dim,
                                             clip_hidden_dim=clip.config.hidden_size, family=run.family,
                                             formats=formats, **sizes)
    return base, clip, tokenizer, files


def flexip_parts(unet, clip, files) -> tuple:
    """FlexIP's adapter (Plus file -> preservation, plain file -> personalization) and its subject encoder."""
    adapter = adapter_from_ip_adapter_files(files[("plus", "safetensors")], files[("plain", "safetensors")],
                                            cross_attention_layers(unet),
                                            cross_attention_dim=unet.config.cross_attention_dim)
    encoder = SubjectEncoder(clip, Preprocess(clip.config.image_size, CLIP_MEAN, CLIP_STD), needs=adapter.needs)
    return adapter, encoder


def ip_adapter_it_s(run: Settings, pipe, plus: Path, subject, **call) -> float:
    """it/s of `pipe` with diffusers' own IP-Adapter Plus (load_ip_adapter, scale 0.6), its image embeddings
    computed once as in a slider move; the adapter is unloaded again."""
    pipe.load_ip_adapter(str(plus.parent), subfolder="", weight_name=plus.name, image_encoder_folder=None)
    pipe.set_ip_adapter_scale(IP_ADAPTER_SCALE)
    embeds = torch.cat([subject.uncond.clip_hidden, subject.features.clip_hidden])[:, None]  # (2, 1, 1 + P, H)
    embeds = embeds.to(run.device, run.dtype)
    speed = iterations_per_second(run.device, lambda n: pipe(
        PROMPT, ip_adapter_image_embeds=[embeds], num_inference_steps=n,
        generator=torch.Generator("cpu").manual_seed(0), **call), run.short, run.long)
    pipe.unload_ip_adapter()
    return speed


def low_vram_image(run: Settings, pipe, encoder, adapter, steps: int, **call) -> tuple[float, float | None]:
    """(seconds, peak GB) of one FlexIP image with the low-VRAM option (model CPU offload, VAE tiling and slicing)
    on the diffusers pipeline `pipe`, from which any other FlexIP has been detached."""
    low = FlexIPPipeline(pipe, encoder=encoder, adapter=adapter, device=run.device, low_vram=True)
    return one_image(run.device, lambda: low(PROMPT, gate=GATE, num_inference_steps=steps, scheduler=None, **call))


def backend_agreement(pipe: FlexIPPipeline, subject, backends: tuple[str, str], size: int) -> float:
    """Max abs difference of one UNet step (CFG batch, both branches at 0.5) between two attention backends."""
    unet = pipe.unet
    latents, text, pres, pers, weights = gpu_speed.step_inputs(pipe, subject, size)  # both branches at 0.5
    outputs = []
    with torch.no_grad():
        for backend in backends:
            install_processors(unet, pipe.adapter, backend)
            inputs = BranchInputs(pres, pers, weights, weights, True, True)
            outputs.append(unet(latents, 500, encoder_hidden_states=text, cross_attention_kwargs={"flexip": inputs},
                                return_dict=False)[0].float())
    install_processors(unet, pipe.adapter, pipe.backend)
    return float((outputs[0] - outputs[1]).abs().max())


def random_photo() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8))


# --- the checks ----------------------------------------------------------------------------------------------
def check_sd15(run: Settings, folder: Path, report: dict, started: float) -> int:
    """The SD1.5 check (module docstring); fills `report` (build_s counted from `started`), returns the exit code."""
    device, size, short, fast_steps = run.device, run.size, run.short, 4
    base, clip, tokenizer, files = build(run, folder)
    report["build_s"] = round(time.perf_counter() - started, 1)
    unet, vae, text_encoder, scheduler = base["unet"], base["vae"], base["text_encoder"], base["scheduler"]
    photo = random_photo()
    common = dict(height=size, width=size, guidance_scale=run.guidance_scale)

    # 1. plain SD (diffusers, SDPA)
    from diffusers import StableDiffusionPipeline
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())
    sd = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                 scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                 requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    report["plain_sd_it_s"] = iterations_per_second(device, lambda n: sd(
        PROMPT, num_inference_steps=n, generator=torch.Generator("cpu").manual_seed(0), **common), short, run.long)

    # 2. diffusers' IP-Adapter (Plus, scale 0.6), image embeddings computed once as in a slider move
    adapter, encoder = flexip_parts(unet, clip, files)
    subject = encoder.encode_subject([photo])
    report["diffusers_ip_adapter_it_s"] = ip_adapter_it_s(run, sd, files[("plus", "safetensors")], subject, **common)

    # 3. FlexIP, both branches (gate 0.5), the base scheduler as above
    pipe = FlexIPPipeline(sd, encoder=encoder, adapter=adapter)  # attached to the same diffusers pipeline
    subject = pipe.encode_subject([photo])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    report["flexip_backend"] = pipe.backend
    report["flexip_it_s"] = iterations_per_second(device, lambda n: pipe(
        PROMPT, subject=subject, gate=GATE, num_inference_steps=n, scheduler=None, **common), short, run.long)
    if device.type == "cuda":
        report["flexip_peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if pipe.backend == "xformers":  # the same run on SDPA, for the ratio
        install_processors(unet, adapter, "sdpa")
        pipe.backend = "sdpa"
        report["flexip_sdpa_it_s"] = iterations_per_second(device, lambda n: pipe(
            PROMPT, subject=subject, gate=GATE, num_inference_steps=n, scheduler=None, **common), short, run.long)
        pipe.backend = "xformers"
        install_processors(unet, adapter, "xformers")
    # FlexIP fused and unfused on SDPA, channels-last, compiled (--compile); the operations of one step of each
    flexip_speed = lambda flexip: iterations_per_second(device, lambda n: flexip(
        PROMPT, subject=subject, gate=GATE, num_inference_steps=n, scheduler=None, **common), short, run.long)
    gpu_speed.attention_variants(run, pipe, subject, report, flexip_speed, channels_last=True, compile=run.compile,
                                 warm=lambda flexip: flexip(PROMPT, subject=subject, gate=GATE, num_inference_steps=2,
                                                            scheduler=None, **common))

    # 4. xformers vs SDPA on one UNet step
    xformers_problem = xformers_usable(str(device)) if device.type == "cuda" else "no CUDA"
    if xformers_problem is None:
        diff = backend_agreement(pipe, subject, ("sdpa", "xformers"), size)
        report["backend_agreement"] = {"backends": "sdpa vs xformers", "max_abs_diff": diff, "ok": diff <= TOLERANCE}
    elif run.smoke:  # exercises the code path only
        diff = backend_agreement(pipe, subject, ("sdpa", "sdpa"), size)
        report["backend_agreement"] = {"backends": "sdpa vs sdpa (smoke)", "max_abs_diff": diff, "ok": diff == 0.0}
    else:
        report["backend_agreement"] = {"backends": f"skipped: {xformers_problem}", "ok": None}

    # 5. one 4-step fast-profile image: a LoRA fused through diffusers (as sd15-fast), LCM scheduler, no CFG
    from flexip_core.loading.sources import load_lora

    lora = write_lora(unet, folder / "lora" / "pytorch_lora_weights.safetensors", std=0.01)
    load_lora(sd, str(lora))  # fuses into the UNet that `pipe` shares
    fast = dict(subject=subject, gate=GATE, num_inference_steps=fast_steps, guidance_scale=1.0, scheduler="lcm",
                height=size, width=size)
    pipe(PROMPT, **fast)  # warm-up
    report["fast_image_s"] = timed(device, lambda: pipe(PROMPT, **fast))

    # 6. peak memory with the low-VRAM option (model CPU offload, VAE tiling and slicing)
    if device.type == "cuda":
        pipe.detach()
        seconds, peak = low_vram_image(run, sd, encoder, adapter, short, subject=subject, **common)
        report["low_vram_image_s"], report["low_vram_peak_gb"] = round(seconds, 2), peak

    # 7. the real studio server on these weights, written to disk (benchmarks/gpu_server.py)
    if run.server:
        gpu_server.measure(folder, report, smoke=run.smoke, dtype=run.dtype, size=size, base=base, clip=clip,
                           tokenizer=tokenizer, files=files, lora=lora, photo=photo)
    return 0 if report["backend_agreement"]["ok"] is not False else 1


def check_sdxl(run: Settings, folder: Path, report: dict, started: float) -> int:
    """The SDXL check (module docstring); fills `report` (build_s counted from `started`), returns the exit code."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.models.attention_processor import AttnProcessor2_0

    device, size = run.device, run.size
    base, clip, tokenizer, files = build(run, folder)
    report["build_s"] = round(time.perf_counter() - started, 1)
    report["steps"] = {"short": run.short, "long": run.long, "one_image": run.long}
    unet = base["unet"]
    photo = random_photo()
    common = dict(height=size, width=size, guidance_scale=run.guidance_scale)
    latents_only = dict(common, output_type="latent")  # plain diffusers: the fp16 VAE neither runs nor is timed

    # 1. plain SDXL (diffusers, SDPA)
    unet.set_attn_processor(AttnProcessor2_0())
    xl = StableDiffusionXLPipeline(**base, tokenizer=tokenizer, tokenizer_2=tokenizer, add_watermarker=False)
    xl.set_progress_bar_config(disable=True)
    report["plain_sdxl_it_s"] = iterations_per_second(device, lambda n: xl(
        PROMPT, num_inference_steps=n, generator=torch.Generator("cpu").manual_seed(0), **latents_only),
        run.short, run.long)

    # 2. diffusers' IP-Adapter Plus SDXL (scale 0.6), image embeddings computed once
    adapter, encoder = flexip_parts(unet, clip, files)
    subject = encoder.encode_subject([photo])
    report["diffusers_ip_adapter_it_s"] = ip_adapter_it_s(run, xl, files[("plus", "safetensors")], subject,
                                                          **latents_only)

    # 3.-6. FlexIP on the same pipeline: it/s, one image, ControlNet, inpainting; detached again afterwards
    subject = flexip_sdxl(run, xl, encoder, adapter, photo, report, **common)
    plain = report["plain_sdxl_it_s"]
    report["ratios_to_plain"] = {"diffusers_ip_adapter": round(report["diffusers_ip_adapter_it_s"] / plain, 3),
                                 "flexip": round(report["flexip_it_s"] / plain, 3)}

    # 7. the image of 4. with the low-VRAM option, once the FlexIPs above (and their fp32 decoders) are let go
    seconds, peak = low_vram_image(run, xl, encoder, adapter, run.long, subject=subject, **common)
    report["low_vram_image_s"], report["low_vram_peak_gb"] = round(seconds, 3), peak
    return 0


def flexip_sdxl(run: Settings, xl, encoder, adapter, photo, report: dict, **common):
    """Steps 3-6 of the SDXL check, with FlexIP attached to `xl` and detached at the end; returns the subject."""
    from diffusers import ControlNetModel

    # 3. FlexIP, both branches (gate 0.5); SDPA like the two runs before, so that the ratios compare like with like
    #    (the SD1.5 check covers xformers). It decodes in fp32 (force_upcast): a fixed cost the difference cancels
    pipe = FlexIPPipeline(xl, encoder=encoder, adapter=adapter, attention="sdpa")
    subject = pipe.encode_subject([photo])
    flexip = dict(subject=subject, gate=GATE, scheduler=None, **common)
    report["flexip_backend"] = pipe.backend
    report["flexip_it_s"] = iterations_per_second(run.device, lambda n: pipe(
        PROMPT, num_inference_steps=n, **flexip), run.short, run.long)

    # 4. one FlexIP image: seconds and peak memory (models, both branches' tokens, the fp32 decoder)
    seconds, peak = one_image(run.device, lambda: pipe(PROMPT, num_inference_steps=run.long, **flexip))
    report["flexip_image_s"], report["flexip_peak_gb"] = round(seconds, 3), peak

    # 5. ControlNet: a random one copied from the UNet (diffusers' from_unet), on FlexIP's ControlNet pipeline
    with torch.device(run.device):
        controlnet = ControlNetModel.from_unet(xl.unet).to(run.dtype).eval().requires_grad_(False)
    control = {"image": photo.resize((run.size, run.size))}
    report["controlnet_image_s"] = round(task_image_s(run, pipe.for_task("controlnet", controlnet=controlnet),
                                                      control, **flexip), 3)

    # 6. inpainting on the base's 4-channel UNet (diffusers blends the kept latents back in): the left half repainted
    mask = Image.new("L", (run.size, run.size), 0)
    mask.paste(255, (0, 0, run.size // 2, run.size))
    inpaint = {"image": photo.resize((run.size, run.size)), "mask_image": mask, "strength": 1.0}  # from noise
    report["inpainting_image_s"] = round(task_image_s(run, pipe.for_task("inpainting"), inpaint, **flexip), 3)
    pipe.detach()
    return subject


def task_image_s(run: Settings, flexip: FlexIPPipeline, inputs: dict, **call) -> float:
    """Seconds of one `run.long`-step image through `flexip` (another task's pipeline), after a short warm-up."""
    flexip(PROMPT, num_inference_steps=run.short, pipeline_kwargs=inputs, **call)
    return timed(run.device, lambda: flexip(PROMPT, num_inference_steps=run.long, pipeline_kwargs=inputs, **call))


# --- the report ----------------------------------------------------------------------------------------------
def speed_line(label: str, value: float, plain: float, note: str = "") -> str:
    return f"{label:<21} {value:8.2f} it/s  ({value / plain:.2f}x{note})"


def print_sd15_report(r: dict) -> None:
    agree = r["backend_agreement"]
    if "max_abs_diff" in agree:
        verdict = "OK" if agree["ok"] else f"FAILED (> {TOLERANCE})"
        print(f"attention backends, one UNet step ({agree['backends']}): "
              f"max abs diff {agree['max_abs_diff']:.2e} {verdict}")
    else:
        print(f"attention backends: {agree['backends']}")
    plain = r["plain_sd_it_s"]
    print(speed_line("plain SD", plain, plain))
    print(speed_line("diffusers IP-Adapter", r["diffusers_ip_adapter_it_s"], plain))
    print(speed_line("FlexIP, both branches", r["flexip_it_s"], plain, f", {r['flexip_backend']}"))
    if "flexip_sdpa_it_s" in r:
        print(speed_line("FlexIP on SDPA", r["flexip_sdpa_it_s"], plain))
    gpu_speed.print_variants(r, speed_line)
    print(f"fast profile, 4 steps {r['fast_image_s']:8.3f} s per image")
    if "flexip_peak_gb" in r:
        print(f"peak GPU memory: {r['flexip_peak_gb']} GB; with --low-vram {r['low_vram_peak_gb']} GB "
              f"({r['low_vram_image_s']} s for a {r['size']}px image)")
    if "server" in r:
        gpu_server.print_report(r)
    print(f"total {r['total_s']} s (building random models {r['build_s']} s)")
    gpu_speed.print_targets(r)


def print_sdxl_report(r: dict) -> None:
    steps = r["steps"]
    print(f"SDXL, it/s from a {steps['long']}- and a {steps['short']}-step run, CFG {GPU_RUNS['sdxl'][3]}:")
    plain = r["plain_sdxl_it_s"]
    print(speed_line("plain SDXL", plain, plain))
    print(speed_line("diffusers IP-Adapter", r["diffusers_ip_adapter_it_s"], plain,
                     f", Plus SDXL at {IP_ADAPTER_SCALE}"))
    print(speed_line("FlexIP, both branches", r["flexip_it_s"], plain, f", gate {GATE}, {r['flexip_backend']}"))
    memory = lambda gb: f", peak GPU memory {gb} GB" if gb is not None else ""
    print(f"one {steps['one_image']}-step {r['size']}px FlexIP image:")
    print(f"  default               {r['flexip_image_s']:8.3f} s{memory(r['flexip_peak_gb'])}")
    print(f"  --low-vram            {r['low_vram_image_s']:8.3f} s{memory(r['low_vram_peak_gb'])}")
    print(f"  ControlNet            {r['controlnet_image_s']:8.3f} s")
    print(f"  inpainting            {r['inpainting_image_s']:8.3f} s")
    print(f"total {r['total_s']} s (building random models {r['build_s']} s)")


CHECKS = {"sd15": (check_sd15, print_sd15_report), "sdxl": (check_sdxl, print_sdxl_report)}
# --family animate: FlexIP on AnimateDiff, in its own module
from benchmarks import gpu_animate  # noqa: E402

CHECKS["animate"] = (gpu_animate.check_animate, gpu_animate.print_report)
GPU_RUNS["animate"] = gpu_animate.GPU_RUN


def main(argv: list[str] | None = None) -> int:
    """Run one family's GPU check and print its report.

    Args:
        argv: command-line arguments: --family sd15|sdxl (default sd15), --smoke (CPU, fp32, tiny configs,
            64x64), --json PATH (also write the figures there).
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(CHECKS), default="sd15",
                        help="the model family to check (default sd15)")
    parser.add_argument("--smoke", action="store_true", help="CPU, fp32, tiny configs, 64x64: checks the script runs")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--no-server", dest="server", action="store_false",
                        help="sd15: leave out the real studio server's figures")
    parser.add_argument("--compile", action="store_true",
                        help="sd15: also time FlexIP with the UNet compiled (torch.compile, CUDA graphs on CUDA)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    started = time.perf_counter()

    run = settings(args.family, args.smoke)
    if run is None:
        print("no CUDA GPU: run with --smoke on CPU", file=sys.stderr)
        return 2
    card = torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else "CPU (smoke run)"
    run = replace(run, server=args.server, compile=args.compile)
    report: dict = {"family": run.family, "date": datetime.date.today().isoformat(), "device": card,
                    "dtype": str(run.dtype).removeprefix("torch."), "size": run.size, "torch": torch.__version__,
                    "xformers": xformers_available(), "smoke": run.smoke}
    print(f"device: {card}  dtype: {report['dtype']}  size: {run.size}x{run.size}  "
          f"xformers installed: {report['xformers']}")

    check, print_report = CHECKS[run.family]
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as folder:  # the synthetic files (SDXL: 2.8 GB)
        code = check(run, Path(folder), report, started)
    report["total_s"] = round(time.perf_counter() - started, 1)
    if run.family == "sd15":
        report["targets"] = gpu_speed.targets(report)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return code


if __name__ == "__main__":
    sys.exit(main())
