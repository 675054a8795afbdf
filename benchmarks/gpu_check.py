"""GPU check for a lent card: the real SD1.5 architecture with random weights (no Hub), fp16, 512x512.

1. xformers and SDPA agree on one UNet step with FlexIP's gated processor, both branches on (max abs diff <= 2e-3).
2. Iterations per second of plain SD, diffusers' IP-Adapter (Plus) and FlexIP with both branches; each from
   the difference of a long and a short run, so text encoding and VAE decoding cancel out.
3. Seconds for one 4-step fast-profile image (LoRA fused, LCM scheduler, no CFG), subject already encoded.
4. Peak GPU memory of one FlexIP image with and without the low-VRAM option.

    python benchmarks/gpu_check.py [--json report.json]     # on CUDA, under 3 minutes on an H100
    python benchmarks/gpu_check.py --smoke                  # the same code on CPU with the tiny configs
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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


def build(smoke: bool, device: torch.device, dtype: torch.dtype, folder: Path):
    """Random base, CLIP encoder, tokenizer and synthetic IP-Adapter files in the published layout."""
    if smoke:
        from flexip_core.loading.tiny import build_tiny_base, build_tiny_encoders

        base = build_tiny_base()
        clip, _ = build_tiny_encoders()
        base = {k: (v.to(device, dtype) if isinstance(v, torch.nn.Module) else v) for k, v in base.items()}
        clip = clip.to(device, dtype)
    else:
        from flexip_core.loading.architectures import build_sd15, build_vit_h14

        base = build_sd15(device, dtype)
        clip = build_vit_h14(device, dtype)
    tokenizer = save_tiny_tokenizer(folder / "tokenizer")  # ids stay inside any vocabulary; no download
    files = write_synthetic_ip_adapter_files(base["unet"], folder / "ip", clip_embed_dim=clip.config.projection_dim,
                                             clip_hidden_dim=clip.config.hidden_size)
    return base, clip, tokenizer, files


def backend_agreement(pipe: FlexIPPipeline, subject, backends: tuple[str, str], size: int) -> float:
    """Max abs difference of one UNet step (CFG batch, both branches at 0.5) between two attention backends."""
    device, dtype, unet = pipe.device, pipe.dtype, pipe.unet
    gen = torch.Generator("cpu").manual_seed(0)
    side = size // pipe.pipe.vae_scale_factor
    latents = torch.randn(2, unet.config.in_channels, side, side, generator=gen).to(device, dtype)  # (2, 4, h, w)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen).to(device, dtype)  # (2, 77, C)
    features = subject.features.map(lambda t: t.to(device, dtype))
    pres = pipe.adapter.preservation(features, text[:1]).expand(2, -1, -1)  # (2, 16, C)
    pers = pipe.adapter.personalization(features, text[:1]).expand(2, -1, -1)  # (2, 4, C)
    weights = torch.full((2,), 0.5, device=device, dtype=dtype)
    outputs = []
    with torch.no_grad():
        for backend in backends:
            install_processors(unet, pipe.adapter, backend)
            inputs = BranchInputs(pres, pers, weights, weights, True, True)
            outputs.append(unet(latents, 500, encoder_hidden_states=text, cross_attention_kwargs={"flexip": inputs},
                                return_dict=False)[0].float())
    install_processors(unet, pipe.adapter, pipe.backend)
    return float((outputs[0] - outputs[1]).abs().max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, fp32, tiny configs, 64x64: checks the script runs")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    started = time.perf_counter()

    if args.smoke:
        device, dtype, size, short, long, fast_steps = torch.device("cpu"), torch.float32, 64, 1, 2, 4
    else:
        if not torch.cuda.is_available():
            print("no CUDA GPU: run with --smoke on CPU", file=sys.stderr)
            return 2
        device, dtype, size, short, long, fast_steps = torch.device("cuda"), torch.float16, 512, 5, 25, 4
        torch.backends.cuda.matmul.allow_tf32 = True
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke run)"
    report: dict = {"device": card, "dtype": str(dtype).removeprefix("torch."), "size": size,
                    "torch": torch.__version__, "xformers": xformers_available()}
    print(f"device: {card}  dtype: {report['dtype']}  size: {size}x{size}  xformers installed: {report['xformers']}")

    folder = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    base, clip, tokenizer, files = build(args.smoke, device, dtype, folder)
    report["build_s"] = round(time.perf_counter() - started, 1)
    unet, vae, text_encoder, scheduler = base["unet"], base["vae"], base["text_encoder"], base["scheduler"]
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8))
    common = dict(height=size, width=size, guidance_scale=7.5)

    # 1. plain SD (diffusers, SDPA)
    from diffusers import StableDiffusionPipeline
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())
    sd = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                 scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                 requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    report["plain_sd_it_s"] = iterations_per_second(device, lambda n: sd(
        PROMPT, num_inference_steps=n, generator=torch.Generator("cpu").manual_seed(0), **common), short, long)

    # 2. diffusers' IP-Adapter (Plus, scale 0.6), image embeddings computed once as in a slider move
    layers = cross_attention_layers(unet)
    adapter = adapter_from_ip_adapter_files(files[("plus", "safetensors")], files[("plain", "safetensors")], layers,
                                            cross_attention_dim=unet.config.cross_attention_dim)
    encoder = SubjectEncoder(clip, Preprocess(clip.config.image_size, CLIP_MEAN, CLIP_STD), needs=adapter.needs)
    subject = encoder.encode_subject([photo])
    plus = files[("plus", "safetensors")]
    sd.load_ip_adapter(str(plus.parent), subfolder="", weight_name=plus.name, image_encoder_folder=None)
    sd.set_ip_adapter_scale(0.6)
    embeds = torch.cat([subject.uncond.clip_hidden, subject.features.clip_hidden])[:, None].to(device, dtype)
    report["diffusers_ip_adapter_it_s"] = iterations_per_second(device, lambda n: sd(
        PROMPT, ip_adapter_image_embeds=[embeds], num_inference_steps=n,
        generator=torch.Generator("cpu").manual_seed(0), **common), short, long)
    sd.unload_ip_adapter()

    # 3. FlexIP, both branches (gate 0.5), the base scheduler as above
    pipe = FlexIPPipeline(sd, encoder=encoder, adapter=adapter)  # attached to the same diffusers pipeline
    subject = pipe.encode_subject([photo])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    report["flexip_backend"] = pipe.backend
    report["flexip_it_s"] = iterations_per_second(device, lambda n: pipe(
        PROMPT, subject=subject, gate=0.5, num_inference_steps=n, scheduler=None, **common), short, long)
    if device.type == "cuda":
        report["flexip_peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if pipe.backend == "xformers":  # the same run on SDPA, for the ratio
        install_processors(unet, adapter, "sdpa")
        pipe.backend = "sdpa"
        report["flexip_sdpa_it_s"] = iterations_per_second(device, lambda n: pipe(
            PROMPT, subject=subject, gate=0.5, num_inference_steps=n, scheduler=None, **common), short, long)
        pipe.backend = "xformers"
        install_processors(unet, adapter, "xformers")

    # 4. xformers vs SDPA on one UNet step
    xformers_problem = xformers_usable(str(device)) if device.type == "cuda" else "no CUDA"
    if xformers_problem is None:
        diff = backend_agreement(pipe, subject, ("sdpa", "xformers"), size)
        report["backend_agreement"] = {"backends": "sdpa vs xformers", "max_abs_diff": diff, "ok": diff <= TOLERANCE}
    elif args.smoke:  # exercises the code path only
        diff = backend_agreement(pipe, subject, ("sdpa", "sdpa"), size)
        report["backend_agreement"] = {"backends": "sdpa vs sdpa (smoke)", "max_abs_diff": diff, "ok": diff == 0.0}
    else:
        report["backend_agreement"] = {"backends": f"skipped: {xformers_problem}", "ok": None}

    # 5. one 4-step fast-profile image: a LoRA fused through diffusers (as sd15-fast), LCM scheduler, no CFG
    from flexip_core.loading.sources import load_lora

    lora = write_lora(unet, folder / "lora" / "pytorch_lora_weights.safetensors", std=0.01)
    load_lora(sd, str(lora))  # fuses into the UNet that `pipe` shares
    fast = dict(subject=subject, gate=0.5, num_inference_steps=fast_steps, guidance_scale=1.0, scheduler="lcm",
                height=size, width=size)
    pipe(PROMPT, **fast)  # warm-up
    report["fast_image_s"] = timed(device, lambda: pipe(PROMPT, **fast))

    # 6. peak memory with the low-VRAM option (model CPU offload, VAE tiling and slicing)
    if device.type == "cuda":
        pipe.detach()
        low = FlexIPPipeline(sd, encoder=encoder, adapter=adapter, device=device, low_vram=True)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        low(PROMPT, subject=subject, gate=0.5, num_inference_steps=short, scheduler=None, **common)
        report["low_vram_image_s"] = round(time.perf_counter() - start, 2)
        report["low_vram_peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)

    report["total_s"] = round(time.perf_counter() - started, 1)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if report["backend_agreement"]["ok"] is not False else 1


def print_report(r: dict) -> None:
    agree = r["backend_agreement"]
    if "max_abs_diff" in agree:
        verdict = "OK" if agree["ok"] else f"FAILED (> {TOLERANCE})"
        print(f"attention backends, one UNet step ({agree['backends']}): "
              f"max abs diff {agree['max_abs_diff']:.2e} {verdict}")
    else:
        print(f"attention backends: {agree['backends']}")
    plain = r["plain_sd_it_s"]
    ip, flexip = r["diffusers_ip_adapter_it_s"], r["flexip_it_s"]
    print(f"plain SD              {plain:8.2f} it/s  (1.00x)")
    print(f"diffusers IP-Adapter  {ip:8.2f} it/s  ({ip / plain:.2f}x)")
    print(f"FlexIP, both branches {flexip:8.2f} it/s  ({flexip / plain:.2f}x, {r['flexip_backend']})")
    if "flexip_sdpa_it_s" in r:
        print(f"FlexIP on SDPA        {r['flexip_sdpa_it_s']:8.2f} it/s  ({r['flexip_sdpa_it_s'] / plain:.2f}x)")
    print(f"fast profile, 4 steps {r['fast_image_s']:8.3f} s per image")
    if "flexip_peak_gb" in r:
        print(f"peak GPU memory: {r['flexip_peak_gb']} GB; with --low-vram {r['low_vram_peak_gb']} GB "
              f"({r['low_vram_image_s']} s for a {r['size']}px image)")
    print(f"total {r['total_s']} s (building random models {r['build_s']} s)")


if __name__ == "__main__":
    sys.exit(main())
