"""Resolving model sources (local folders and files, Hub ids, the Hub cache) and loading components.

A source is a local folder or file, a Hub id ('owner/name'), or a Hub id with a path inside the repository
('owner/name:sub/folder' or 'owner/name:file.safetensors'). Hub downloads go through huggingface_hub into its
standard cache, with its progress bars; with HF_HUB_OFFLINE=1 only the cache is read. Pickled files
(.bin, .ckpt) are only ever read with torch.load(weights_only=True).
"""
from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# The flag (command line) and keyword (from_profile) that replace each part of a profile with a local copy.
PART_FLAGS = {
    "base": "--base", "base_config": "--base-config", "clip_encoder": "--clip-encoder",
    "dino_encoder": "--dino-encoder", "adapter": "--adapter", "preservation": "--preservation",
    "personalization": "--personalization", "lora": "--lora", "inpaint_base": "--inpaint-base", "motion": "--motion",
}
PIPELINE_PARTS = ("base", "inpaint_base")  # parts that are whole diffusers pipelines
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
# What a load reads from a Hub repository: a diffusers pipeline (fp32 safetensors, configs, tokenizers; SDXL's
# second text encoder too) or one transformers model; the download commands in error messages fetch just these.
DIFFUSERS_PATTERNS = ("*.json", "*.txt", "*/diffusion_pytorch_model.safetensors", "text_encoder*/model.safetensors")
MODEL_PATTERNS = ("*.json", "*.txt", "*.safetensors")
# A motion adapter repository holds its weights in fp32 and fp16 (AnimateDiff's, AnimateLCM's beside a LoRA and a
# .ckpt): what MotionAdapter.from_pretrained reads is the config and the fp32 safetensors
PART_PATTERNS = {"motion": ("config.json", "diffusion_pytorch_model.safetensors")}
# What diffusers' single-file loader needs besides the checkpoint: model configs and the tokenizer, no weights.
CONFIG_PATTERNS = ["*.json", "**/*.json", "*.txt", "**/*.txt", "**/*.model"]
# A key of the original (CompVis/LDM) layout and its last dimension: 768 for SD1.x, 1024 for SD2.x.
LDM_CROSS_ATTENTION_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
LDM_SDXL_KEY = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
# SDXL's text encoders sit under conditioner.embedders.*; SD1.x/2.x's under cond_stage_model.*
LDM_TEXT_PREFIXES = {"sdxl": "conditioner.embedders.", "sd15": "cond_stage_model."}
FAMILY_NAMES = {"sd15": "Stable Diffusion 1.5", "sdxl": "SDXL"}


class WeightsNotFound(ValueError):
    """Weights that are neither local nor in the Hub cache while downloading is off (or failed)."""


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no")


def looks_local(source: str) -> bool:
    """A path rather than a Hub id: absolute, relative with ./ or ~, or naming a weights file."""
    return source.startswith(("/", ".", "~")) or (
        ":" not in source and source.endswith(SINGLE_FILE_SUFFIXES + PICKLE_SUFFIXES))


def split_source(source: str) -> tuple[str, str | None]:
    """'repo/id:sub/folder' -> ('repo/id', 'sub/folder'); local paths are returned whole."""
    if Path(source).exists() or ":" not in source:
        return source, None
    repo, _, sub = source.partition(":")
    return repo, sub or None


def download_hint(part: str, repo: str, path: str | None = None, folder: bool = False) -> str:
    """The command that puts what a part needs of `repo` into the cache (not the whole repository: SD1.5's
    holds every weight several times over), and the flag that points at a local copy instead."""
    if path is not None and not folder:
        command = f"hf download {repo} {path}"
    else:
        if path is None:
            patterns = DIFFUSERS_PATTERNS if part in PIPELINE_PARTS else PART_PATTERNS.get(part, MODEL_PATTERNS)
        else:
            patterns = (f"{path}/*",) if part in PIPELINE_PARTS else tuple(
                f"{path}/{p}" for p in PART_PATTERNS.get(part, MODEL_PATTERNS))
        command = f"hf download {repo} " + " ".join(f"--include '{p}'" for p in patterns)
    flag = PART_FLAGS.get(part, f"--{part.replace('_', '-')}")
    return (f"download it once while online with `{command}` (it lands in the Hugging Face cache), "
            f"or give a local copy with {flag} PATH (Python: {part}=PATH)")


def not_found(part: str, source: str, error: Exception, folder: bool = False) -> WeightsNotFound:
    logger.debug("%s %s: %r", part, source, error)  # the Hub library's own words, for debugging
    repo, sub = split_source(source)
    what = f"'{repo}'" + (f" ({sub})" if sub else "")
    reason = (
        "is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it"
        if offline() else f"could not be downloaded ({_first_line(error)})"
    )
    return WeightsNotFound(f"{part.replace('_', ' ')} {what} {reason}; {download_hint(part, repo, sub, folder)}")


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _cause(error: BaseException, kind: type) -> BaseException | None:
    """The first exception of `kind` in the chain of causes (libraries often re-raise as OSError)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kind):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _check_local(part: str, source: str) -> None:
    if looks_local(source) and not Path(source).expanduser().exists():
        raise ValueError(f"{part.replace('_', ' ')}: file not found: {source} (give an existing path or a Hub id)")


def resolve_file(source: str, part: str = "file") -> Path:
    """A local file, or 'repo/id:path/in/repo' fetched from (or found in) the Hub cache."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    _check_local(part, source)
    repo, sub = split_source(source)
    if sub is None:
        raise ValueError(f"{part.replace('_', ' ')}: file not found: {source} "
                         "(give a local path or 'hub-repo/id:path/in/repo')")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, sub, local_files_only=offline()))
    except OSError as error:  # LocalEntryNotFoundError, HTTP errors, OfflineModeIsEnabled are all OSErrors
        raise not_found(part, source, error) from None


def load_pretrained(cls, source: str, dtype: torch.dtype, part: str = "model", **kwargs):
    """cls.from_pretrained from a local folder or 'repo/id[:subfolder]', honouring HF_HUB_OFFLINE."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        try:
            return cls.from_pretrained(str(folder), dtype=dtype, **kwargs)
        except OSError as error:  # a folder without the model's config or weights
            raise ValueError(f"{part.replace('_', ' ')}: the folder {folder} does not hold a {cls.__name__} "
                             f"({_first_line(error)}); give the model's own folder (where its config is) or a Hub id"
                             ) from None
    _check_local(part, source)
    repo, sub = split_source(source)
    if sub is not None:
        kwargs["subfolder"] = sub
    try:
        return cls.from_pretrained(repo, dtype=dtype, local_files_only=offline(), **kwargs)
    except OSError as error:
        raise not_found(part, source, error, folder=sub is not None) from None


def read_tensors(path: str | Path, label: str | None = None) -> dict:
    """All tensors of a .safetensors file, or the dict of a pickled file read with weights_only=True."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    label = label or path.name
    if not path.is_file():
        raise ValueError(f"{label}: file not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{label} is empty (0 bytes): the download was probably interrupted; download it again")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, RuntimeError) as error:
            raise ValueError(f"{label} is not a readable .safetensors file ({_first_line(error)}): "
                             "it is corrupt or truncated; download it again") from None
    if path.suffix in PICKLE_SUFFIXES:
        import pickle
        import zipfile

        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise ValueError(f"{label} holds objects other than tensors, which are never unpickled here "
                             f"({_first_line(error)}); use a .safetensors version of it") from None
        except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
            raise ValueError(f"{label} is not a readable PyTorch file ({_first_line(error)}): "
                             "it is corrupt or truncated; download it again") from None
        if not isinstance(data, dict):
            raise ValueError(f"{label} holds a {type(data).__name__}, not a dict of tensors")
        return data
    raise ValueError(f"{label}: unknown weights format {path.suffix!r}; give a .safetensors, .bin or .ckpt file")


# --- base models ------------------------------------------------------------------------------------------
def pipeline_family(pipeline: str) -> str:
    """'sd15' or 'sdxl': the model family of a diffusers pipeline class name FlexIP attaches to."""
    from flexip_core.generation.pipeline import FAMILY_OF

    if pipeline not in FAMILY_OF:
        raise ValueError(f"pipeline {pipeline!r} is not one FlexIP attaches to; one of {', '.join(FAMILY_OF)}")
    return FAMILY_OF[pipeline]


def load_base(source: str, dtype: torch.dtype, config: str | None = None, lora: str | None = None,
              pipeline: str = "StableDiffusionPipeline", part: str = "base", **components):
    """The diffusers pipeline `pipeline` (a class name of the SD1.5 or SDXL family) over a base of that family.

    `source` is a diffusers folder, a Hub id, or one .safetensors/.ckpt checkpoint; `config` is where a
    checkpoint's model config and tokenizer come from (default: the family's diffusers repository, from the
    cache); `lora`, if given, is loaded through diffusers' load_lora_weights and fused into the weights; `part`
    names the profile part in messages; `components` are extra ones the class needs (controlnet=).
    """
    import diffusers

    cls = getattr(diffusers, pipeline, None)
    if cls is None or not isinstance(cls, type):
        raise ValueError(f"pipeline {pipeline!r} is not a diffusers pipeline class")
    family = pipeline_family(pipeline)
    common = dict(components)
    if "requires_safety_checker" in inspect.signature(cls.__init__).parameters:  # not SDXL's, nor AnimateDiff's
        common.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if Path(source).suffix in SINGLE_FILE_SUFFIXES:  # a local file or 'repo/id:file.safetensors'
        pipe = load_single_file(cls, resolve_file(source, part), dtype, config, common, family)
    else:
        pipe = load_pretrained(cls, source, dtype, part=part, **common)
    if lora:
        load_lora(pipe, lora)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def single_file_config(config: str | None, family: str = "sd15") -> Path:
    """A local diffusers folder holding a family's model configs and tokenizers (no weights are fetched): `config`,
    else the family's diffusers repository (SD1.5: stable-diffusion-v1-5, SDXL: stable-diffusion-xl-base-1.0)."""
    from huggingface_hub import snapshot_download

    from flexip_core.loading.architectures import FAMILY_REPOS

    if config and Path(config).expanduser().is_dir():
        return Path(config).expanduser()
    if config:
        _check_local("base_config", config)
    repo = config or FAMILY_REPOS[family]
    try:
        return Path(snapshot_download(repo, allow_patterns=CONFIG_PATTERNS, local_files_only=offline()))
    except OSError as error:
        reason = ("are not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading them"
                  if offline() else f"could not be downloaded ({_first_line(error)})")
        raise WeightsNotFound(
            f"a single-file checkpoint needs the model config and tokenizer of its architecture (small files, no "
            f"weights), and those of '{repo}' {reason}; download them once while online with "
            f"`hf download {repo} --include '*.json' --include '*.txt'`, or give a local diffusers folder of an "
            f"{FAMILY_NAMES[family]} model with --base-config PATH (Python: base_config=PATH)"
        ) from None


def check_checkpoint_family(path: Path, family: str = "sd15") -> None:
    """Refuse a single file of another model family early (SDXL on an SD1.5 profile, SD1.x/2.x on an SDXL one,
    SD2 anywhere), from the key names and one shape (no tensor is loaded)."""
    if path.suffix != ".safetensors":
        return  # a .ckpt cannot be inspected without reading it; diffusers' shape errors are reported instead
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
            width = None
            if LDM_CROSS_ATTENTION_KEY in keys:
                width = handle.get_slice(LDM_CROSS_ATTENTION_KEY).get_shape()[-1]  # (320, 768) in SD1.x
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path.name} is not a readable .safetensors file ({_first_line(error)}): "
                         "it is corrupt or truncated; download it again") from None
    if width is not None and width != 768:
        raise ValueError(f"{path.name} has {width}-wide cross-attention (SD 2.x?); FlexIP needs {_article(family)} "
                         f"{FAMILY_NAMES[family]} checkpoint here (SD1.5: {LDM_CROSS_ATTENTION_KEY} is (320, 768))")
    found = "sdxl" if LDM_SDXL_KEY in keys else next(
        (f for f, prefix in LDM_TEXT_PREFIXES.items() if any(k.startswith(prefix) for k in keys)), None)
    if found is not None and found != family:
        short = {"sd15": "SD1.5", "sdxl": "SDXL"}[found]
        raise ValueError(f"{path.name} is {_article(found)} {FAMILY_NAMES[found]} checkpoint, and this profile runs "
                         f"{FAMILY_NAMES[family]}: use it with an {short} profile (--profile {found}, Python: "
                         f"from_profile('{found}', base=...)), or give {_article(family)} {FAMILY_NAMES[family]} "
                         "checkpoint")
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        raise ValueError(f"{path.name} is not a Stable Diffusion checkpoint in the original single-file layout "
                         "(no model.diffusion_model.* keys); for a diffusers folder give the folder instead")


def _article(family: str) -> str:
    return "an" if family == "sdxl" else "a"


def load_single_file(cls, path: Path, dtype: torch.dtype, config: str | None, common: dict, family: str = "sd15"):
    """`cls.from_single_file` (a diffusers pipeline of `family`) with a local config folder, so it works offline."""
    check_checkpoint_family(path, family)
    folder = single_file_config(config, family)
    import pickle

    try:
        return cls.from_single_file(str(path), config=str(folder), dtype=dtype, local_files_only=True, **common)
    except (RuntimeError, KeyError, ValueError, OSError, pickle.UnpicklingError) as error:
        if isinstance(error, WeightsNotFound):
            raise
        refused = _cause(error, pickle.UnpicklingError)  # diffusers reads .ckpt with weights_only=True
        if refused is not None:
            raise ValueError(f"{path.name} holds objects other than tensors, which are never unpickled here "
                             f"({_first_line(refused)}); use a .safetensors version of it") from None
        name = FAMILY_NAMES[family]
        raise ValueError(f"{path.name} could not be loaded as {_article(family)} {name} checkpoint with the config in "
                         f"{folder} ({_first_line(error)}); check that it is {_article(family)} {name} model and not "
                         "corrupt") from None


def load_lora(pipe, source: str) -> None:
    """diffusers' load_lora_weights (a local file, a Hub repo, or 'repo:file'), fused into the weights."""
    path = Path(source).expanduser()
    repo, weight_name = (str(path), None) if path.exists() else split_source(source)
    if not path.exists():
        _check_local("lora", source)
    try:
        pipe.load_lora_weights(repo, weight_name=weight_name, adapter_name="lora",
                               **({} if path.exists() else {"local_files_only": offline()}))
    except OSError as error:
        if path.exists():  # here, not a download that failed: a file diffusers cannot read as LoRA weights
            raise ValueError(f"lora: {path.name} is not a readable LoRA weights file ({_first_line(error)}); "
                             "give a LoRA .safetensors file or folder made for this base model") from None
        raise not_found("lora", source, error) from None
    except (ValueError, KeyError, RuntimeError) as error:
        example = ("an SDXL LoRA such as latent-consistency/lcm-lora-sdxl" if hasattr(pipe, "text_encoder_2") else
                   "an SD1.5 LoRA such as latent-consistency/lcm-lora-sdv1-5")
        raise ValueError(f"LoRA {source} does not fit this base model ({_first_line(error)}); give {example}"
                         ) from None
    pipe.fuse_lora(adapter_names=["lora"], lora_scale=1.0)  # folded into the weights: no per-step LoRA cost
    pipe.unload_lora_weights()  # drops the LoRA layers, keeps the fused weights
    logger.info("fused LoRA %s", source)


# --- the cache ------------------------------------------------------------------------------------------
def in_cache(source: str, files: tuple[str, ...] = ()) -> bool:
    """Whether a Hub source (or local path) is there without downloading: its `files` (or itself) are cached."""
    from huggingface_hub import try_to_load_from_cache

    if Path(source).expanduser().exists():
        return True
    repo, sub = split_source(source)
    wanted = files or ((sub,) if sub else ("model_index.json",))
    prefix = f"{sub}/" if sub and files else ""
    return all(isinstance(try_to_load_from_cache(repo, prefix + f), str) for f in wanted)


# The files that show a Hub folder's weights are cached, by profile part (a lone file is its own proof).
CACHE_EVIDENCE = {
    "base": ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
             "text_encoder/model.safetensors"),
    "clip_encoder": ("config.json", "model.safetensors"),
    "controlnet": ("config.json", "diffusion_pytorch_model.safetensors"),
    "motion": PART_PATTERNS["motion"],
}


def profile_cached(profile) -> bool:
    """Whether loading `profile` needs no download: every model source it names (DINOv2 aside, which only some
    adapters load) is a local path or has its weights in the local Hugging Face cache. Reads the cache only."""
    if profile.build:
        return True  # built locally, never downloaded
    controlnets = (profile.controlnet,) if isinstance(profile.controlnet, str) else profile.controlnet or ()
    parts = [(part, getattr(profile, part)) for part in ("base", "base_config", "clip_encoder", "adapter",
                                                          "preservation", "personalization", "lora")]
    if profile.pipeline == "AnimateDiffPipeline":  # an animate profile loads its motion adapter with the base
        parts.append(("motion", profile.motion))
    for part, source in parts + [("controlnet", source) for source in controlnets]:
        if not source:
            continue
        files = () if Path(split_source(source)[1] or "").suffix else CACHE_EVIDENCE.get(part, ())
        if part == "base" and files and "XL" in profile.pipeline:  # SDXL's second text encoder
            files = (*files, "text_encoder_2/model.safetensors")
        if not in_cache(source, files):
            return False
    return True


def unet_layout(base: str | None, base_config: str | None = None, family: str = "sd15"
                ) -> tuple[tuple[tuple[str, int], ...], int]:
    """(cross-attention layers, token width) of a base model's UNet, from its config alone (no weights).

    None means the architecture of `family` ("sd15" or "sdxl", from architectures.py: nothing is read); a single-file
    base takes its config from `base_config` (default: that architecture too).
    """
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from flexip_core.generation.adapters import cross_attention_layers
    from flexip_core.loading.architectures import FAMILY_UNETS

    if family not in FAMILY_UNETS:
        raise ValueError(f"unknown model family {family!r}; one of {', '.join(FAMILY_UNETS)}")
    if base is None or (Path(base).suffix in SINGLE_FILE_SUFFIXES and base_config is None):
        config = dict(FAMILY_UNETS[family])
    elif Path(base).suffix in SINGLE_FILE_SUFFIXES:
        config = UNet2DConditionModel.load_config(str(single_file_config(base_config, family)), subfolder="unet")
    elif Path(base).expanduser().is_dir():
        config = UNet2DConditionModel.load_config(str(Path(base).expanduser()), subfolder="unet")
    else:
        _check_local("base", base)
        repo, sub = split_source(base)
        try:
            config = UNet2DConditionModel.load_config(repo, subfolder="/".join(filter(None, (sub, "unet"))),
                                                      local_files_only=offline())
        except OSError as error:
            raise not_found("base", base, error) from None
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    return cross_attention_layers(unet), unet.config.cross_attention_dim
