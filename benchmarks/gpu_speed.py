"""Issue 35's in-process figures for gpu_check.py (sd15): FlexIP's attention variants side by side, and the targets.

- it/s of FlexIP with both branches, fused (the text and both branches in one SDPA call, the default) and unfused
  (one call per term), on SDPA, beside the run of the default backend; with --channels-last and --compile, also
  the UNet in channels-last memory and compiled (torch.compile, CUDA graphs on CUDA);
- the operations one UNet step dispatches, fused and unfused (aten operations that compute: views left out, so on
  CUDA about the kernel launches), which a CPU run measures as well as a GPU one;
- the issue's targets against the figures (`targets`, `print_targets`).

    python -m benchmarks.gpu_speed      # operations per step of the SD1.5 UNet (batch 2), counted on the meta device
"""
from __future__ import annotations

import logging
import sys
import time

import torch
from torch.nn import functional as F

logger = logging.getLogger("gpu_check")

GATE = 0.5  # both branches on


def count_ops(fn) -> int:
    """Aten operations that compute (views and other aliasing operations left out) dispatched while `fn()` runs; an
    attention call counts once, whatever its backend (the meta device and SDPA's math backend run it as a dozen)."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    state = {"ops": 0, "inside_attention": False}

    class Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and not state["inside_attention"]:
                state["ops"] += 1
            return func(*args, **(kwargs or {}))

    class AttentionAsOne(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is not F.scaled_dot_product_attention or state["inside_attention"]:
                return func(*args, **(kwargs or {}))
            state["ops"] += 1
            state["inside_attention"] = True
            try:
                return func(*args, **(kwargs or {}))
            finally:
                state["inside_attention"] = False

    with torch.no_grad(), Counter(), AttentionAsOne():
        fn()
    return state["ops"]


def step_inputs(pipe, subject, size: int) -> tuple:
    """One UNet step's inputs at `size` px: a CFG batch of 2 random latents, random text states, both branches'
    tokens of `subject` and their weights at GATE: (latents, text, pres, pers, weights)."""
    device, dtype, unet = pipe.device, pipe.dtype, pipe.unet
    gen = torch.Generator("cpu").manual_seed(0)
    side = size // pipe.pipe.vae_scale_factor
    latents = torch.randn(2, unet.config.in_channels, side, side, generator=gen).to(device, dtype)  # (2, 4, h, w)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen).to(device, dtype)  # (2, 77, C)
    features = subject.features.map(lambda t: t.to(device, dtype))
    with torch.no_grad():
        pres = pipe.adapter.preservation(features, text[:1]).expand(2, -1, -1)  # (2, Np, C)
        pers = pipe.adapter.personalization(features, text[:1]).expand(2, -1, -1)  # (2, Nq, C)
    return latents, text, pres, pers, torch.full((2,), GATE, device=device, dtype=dtype)


def ops_per_step(pipe, subject, size: int) -> dict[str, int]:
    """Operations of one UNet step (CFG batch of 2, both branches at 0.5, keys and values already cached as in every
    step after the first), fused and unfused; the pipeline's processors are put back."""
    from flexip_core.generation.attention import BranchInputs, install_processors

    unet = pipe.unet
    latents, text, pres, pers, weights = step_inputs(pipe, subject, size)
    counts = {}
    for name, fused in (("fused", True), ("unfused", False)):
        install_processors(unet, pipe.adapter, "sdpa", fused=fused)
        inputs = BranchInputs(pres, pers, weights, weights, True, True)
        step = lambda: unet(latents, 500, encoder_hidden_states=text, cross_attention_kwargs={"flexip": inputs},
                            return_dict=False)
        with torch.no_grad():
            step()  # the first step projects and stacks the keys and values, as a generation's first step does
        counts[name] = count_ops(step)
    install_processors(unet, pipe.adapter, pipe.backend, fused=pipe.fused_attention)
    return counts


def attention_variants(run, pipe, subject, report: dict, measure, warm, channels_last: bool = False,
                       compile: bool = False) -> None:
    """Fill `report` with FlexIP's it/s fused and unfused on SDPA (`measure(pipe)` times one variant), the
    operations per step of each, and, when asked, channels-last and compiled it/s (`warm(pipe)`: the first image,
    which compiles); `pipe` is left as it came."""
    from flexip_core.generation.attention import install_processors
    from flexip_core.generation.speed import speed_up_unet

    unet, adapter = pipe.unet, pipe.adapter
    report["ops_per_step"] = ops_per_step(pipe, subject, run.size)
    variants = {}
    for name, fused in (("fused", True), ("unfused", False)):
        if fused == pipe.fused_attention and (pipe.backend == "sdpa" or "flexip_sdpa_it_s" in report):
            variants[name] = report.get("flexip_sdpa_it_s", report["flexip_it_s"])  # measured already
            continue
        install_processors(unet, adapter, "sdpa", fused=fused)
        variants[name] = measure(pipe)
    install_processors(unet, adapter, pipe.backend, fused=pipe.fused_attention)
    report["flexip_fused_it_s"], report["flexip_unfused_it_s"] = variants["fused"], variants["unfused"]
    if channels_last:
        unet.to(memory_format=torch.channels_last)
        report["flexip_channels_last_it_s"] = measure(pipe)
        unet.to(memory_format=torch.contiguous_format)
    if compile:
        started = time.perf_counter()
        pipe.compiled = speed_up_unet(unet, run.device, True)
        warm(pipe)  # compiles (and records the CUDA graphs)
        report["compile_s"] = round(time.perf_counter() - started, 1)
        report["compile_mode"] = pipe.compiled
        report["flexip_compiled_it_s"] = measure(pipe)
        unet._compiled_call_impl = None  # nn.Module.compile's own slot: the eager UNet again for the later checks
        pipe.compiled = None


# --- the targets ---------------------------------------------------------------------------------------------------
# (name, what, report key or ratio of two keys, ">=" or "<=", the target); a figure that is None is pending
TARGETS = (
    ("flexip_vs_plain_sd", "FlexIP it/s / plain SD it/s (512 px, fp16, CFG)", ("flexip_it_s", "plain_sd_it_s"),
     ">=", 0.95),
    ("flexip_vs_ip_adapter_plus", "FlexIP it/s / diffusers IP-Adapter Plus it/s",
     ("flexip_it_s", "diffusers_ip_adapter_it_s"), ">=", 1.0),
    ("release_to_final_sd15", "slider release -> final image, sd15 20 steps (s)", "server_release_to_final_s",
     "<=", 1.0),
    ("release_to_final_fast", "slider release -> final image, sd15-fast (s)", "fast_release_to_final_s", "<=", 0.3),
    ("first_preview", "slider release -> first preview, sd15 (ms)", "first_preview_ms", "<=", 150.0),
    ("drag_renders", "renders shown per second while dragging, sd15-fast", "drag_renders_per_s", ">=", 8.0),
)


def targets(report: dict) -> list[dict]:
    """Each target with its figure from `report` and the verdict: "pass", "fail" or "pending" (no figure)."""
    rows = []
    for name, what, source, sense, limit in TARGETS:
        if isinstance(source, tuple):
            top, bottom = report.get(source[0]), report.get(source[1])
            figure = round(top / bottom, 3) if top is not None and bottom else None
        else:
            figure = report.get(source)
        if figure is None:
            verdict = "pending"
        else:
            verdict = "pass" if (figure >= limit if sense == ">=" else figure <= limit) else "fail"
        rows.append(dict(name=name, what=what, figure=figure, target=f"{sense} {limit:g}", verdict=verdict))
    return rows


def print_targets(report: dict) -> None:
    smoke = " (a smoke run: CPU and tiny models, the figures say nothing)" if report.get("smoke") else ""
    print(f"issue 35 targets{smoke}:")
    for row in report["targets"]:
        figure = "none" if row["figure"] is None else f"{row['figure']:g}"
        print(f"  {row['what']:<52} {figure:>9}  (target {row['target']})  {row['verdict'].upper()}")


def print_variants(report: dict, speed_line) -> None:
    """The attention variants' lines of the report (`speed_line(label, value, plain)` formats one)."""
    plain = report["plain_sd_it_s"]
    print(speed_line("FlexIP fused, SDPA", report["flexip_fused_it_s"], plain))
    print(speed_line("FlexIP unfused, SDPA", report["flexip_unfused_it_s"], plain))
    for key, label in (("flexip_channels_last_it_s", "FlexIP channels-last"), ("flexip_compiled_it_s",
                                                                                "FlexIP compiled")):
        if key in report:
            print(speed_line(label, report[key], plain))
    if "compile_s" in report:
        print(f"compiling ({report['compile_mode']}) took {report['compile_s']} s before the first image")
    ops = report["ops_per_step"]
    print(f"operations per UNet step (views left out): fused {ops['fused']}, unfused {ops['unfused']} "
          f"({ops['unfused'] - ops['fused']} fewer)")


def sd15_ops_per_step() -> dict[str, int]:
    """Operations of one step of the SD1.5 UNet (CFG batch of 2, 512 px, fp16) for plain SD, diffusers' IP-Adapter
    Plus (its resampler runs every step) and FlexIP with both branches, unfused and fused: counted on the meta
    device, where every operation is dispatched and none computes (seconds on any CPU, no weights)."""
    from diffusers import UNet2DConditionModel

    from flexip_core.generation.adapter_config import AdapterConfig
    from flexip_core.generation.adapters import FlexIPAdapter, cross_attention_layers
    from flexip_core.generation.attention import BranchInputs, install_processors
    from flexip_core.loading.architectures import IP_ADAPTER_PLUS_SD15, IP_ADAPTER_SD15, SD15_UNET
    from flexip_core.loading.tiny import synthetic_ip_adapter_state

    meta = torch.device("meta")
    with meta:
        unet = UNet2DConditionModel(**SD15_UNET).half().eval()
        latents = torch.empty(2, 4, 64, 64, dtype=torch.float16)  # (2, 4, h, w): CFG's two rows
        text = torch.empty(2, 77, 768, dtype=torch.float16)  # (2, 77, C)
        clip_hidden = torch.empty(2, 1, 257, 1280, dtype=torch.float16)  # (2, photos, 1 + P, H) for IP-Adapter Plus
        pres, pers = torch.empty(2, 16, 768, dtype=torch.float16), torch.empty(2, 4, 768, dtype=torch.float16)
        weights = torch.full((2,), GATE, dtype=torch.float16)
    step = lambda **extra: unet(latents, 500, encoder_hidden_states=text, return_dict=False, **extra)
    counts = {"plain SD": count_ops(step)}
    layers = cross_attention_layers(unet)
    with meta:
        adapter = FlexIPAdapter(AdapterConfig(IP_ADAPTER_PLUS_SD15, IP_ADAPTER_SD15, layers)).half()
    for name, fused in (("FlexIP unfused", False), ("FlexIP fused", True)):
        install_processors(unet, adapter, "sdpa", fused=fused)
        inputs = BranchInputs(pres, pers, weights, weights, True, True)
        flexip = {"cross_attention_kwargs": {"flexip": inputs}}
        with torch.no_grad():
            step(**flexip)  # the first step projects (and stacks) the keys and values; the others reuse them
        counts[name] = count_ops(lambda: step(**flexip))
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())
    image_proj, ip_adapter = synthetic_ip_adapter_state(unet, "plus", clip_embed_dim=1024, clip_hidden_dim=1280)
    unet._load_ip_adapter_weights([{"image_proj": image_proj, "ip_adapter": ip_adapter}], low_cpu_mem_usage=False)
    unet.to(meta, torch.float16)
    counts["diffusers IP-Adapter Plus"] = count_ops(lambda: step(added_cond_kwargs={"image_embeds": [clip_hidden]}))
    return counts


def main() -> int:
    """Print the operations per step of the SD1.5 UNet for plain SD, IP-Adapter Plus and FlexIP unfused / fused."""
    logging.basicConfig(level=logging.WARNING)
    counts = sd15_ops_per_step()
    plain = counts["plain SD"]
    print("operations per SD1.5 UNet step (CFG batch 2, 512 px, fp16; aten operations that compute, views left out):")
    for name, ops in counts.items():
        print(f"  {name:<26} {ops:5d}  ({ops - plain:+d} against plain SD)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
