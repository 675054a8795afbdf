"""Resolving model sources (local folders and files, Hub ids, the Hub cache) and loading components."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no")


def split_source(source: str) -> tuple[str, str | None]:
    """'repo/id:sub/folder' -> ('repo/id', 'sub/folder'); local paths are returned whole."""
    if Path(source).exists() or ":" not in source:
        return source, None
    repo, _, sub = source.partition(":")
    return repo, sub or None


def resolve_file(source: str) -> Path:
    """A local file, or 'repo/id:path/in/repo' fetched from (or found in) the Hub cache."""
    if Path(source).is_file():
        return Path(source)
    repo, sub = split_source(source)
    if sub is None:
        raise ValueError(f"file not found: {source} (give a local path or 'hub-repo/id:path/in/repo')")
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo, sub, local_files_only=offline()))


def load_pretrained(cls, source: str, dtype: torch.dtype, **kwargs):
    """cls.from_pretrained from a local folder or 'repo/id[:subfolder]', honouring HF_HUB_OFFLINE."""
    if Path(source).is_dir():
        return cls.from_pretrained(source, dtype=dtype, **kwargs)
    repo, sub = split_source(source)
    if sub is not None:
        kwargs["subfolder"] = sub
    return cls.from_pretrained(repo, dtype=dtype, local_files_only=offline(), **kwargs)


def load_base(source: str, dtype: torch.dtype):
    """The SD1.5-architecture components (unet, vae, text_encoder, tokenizer, scheduler)."""
    from diffusers import StableDiffusionPipeline

    common = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    path = Path(source)
    if path.suffix in (".safetensors", ".ckpt") and path.is_file():
        pipe = StableDiffusionPipeline.from_single_file(str(path), dtype=dtype, **common)
    else:
        pipe = load_pretrained(StableDiffusionPipeline, source, dtype, **common)
    return pipe.components
