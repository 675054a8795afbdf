"""Devices: device and dtype choice, low-VRAM options, fp16-safe VAE decoding, out-of-memory reporting.

Model CPU offload follows diffusers' `enable_model_cpu_offload` (accelerate's `cpu_offload_with_hook`, one
hook per model, chained in the order the models run); VAE tiling and slicing are diffusers' own switches.
"""
from __future__ import annotations

import functools
import gc
import logging
import threading
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
LOW_VRAM_HINT = ("load the model with the low-VRAM option (command line and studio: --low-vram; Python: "
                 "FlexIPPipeline.from_profile(..., low_vram=True)), which keeps idle models in CPU memory and "
                 "decodes images in tiles")


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def pick_device(device=None) -> torch.device:
    """CUDA, else Apple MPS, else CPU, unless one is named."""
    if device not in (None, "auto"):
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device {device!r} unknown; use cuda, cuda:N, mps or cpu") from None
        if device.type not in ("cuda", "mps", "cpu"):
            raise ValueError(f"device {device.type!r} is not one FlexIP runs on; use cuda, cuda:N, mps or cpu")
        if device.type == "mps" and not _mps_available():
            raise ValueError("device 'mps' was asked for but PyTorch sees no Apple GPU; use --device cpu")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but PyTorch sees no CUDA GPU (is this the CPU build of "
                             "torch?); use --device cpu, or install the CUDA build of torch")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(requested, device: torch.device) -> torch.dtype:
    """fp16 on CUDA and MPS, fp32 on CPU, unless asked otherwise."""
    if isinstance(requested, torch.dtype):
        return requested
    if requested in (None, "auto"):
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    if requested not in DTYPES:
        raise ValueError(f"dtype {requested!r} unknown; choose one of {', '.join(DTYPES)} or 'auto'")
    return DTYPES[requested]


@dataclass(frozen=True)
class LowVRAM:
    """Memory savers for small GPUs (512x512 on an 8 GB card); each costs some speed."""

    cpu_offload: bool = True  # each model sits on the GPU only while it runs (CUDA only)
    vae_tiling: bool = True  # decode large images tile by tile
    vae_slicing: bool = True  # decode a batch one image at a time

    @classmethod
    def parse(cls, value) -> LowVRAM | None:
        """None/False: off; True: all savers; a LowVRAM: as given."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        raise ValueError(f"low_vram must be True, False or a LowVRAM(...), got {value!r}")


def apply_low_vram(options: LowVRAM | None, pipe, encoders: list, device: torch.device) -> list:
    """Switch on the pipeline's VAE tiling/slicing and diffusers' model CPU offload, and chain accelerate's offload
    hooks over FlexIP's own image encoders (not pipeline components); returns those hooks."""
    if options is None:
        return []
    if options.vae_tiling:
        pipe.vae.enable_tiling()
    if options.vae_slicing:
        pipe.vae.enable_slicing()
    if not options.cpu_offload:
        return []
    if device.type != "cuda":
        logger.info("model CPU offload only saves GPU memory on CUDA; skipped on %s", device)
        return []
    pipe.enable_model_cpu_offload(device=device)
    return offload_chain(encoders, device)


def offload_chain(models: list, device: torch.device) -> list:
    """accelerate hooks: a model moves to `device` when called and its predecessor moves back to the CPU."""
    from accelerate import cpu_offload_with_hook

    hooks, previous = [], None
    for model in models:
        if model is None:
            continue
        model.to("cpu")
        _, previous = cpu_offload_with_hook(model, device, prev_module_hook=previous)
        hooks.append(previous)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return hooks


def module_dtype(module) -> torch.dtype:
    return next(module.parameters()).dtype


class SafeVaeDecoder:
    """VAE decoding that never returns a black image: an fp16/bf16 VAE that yields NaN or inf is replaced,
    from then on, by an fp32 copy of itself (diffusers upcasts SDXL's VAE for the same reason).

    `upcast`: decode an fp16 VAE in fp32 from the start, as diffusers' SDXL pipelines do when the VAE's config
    says `force_upcast` (SDXL's own VAE overflows in fp16 at 1024 px; madebyollin/sdxl-vae-fp16-fix does not).
    """

    def __init__(self, vae, device: torch.device, upcast: bool = False):
        self.vae, self.device = vae, torch.device(device)
        self.upcast = upcast
        self._fp32 = None
        self._lock = threading.Lock()

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        scaled = self._unscale(latents)
        if self._fp32 is None and self.upcast and module_dtype(self.vae) == torch.float16:
            self._upcast()
        if self._fp32 is not None:
            return self._fp32.decode(scaled.float(), return_dict=False)[0]
        image = self.vae.decode(scaled.to(module_dtype(self.vae)), return_dict=False)[0]
        if module_dtype(self.vae) in (torch.float16, torch.bfloat16) and not torch.isfinite(image).all():
            logger.warning("the %s VAE produced NaN/inf (a black image); decoding in float32 from now on",
                           module_dtype(self.vae))
            image = self._upcast().decode(scaled.float(), return_dict=False)[0]
        return image

    def _unscale(self, latents: torch.Tensor) -> torch.Tensor:
        """UNet latents -> VAE latents: / scaling_factor, and the per-channel statistics of VAEs whose config has
        them (diffusers' SDXL pipelines read latents_mean/latents_std; SD1.5's and SDXL's own VAEs have none)."""
        config = self.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is None or std is None:
            return latents / config.scaling_factor
        shape = (1, len(mean), 1, 1)
        mean = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(shape)
        std = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(shape)
        return latents * std / config.scaling_factor + mean

    def _upcast(self):
        with self._lock:
            if self._fp32 is None:
                copy = type(self.vae).from_config(self.vae.config)
                copy.load_state_dict({k: v.float() for k, v in self.vae.state_dict().items()})
                copy.use_tiling, copy.use_slicing = self.vae.use_tiling, self.vae.use_slicing
                self._fp32 = copy.to(self.device, torch.float32).eval().requires_grad_(False)
            return self._fp32


# --- out of memory ----------------------------------------------------------------------------------------
class NotEnoughMemory(ValueError):
    """The request does not fit in the device's memory. A ValueError, so every caller that reports bad
    requests (the CLI, the studio) shows it; the process and the loaded pipeline stay usable."""


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()  # MPS, cuDNN, xformers


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and torch.backends.mps.is_available():
        mps.empty_cache()


def out_of_memory_message(what: str, device, low_vram_on: bool, error_line: str) -> str:
    where = f"{torch.device(device).type.upper()} memory" if device is not None else "memory"
    advice = ("free the memory other programs hold, or use fewer gate values per run or a smaller size "
              "(the low-VRAM option is already on)") if low_vram_on else (
        f"use fewer gate values per run or a smaller size, or {LOW_VRAM_HINT}")
    return f"not enough {where} to {what} ({error_line}); {advice}"


def reports_out_of_memory(what: str):
    """Decorator for pipeline methods: an out-of-memory error becomes NotEnoughMemory with advice.

    The message is raised outside the `except` block, so the failed call's tensors (held by the original
    traceback) are released before the cache is emptied.
    """

    def wrap(method):
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            message = None
            try:
                return method(self, *args, **kwargs)
            except Exception as error:
                if not is_out_of_memory(error):
                    raise
                line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                message = out_of_memory_message(what, getattr(self, "device", None),
                                                getattr(self, "low_vram", None) is not None, line)
            free_memory()
            logger.error(message)
            raise NotEnoughMemory(message)

        return wrapper

    return wrap
