"""Building a FlexIPPipeline from a profile: resolve sources, load components, attach the adapter."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import CLIPVisionModelWithProjection, Dinov2Model

from .adapters import cross_attention_layers
from .encoders import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, Preprocess, SubjectEncoder
from .loading import load_base, load_pretrained, resolve_file
from .profiles import Profile, cache_home, load_profile
from .weights import load_adapter

logger = logging.getLogger(__name__)


def pick_device(device=None) -> torch.device:
    if device not in (None, "auto"):
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(requested, device: torch.device) -> torch.dtype:
    """fp16 on CUDA and MPS, fp32 on CPU, unless asked otherwise."""
    if isinstance(requested, torch.dtype):
        return requested
    if requested in (None, "auto"):
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if requested not in names:
        raise ValueError(f"dtype {requested!r} unknown; choose one of {', '.join(names)} or 'auto'")
    return names[requested]


def ensure_built(kind: str) -> Path:
    """Locally built models (the tiny random set), written once into the FlexIP cache folder."""
    if kind != "tiny":
        raise ValueError(f"no local builder named {kind!r}")
    from .tiny import TINY_VERSION, write_tiny_models

    folder = cache_home() / f"tiny-v{TINY_VERSION}"
    if (folder / "VERSION").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="tiny-", dir=folder.parent))
    write_tiny_models(staging)
    try:
        os.rename(staging, folder)  # atomic: concurrent builders never see half a folder
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another process finished first
    return folder


def resolve_placeholders(profile: Profile) -> Profile:
    if profile.build is None:
        return profile
    root = str(ensure_built(profile.build))
    fields = ("base", "clip_encoder", "dino_encoder", "adapter", "preservation", "personalization", "lora")
    values = {f: getattr(profile, f).replace("{build}", root) for f in fields if getattr(profile, f)}
    return profile.with_overrides(**values)


def encoder_preprocess(model, mean, std, largest: int | None = None) -> Preprocess:
    size = model.config.image_size
    return Preprocess(min(size, largest) if largest else size, mean, std)


def load_adapter_for(profile: Profile, unet):
    layers = cross_attention_layers(unet)
    if profile.adapter:
        return load_adapter(resolve_file(profile.adapter), layers=layers)
    if profile.preservation or profile.personalization:
        from .ip_adapter import adapter_from_ip_adapter_files

        return adapter_from_ip_adapter_files(profile.preservation, profile.personalization, layers)
    raise ValueError(f"profile {profile.name!r} names no adapter: give adapter= or preservation=/personalization=")


def assemble(cls, name: str, *, device=None, dtype=None, attention=None, **overrides):
    profile = resolve_placeholders(load_profile(name).with_overrides(**overrides))
    device = pick_device(device)
    dtype = pick_dtype(dtype if dtype is not None else profile.dtype, device)
    logger.info("loading profile %s on %s (%s)", profile.name, device, dtype)
    components = load_base(profile.base, dtype)
    adapter = load_adapter_for(profile, components["unet"])
    clip = load_pretrained(CLIPVisionModelWithProjection, profile.clip_encoder, dtype).to(device).eval()
    dino = None
    if "dino" in adapter.needs:
        if not profile.dino_encoder:
            raise ValueError(f"profile {profile.name!r}: the adapter needs DINOv2 features; give dino_encoder=")
        dino = load_pretrained(Dinov2Model, profile.dino_encoder, dtype).to(device).eval()
    encoder = SubjectEncoder(
        clip, encoder_preprocess(clip, CLIP_MEAN, CLIP_STD),
        dino, encoder_preprocess(dino, IMAGENET_MEAN, IMAGENET_STD, largest=224) if dino is not None else None,
        needs=adapter.needs,
    )
    return cls(unet=components["unet"], vae=components["vae"], text_encoder=components["text_encoder"],
               tokenizer=components["tokenizer"], scheduler=components["scheduler"], encoder=encoder,
               adapter=adapter, profile=profile, device=device, dtype=dtype, attention=attention)
