"""Profiles: data files naming a base model, encoders, adapter weights, gate curve and defaults."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from flexip_core.generation.gate import GateCurve

logger = logging.getLogger(__name__)

PROFILE_DIR = Path(__file__).resolve().parents[2] / "assets" / "profiles"
# torch.compile's modes, which a profile's `compile` field (and --compile MODE) may name (generation/speed.py)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class Defaults:
    """Generation settings a profile suggests; every one can be overridden per call."""

    height: int = 512  # output height in pixels
    width: int = 512  # output width in pixels
    num_inference_steps: int = 30  # denoising steps
    guidance_scale: float = 7.5  # classifier-free guidance scale
    scheduler: str | None = "dpmpp_2m"  # scheduler name; None keeps the base model's own
    max_side: int = 1024  # largest accepted height or width
    num_frames: int = 16  # frames of a clip (the animate task): AnimateDiff's 16 frames, 2 s at 8 fps
    fps: int = 8  # frames per second a clip is written and played at


@dataclass(frozen=True)
class Profile:
    name: str  # profile name ("tiny", "sd15", ...)
    base: str  # SD1.5-architecture base: Hub id, local folder, or single .safetensors/.ckpt file
    clip_encoder: str  # CLIP vision tower: Hub id[:subfolder] or local folder
    base_config: str | None = None  # for a single-file base: diffusers folder or Hub id with its config + tokenizer
    dino_encoder: str | None = None  # DINOv2: loaded only when an adapter needs it
    adapter: str | None = None  # native FlexIP adapter file (both branches)
    preservation: str | None = None  # IP-Adapter file for the preservation branch (when no native adapter)
    personalization: str | None = None  # IP-Adapter file for the personalization branch
    lora: str | None = None  # optional LoRA (e.g. LCM-LoRA) loaded through diffusers
    pipeline: str = "StableDiffusionPipeline"  # the diffusers pipeline class: the task is a profile, not code
    controlnet: str | tuple[str, ...] | None = None  # ControlNet source(s), for StableDiffusionControlNetPipeline
    inpaint_base: str | None = None  # an inpainting base for the inpainting task (None: the base itself inpaints)
    control: dict = field(default_factory=dict)  # the control task's ControlNets: kind ("canny") -> source
    motion: str | None = None  # the animate task's AnimateDiff motion adapter (a diffusers MotionAdapter: Hub id
    #   [:subfolder] or local folder); None: the profile does not animate
    build: str | None = None  # locally built models ("tiny"), written once into the FlexIP cache
    description: str = ""  # one line for the UI and --help
    notice: str | None = None  # a warning every render on this profile carries (tiny: its images are noise)
    defaults: Defaults = field(default_factory=Defaults)  # suggested generation settings
    gate_curve: GateCurve = field(default_factory=GateCurve)  # gamma -> branch weights
    dtype: str = "auto"  # "auto" (fp16 on CUDA, fp32 elsewhere), "float32", "float16", "bfloat16"
    device: str = "auto"  # where it runs unless the caller names a device: "auto" (CUDA, else Apple MPS, else CPU)
    #   or a torch device ("cpu" for mini: a GPU is no faster for so small a model, and its curve was measured there)
    preview_vae: str | None = None  # diffusers AutoencoderTiny for step previews and fast decodes (madebyollin/taesd,
    #   taesdxl): used when it is in a local folder or the Hub cache, never downloaded; else the linear projection
    compile: bool | str = False  # torch.compile the UNet for fixed shapes: true (CUDA graphs on CUDA) or a
    #   torch.compile mode; off everywhere until a lent GPU shows it pays (generation/speed.py)
    channels_last: bool = False  # the UNet in channels-last memory (NHWC); off until measured to pay
    world: str | None = None  # a module that plugs a world's own rules in (toyworld.plugin: its identity metric,
    #   prompt filter and note on reference photos); the core imports it only by this name
    calibration: dict | None = None  # what `python -m flexip_core.calibrate` measured to draw gate_curve (a record:
    #   command, subjects, prompts, seeds, steps, the measured path and its scores); never read to generate

    def __post_init__(self):
        if isinstance(self.controlnet, list):
            object.__setattr__(self, "controlnet", tuple(self.controlnet))
        if not isinstance(self.control, dict) or not all(isinstance(v, str) for v in self.control.values()):
            raise ValueError(f"profile {self.name}: control must map a kind (\"canny\") to a ControlNet source")

    def with_overrides(self, **overrides) -> Profile:
        known = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(known) - set(self.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown profile override(s): {', '.join(sorted(unknown))}")
        return replace(self, **known)


def load_world(name: str):
    """The world plugin a profile names (a module with IDENTITY_METRIC, identity_scores, model_text and
    reference_notes); imported by name, so no core module imports a world."""
    import importlib

    try:
        module = importlib.import_module(name)
    except ImportError as error:
        raise ValueError(f"profile world {name!r} cannot be imported ({error})") from None
    missing = [a for a in ("IDENTITY_METRIC", "identity_scores", "model_text", "reference_notes")
               if not hasattr(module, a)]
    if missing:
        raise ValueError(f"profile world {name!r} lacks {', '.join(missing)}")
    return module


def cache_home() -> Path:
    """Where locally built models live: $FLEXIP_HOME, else ~/.cache/flexip."""
    return Path(os.environ.get("FLEXIP_HOME", Path.home() / ".cache" / "flexip"))


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def load_profile(name_or_path: str) -> Profile:
    """Read a profile by name (assets/profiles/NAME.json) or from a .json path."""
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix != ".json":
        raise ValueError(f"profile {name_or_path}: a profile file is .json (see assets/profiles/); or give one of "
                         f"the names {', '.join(available_profiles())}")
    if path.suffix != ".json":
        path = PROFILE_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise ValueError(f"unknown profile {name_or_path!r}; available: {', '.join(available_profiles())}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"profile {path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"profile {path}: expected a JSON object of profile fields, got {type(data).__name__}")
    assets = str(PROFILE_DIR.parent)  # "{assets}/mini/base": weights shipped in the repo, found from any folder
    data = {key: value.replace("{assets}", assets) if isinstance(value, str) else value for key, value in data.items()}
    data["defaults"] = Defaults(**data.get("defaults", {}))
    data["gate_curve"] = GateCurve.from_dict(data.get("gate_curve"))
    fields = {f.name: f for f in dataclasses.fields(Profile)}
    missing = [name for name, f in fields.items() if name not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    unknown = sorted(set(data) - set(fields))
    if missing or unknown:
        problems = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unknown {', '.join(unknown)}"] if unknown else [])
        raise ValueError(f"profile {path}: " + "; ".join(problems))
    return Profile(**data)


def default_profile() -> str:
    """'sd15' when CUDA is present and its weights are in the local Hugging Face cache (loading it downloads
    nothing); else the best offline profile: 'mini' when its trained weights are in assets/mini, 'tiny' (random
    weights) when they are not. A first download of sd15 is asked for by name (`--profile sd15`)."""
    import torch

    from flexip_core.loading.sources import profile_cached

    names = available_profiles()
    if torch.cuda.is_available() and "sd15" in names and profile_cached(load_profile("sd15")):
        return "sd15"
    return "mini" if "mini" in names and Path(load_profile("mini").adapter).is_file() else "tiny"
