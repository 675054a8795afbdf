"""Building a FlexIPPipeline from a profile: resolve sources, load components, attach the adapter."""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from pathlib import Path

from transformers import CLIPVisionModelWithProjection, Dinov2Model

from flexip_core.generation.adapters import FlexIPAdapter, cross_attention_layers
from flexip_core.generation.devices import (
    LowVRAM,
    NotEnoughMemory,
    free_memory,
    is_out_of_memory,
    out_of_memory_message,
    pick_device,
    pick_dtype,
)
from flexip_core.generation.encoders import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, Preprocess, SubjectEncoder
from flexip_core.loading.profiles import Profile, cache_home, load_profile
from flexip_core.loading.sources import load_base, load_pretrained, resolve_file
from flexip_core.loading.weights import load_adapter

logger = logging.getLogger(__name__)

PLACEHOLDER_FIELDS = ("base", "base_config", "clip_encoder", "dino_encoder", "adapter", "preservation",
                      "personalization", "lora", "inpaint_base", "motion", "preview_vae")


def ensure_built(kind: str) -> Path:
    """Locally built models (the tiny random set), written once into the FlexIP cache folder."""
    if kind != "tiny":
        raise ValueError(f"no local builder named {kind!r}")
    from flexip_core.loading.tiny import TINY_VERSION, write_tiny_models

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
    values = {f: getattr(profile, f).replace("{build}", root) for f in PLACEHOLDER_FIELDS if getattr(profile, f)}
    if profile.control:
        values["control"] = {kind: source.replace("{build}", root) for kind, source in profile.control.items()}
    return profile.with_overrides(**values)


def apply_overrides(profile: Profile, overrides: dict) -> Profile:
    """Profile parts replaced by keyword overrides; IP-Adapter files given as overrides win over the
    profile's own native adapter (and a native adapter given as an override wins over everything)."""
    profile = profile.with_overrides(**overrides)
    if (overrides.get("preservation") or overrides.get("personalization")) and not overrides.get("adapter"):
        profile = dataclasses.replace(profile, adapter=None)
    return profile


def encoder_preprocess(model, mean, std, largest: int | None = None) -> Preprocess:
    size = model.config.image_size
    return Preprocess(min(size, largest) if largest else size, mean, std)


def load_adapter_for_unet(unet, *, adapter=None, preservation=None, personalization=None) -> FlexIPAdapter:
    """A FlexIP adapter sized for `unet`: a native file (or a FlexIPAdapter as it is), or IP-Adapter / native files
    per branch."""
    if isinstance(adapter, FlexIPAdapter):
        return adapter
    layers = cross_attention_layers(unet)
    if adapter:
        return load_adapter(resolve_file(adapter, "adapter"), layers=layers)
    if preservation or personalization:
        from flexip_core.loading.ip_adapter import adapter_from_ip_adapter_files

        return adapter_from_ip_adapter_files(preservation, personalization, layers,
                                             cross_attention_dim=unet.config.cross_attention_dim)
    raise ValueError("no adapter: give adapter= (a native FlexIP file) or preservation=/personalization= "
                     "(IP-Adapter files)")


def load_adapter_for(profile: Profile, unet) -> FlexIPAdapter:
    if not (profile.adapter or profile.preservation or profile.personalization):
        raise ValueError(f"profile {profile.name!r} names no adapter: give adapter= or preservation=/personalization=")
    return load_adapter_for_unet(unet, adapter=profile.adapter, preservation=profile.preservation,
                                 personalization=profile.personalization)


def load_subject_encoder(adapter: FlexIPAdapter, clip_encoder, dino_encoder, dtype, device) -> SubjectEncoder:
    """CLIP (and DINOv2 when the adapter needs it) from sources or loaded models, checked against the adapter."""
    if clip_encoder is None:
        raise ValueError("clip_encoder is required: the CLIP vision tower (the IP-Adapter SD1.5 files need "
                         "h94/IP-Adapter:models/image_encoder)")
    clip = clip_encoder if not isinstance(clip_encoder, (str, Path)) else load_pretrained(
        CLIPVisionModelWithProjection, str(clip_encoder), dtype, part="clip_encoder")
    clip = clip.to(device, dtype).eval()
    dino = None
    if "dino" in adapter.needs:
        if dino_encoder is None:
            raise ValueError("the adapter needs DINOv2 features; give dino_encoder=")
        dino = dino_encoder if not isinstance(dino_encoder, (str, Path)) else load_pretrained(
            Dinov2Model, str(dino_encoder), dtype, part="dino_encoder")
        dino = dino.to(device, dtype).eval()
    check_encoders(adapter, clip, dino, _source(clip_encoder), _source(dino_encoder))
    return SubjectEncoder(
        clip, encoder_preprocess(clip, CLIP_MEAN, CLIP_STD),
        dino, encoder_preprocess(dino, IMAGENET_MEAN, IMAGENET_STD, largest=224) if dino is not None else None,
        needs=adapter.needs,
    )


def _source(model) -> str:
    return str(model) if isinstance(model, (str, Path)) else type(model).__name__


def check_encoders(adapter, clip, dino, clip_source: str, dino_source: str) -> None:
    """Each branch's input widths equal what the image encoders produce; errors say which encoder to use."""
    branches = (("preservation", adapter.config.preservation), ("personalization", adapter.config.personalization))
    for branch, cfg in branches:
        wanted = []
        if "clip_embeds" in cfg.needs:
            wanted.append(("CLIP image embeddings", cfg.clip_embed_dim, clip.config.projection_dim,
                           clip_source))
        if "clip_hidden" in cfg.needs:
            wanted.append(("CLIP hidden states", cfg.clip_hidden_dim, clip.config.hidden_size, clip_source))
        if "dino" in cfg.needs and dino is not None:
            wanted.append(("DINOv2 patch tokens", cfg.dino_dim, dino.config.hidden_size, dino_source))
        for what, expects, gives, source in wanted:
            if expects != gives:
                raise ValueError(
                    f"the {branch} branch ({cfg.kind}) expects {expects}-wide {what}, but the encoder {source} gives "
                    f"{gives}; the SD1.5 IP-Adapter files and SDXL's *_vit-h ones need OpenCLIP ViT-H/14 "
                    "(--clip-encoder h94/IP-Adapter:models/image_encoder), SDXL's other ones ViT-bigG "
                    "(h94/IP-Adapter:sdxl_models/image_encoder)")


def assemble(cls, name: str, *, device=None, dtype=None, attention=None, low_vram=None, **overrides):
    device = pick_device(device if device is not None else load_profile(name).device)
    low_vram = LowVRAM.parse(low_vram)
    message = None
    try:
        return _assemble(cls, name, device, dtype, attention, low_vram, overrides)
    except Exception as error:  # out of memory while loading: the same advice as during generation
        if not is_out_of_memory(error):
            raise
        message = out_of_memory_message("load this profile", device, low_vram is not None, str(error).splitlines()[0])
    free_memory()  # outside the except block: the failed load's tensors are released first
    raise NotEnoughMemory(message)


def _assemble(cls, name, device, dtype, attention, low_vram, overrides):
    profile = resolve_placeholders(apply_overrides(load_profile(name), overrides))
    dtype = pick_dtype(dtype if dtype is not None else profile.dtype, device)
    logger.info("loading profile %s on %s (%s%s)", profile.name, device, dtype, ", low VRAM" if low_vram else "")
    extra = {"controlnet": load_controlnets(profile.controlnet, dtype)} if profile.controlnet else {}
    if profile.pipeline == "AnimateDiffPipeline":  # an animate profile: its UNet gets the motion modules on load
        if not profile.motion:
            raise ValueError(f"profile {profile.name!r} runs AnimateDiffPipeline and names no motion adapter; give "
                             "motion= (e.g. guoyww/animatediff-motion-adapter-v1-5-3)")
        extra["motion_adapter"] = load_motion_adapter(profile.motion, dtype)
    pipe = load_base(profile.base, dtype, config=profile.base_config, lora=profile.lora, pipeline=profile.pipeline,
                     **extra)
    adapter = load_adapter_for(profile, pipe.unet)
    offload = low_vram is not None and low_vram.cpu_offload and device.type == "cuda"
    place = "cpu" if offload else device  # offloaded models move to the GPU only while they run
    if not offload:
        pipe.to(device)
    encoder = load_subject_encoder(adapter, profile.clip_encoder, profile.dino_encoder, dtype, place)
    return cls(pipe, encoder=encoder, adapter=adapter, profile=profile, attention=attention, low_vram=low_vram,
               device=device, preview_vae=load_preview_vae(profile.preview_vae, dtype), compile=profile.compile,
               channels_last=profile.channels_last)


def load_preview_vae(source: str | None, dtype):
    """diffusers' AutoencoderTiny (TAESD) from a local folder or the Hub cache, never downloaded; None when the profile
    names none or it is not there (one log line says how to get it: previews then use the linear projection)."""
    from diffusers import AutoencoderTiny

    from flexip_core.loading.sources import in_cache, split_source

    if not source:
        return None
    repo, sub = split_source(source)
    weights = ("config.json", "diffusion_pytorch_model.safetensors")
    if not in_cache(source, weights):
        logger.info("preview autoencoder %s is not downloaded: step previews use the linear projection (to get it: "
                    "hf download %s)", source, repo)
        return None
    if Path(source).expanduser().is_dir():
        return load_pretrained(AutoencoderTiny, source, dtype, part="preview_vae").eval().requires_grad_(False)
    extra = {"subfolder": sub} if sub else {}
    vae = AutoencoderTiny.from_pretrained(repo, dtype=dtype, local_files_only=True, **extra)
    return vae.eval().requires_grad_(False)


def load_controlnets(sources, dtype):
    """One ControlNetModel, or a list of them (diffusers wraps several in a MultiControlNetModel)."""
    from diffusers import ControlNetModel

    if isinstance(sources, str):
        return load_pretrained(ControlNetModel, sources, dtype, part="controlnet")
    return [load_pretrained(ControlNetModel, source, dtype, part="controlnet") for source in sources]


def load_motion_adapter(source: str, dtype):
    """An AnimateDiff MotionAdapter (diffusers format) from a local folder or 'repo/id[:subfolder]'."""
    from diffusers import MotionAdapter

    return load_pretrained(MotionAdapter, source, dtype, part="motion")


def task_unavailable(profile: Profile, task: str) -> str | None:
    """Why `profile` cannot run `task` (image-to-image, inpainting, controlnet, animate), read from its fields and,
    for inpainting without an inpainting base, its UNet's config (no weights); None when it can."""
    runs = "needs real weights (profile sd15 or sdxl) or the tiny test profile"
    if task == "animate" and not profile.motion:
        from flexip_core.generation.pipeline import FAMILIES, FAMILY_OF

        if "animate" not in FAMILIES[FAMILY_OF.get(profile.pipeline, "sd15")]:
            return (f"the {profile.name} profile's base is not Stable Diffusion 1.5, the only family AnimateDiff's "
                    "motion adapters are made for: the Animate mode needs real weights (profile sd15 or "
                    "sd15-animate) or the tiny test profile")
        return (f"the {profile.name} profile names no AnimateDiff motion adapter for its base: the Animate mode needs "
                "real weights (profile sd15 or sd15-animate) or the tiny test profile")
    if task == "controlnet" and not profile.control:
        return f"the {profile.name} profile names no ControlNet for its base: the Control mode {runs}"
    if task == "inpainting" and not profile.inpaint_base and Path(profile.base).is_dir():
        from diffusers import UNet2DConditionModel

        channels = UNet2DConditionModel.load_config(profile.base, subfolder="unet")["in_channels"]
        if channels not in (4, 9):
            return (f"the {profile.name} profile's base draws in a {channels}-channel latent space, and diffusers' "
                    f"inpainting takes 4 (or an inpainting model's 9): the Inpaint mode {runs}")
    return None


def load_task(flexip, task: str, control: str | None = None):
    """The profile's FlexIPPipeline for another task: image-to-image on the same components; inpainting on the
    profile's inpainting base when it names one (else the same components); the control task on the profile's
    ControlNet of kind `control`; the animate task on the same components with the profile's motion adapter. A
    ValueError says what the profile lacks."""
    profile = flexip.profile
    if profile is None:
        raise ValueError("this FlexIPPipeline was not built from a profile; use for_task() with your own pipeline")
    if task == "controlnet":
        kinds = ", ".join(profile.control) or "none"
        if not control or control not in profile.control:
            if not profile.control:
                raise ValueError(f"the control mode needs a ControlNet for this base, and profile {profile.name!r} "
                                 "names none: it needs real weights (sd15 or sdxl) or the tiny test profile")
            raise ValueError(f"unknown control kind {control!r}; profile {profile.name!r} has: {kinds}")
        source = profile.control[control]
        return flexip.for_task(task, controlnet=load_controlnets(source, flexip.dtype).to(flexip.device))
    if task == "inpainting" and profile.inpaint_base:
        from flexip_core.generation.pipeline import FAMILIES

        pipe = load_base(profile.inpaint_base, flexip.dtype, config=profile.base_config, lora=profile.lora,
                         pipeline=FAMILIES[flexip.family]["inpainting"], part="inpaint_base")
        if flexip.offload_hooks or flexip.low_vram is None or not flexip.low_vram.cpu_offload:
            pipe.to(flexip.device)
        return flexip.for_task(task, pipe=pipe)
    if task == "animate" and flexip.task != "animate":
        missing = task_unavailable(profile, task)
        if missing:
            raise ValueError(missing)
        return flexip.for_task(task, motion_adapter=load_motion_adapter(profile.motion, flexip.dtype))
    return flexip.for_task(task)
