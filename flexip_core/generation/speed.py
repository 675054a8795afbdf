"""Speed options of a loaded UNet: `torch.compile` for a fixed shape (CUDA graphs on CUDA) and channels-last memory.

Both are off by default in every profile: neither has been measured to pay on a GPU yet (benchmarks/gpu_check.py
measures them on a lent card). Compiling changes no result: it is tested against the eager UNet on CPU.
"""
from __future__ import annotations

import logging

import torch

from flexip_core.loading.profiles import COMPILE_MODES

logger = logging.getLogger(__name__)

# of COMPILE_MODES, "reduce-overhead" replays CUDA graphs, so a denoising step costs one graph launch instead of some
# thousand kernel launches (the loop at batch 2 is launch-bound)
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the modes that replay CUDA graphs


def compile_mode(option: bool | str | None, device: torch.device) -> str | None:
    """The torch.compile mode of a `compile` option: None when off (False/None); True picks "reduce-overhead" (CUDA
    graphs) on CUDA and "default" elsewhere; a mode name is taken as it is."""
    if option is None or option is False:
        return None
    if option is True:
        return "reduce-overhead" if device.type == "cuda" else "default"
    if option not in COMPILE_MODES:
        raise ValueError(f"compile {option!r} unknown; give true, false or a torch.compile mode: "
                         f"{', '.join(COMPILE_MODES)}")
    return option


def speed_up_unet(unet: torch.nn.Module, device: torch.device, compile: bool | str | None = False,
                  channels_last: bool = False) -> str | None:
    """Apply the speed options to `unet` in place; returns the compile mode used (None: not compiled).

    The UNet is compiled with `dynamic=False`: each new shape (batch, size) compiles once more when first met, the
    first call of each taking minutes on a GPU. The module stays the same object (`nn.Module.compile`), so
    diffusers' processors, LoRA and `from_pipe` see the UNet they always did."""
    mode = compile_mode(compile, device)
    if channels_last:
        unet.to(memory_format=torch.channels_last)  # NHWC convolutions: faster on tensor cores for many shapes
    if mode is not None:
        logger.info("compiling the UNet (torch.compile mode %s, fixed shapes); the first render of each size is slow",
                    mode)
        unet.compile(mode=mode, dynamic=False)
        if device.type == "cuda" and mode in CUDA_GRAPH_MODES:
            unet._compiled_call_impl = _fresh_outputs(unet._compiled_call_impl)  # nn.Module.compile's own slot
    return mode


def _fresh_outputs(compiled):
    """A CUDA-graph UNet call whose outputs are copies: a replay writes its outputs into the same memory, and a
    scheduler may keep one step's model output for the next (PNDM's and the DPM solvers' history without CFG). The
    copy is one latent-sized tensor per step."""
    def call(*args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs (copied) may be overwritten
        out = compiled(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            return out.clone()
        if isinstance(out, tuple):
            return tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in out)
        return type(out)(**{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in out.items()})

    return call
