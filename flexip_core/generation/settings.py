"""One generation's settings as one small, torch-free value.

The studio, the API, the command line, the evaluator and the PNG `parameters` chunk all pass and restore a
`Generation`: one name per concept (the pipeline's own argument names), one validation, one seed range, one
parser for γ lists.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields, replace

from flexip_core.generation.gate import GateSchedule, check_unit
from flexip_core.generation.schedulers import SCHEDULER_NAMES

MAX_SEED = 2**32 - 1  # one seed range everywhere (what browsers hold exactly, and what other SD tools write)
MAX_STEPS = 500  # more denoising steps than this is refused as absurd
MAX_BATCH = 16  # most images (γ values) in one pipeline call
MAX_SIDE = 2048  # largest height or width any profile accepts (a profile may accept less)
TASKS = ("text-to-image", "image-to-image", "inpainting", "controlnet", "animate")
MAX_FRAMES = 1024  # more frames in one clip than this is refused as absurd (a motion adapter may take fewer)
MAX_FPS = 60  # highest frame rate a clip is written at
WINDOW_FIELDS = ("pres_from", "pres_until", "pers_from", "pers_until")


@dataclass(frozen=True)
class Generation:
    """Everything that decides one image besides the model and the subject's photos."""

    prompt: str = ""  # what to make of the subject
    negative_prompt: str = ""  # what to steer away from ("" = none)
    gate: float = 0.5  # γ: 1 keeps identity, 0 follows the prompt
    strength: float = 1.0  # overall adapter strength s (default curve: w_pres = s·γ, w_pers = s·(1-γ))
    seed: int = 0  # noise seed, 0 to MAX_SEED; the same seed and settings give the same image
    num_inference_steps: int = 30  # denoising steps
    guidance_scale: float = 7.5  # classifier-free guidance scale (1 or less: no guidance)
    height: int | None = 512  # output height in pixels (None: from the task's input image)
    width: int | None = 512  # output width in pixels (None: from the task's input image)
    scheduler: str | None = None  # sampler name (flexip_core.generation.schedulers); None keeps the pipeline's own
    windows: GateSchedule = field(default_factory=GateSchedule)  # the steps each branch acts in
    task: str = "text-to-image"  # which diffusers pipeline made it (one of TASKS)
    task_inputs: tuple[tuple[str, float | str], ...] = ()  # the task's scalar inputs, e.g. (("strength", 0.6),)
    num_frames: int | None = None  # frames of a clip (the animate task); None for a still image
    fps: int | None = None  # frames per second a clip is written and played at; None for a still image

    def check(self, max_side: int = MAX_SIDE) -> Generation:
        """This value, or a ValueError naming the first setting that is wrong and what is accepted."""
        if not isinstance(self.prompt, str):
            raise ValueError(f"prompt must be text, got {type(self.prompt).__name__}")
        if not isinstance(self.negative_prompt, str):
            raise ValueError(f"negative_prompt must be text, got {type(self.negative_prompt).__name__}")
        check_unit(self.gate, "gate (γ)")
        check_unit(self.strength, "strength", high=2.0)
        check_whole(self.seed, "seed", 0, MAX_SEED, "2**32-1")
        check_whole(self.num_inference_steps, "num_inference_steps", 1, MAX_STEPS)
        if (isinstance(self.guidance_scale, bool) or not isinstance(self.guidance_scale, (int, float))
                or not math.isfinite(self.guidance_scale) or not 0 <= self.guidance_scale <= 50):
            raise ValueError(f"guidance_scale must be a number from 0 to 50, got {self.guidance_scale!r}")
        for label, side in (("height", self.height), ("width", self.width)):
            if side is None:
                continue
            if isinstance(side, bool) or not isinstance(side, int) or side % 8 or not 64 <= side <= max_side:
                raise ValueError(f"{label} must be a multiple of 8 from 64 to {max_side}, got {side!r}")
        if self.scheduler is not None and self.scheduler not in SCHEDULER_NAMES:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULER_NAMES)}")
        if not isinstance(self.windows, GateSchedule):
            raise ValueError(f"windows must be a GateSchedule, got {type(self.windows).__name__}")
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; one of {', '.join(TASKS)}")
        if self.task == "animate":
            check_whole(self.num_frames, "num_frames", 1, MAX_FRAMES)  # the pipeline checks its motion adapter's
            check_whole(self.fps, "fps", 1, MAX_FPS)
        elif self.num_frames is not None or self.fps is not None:
            raise ValueError(f"num_frames and fps are settings of a clip (the animate task), not of {self.task}")
        return self

    def at(self, gate: float) -> Generation:
        """The same settings at another γ."""
        return replace(self, gate=float(gate))

    def without_gate(self) -> tuple:
        """Everything but γ: generations that share this key differ only by γ (the slider may show them)."""
        values = self.to_parameters()
        values.pop("gate")
        return tuple(sorted((key, repr(value)) for key, value in values.items()))

    # --- the flat dict of the API, the PNG chunk and the evaluator's rows ---------------------------------
    def to_parameters(self) -> dict:
        """A flat JSON-able dict: the field names, with the windows as pres_from, ..., pers_until."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("windows", "task_inputs")}
        values.update(asdict(self.windows))
        values["task_inputs"] = dict(self.task_inputs)
        return values

    @classmethod
    def from_parameters(cls, params: dict, fallback: Generation | None = None) -> Generation:
        """The value of a parameters dict (out.parameters, the API's, a parsed PNG chunk); missing keys keep
        `fallback`'s values and unknown keys (model names, scores) are ignored. ValueError names a bad value."""
        base = fallback or cls()
        values = {key: params[key] for key in params if params[key] is not None}
        try:
            windows = GateSchedule(**{name: float(values.get(name, getattr(base.windows, name)))
                                      for name in WINDOW_FIELDS})
            inputs = values.get("task_inputs", dict(base.task_inputs))
            if not isinstance(inputs, dict):
                raise ValueError(f"task_inputs must be a dict, got {inputs!r}")
            scheduler = values.get("scheduler", base.scheduler)
            return cls(
                prompt=str(values.get("prompt", base.prompt)),
                negative_prompt=str(values.get("negative_prompt", base.negative_prompt)),
                gate=float(values.get("gate", base.gate)),
                strength=float(values.get("strength", base.strength)),
                seed=_whole(values.get("seed", base.seed)),
                num_inference_steps=_whole(values.get("num_inference_steps", base.num_inference_steps)),
                guidance_scale=float(values.get("guidance_scale", base.guidance_scale)),
                height=_whole(values["height"]) if "height" in values else base.height,
                width=_whole(values["width"]) if "width" in values else base.width,
                scheduler=None if scheduler in (None, "", "default") else str(scheduler),
                windows=windows,
                task=str(values.get("task", base.task)),
                task_inputs=tuple(sorted((str(k), _scalar(v)) for k, v in inputs.items())),
                num_frames=_whole(values["num_frames"]) if "num_frames" in values else base.num_frames,
                fps=_whole(values["fps"]) if "fps" in values else base.fps,
            ).check()
        except (TypeError, ValueError) as error:
            raise ValueError(f"the saved settings cannot be read ({error})") from None


def check_whole(value, name: str, low: int, high: int, high_text: str | None = None) -> int:
    """A whole number in [low, high] (bools refused), or a ValueError saying what is accepted."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        if not isinstance(value, bool) and hasattr(value, "__index__") and low <= int(value) <= high:
            return int(value)  # numpy integers
        raise ValueError(f"{name} must be a whole number from {low} to {high_text or high}, got {value!r}")
    return value


def _whole(value) -> int:
    number = float(value)
    if not number.is_integer():
        raise ValueError(f"{value!r} is not a whole number")
    return int(number)


def _scalar(value) -> float | str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        return value
    raise ValueError(f"task inputs must be numbers or text, got {value!r}")


def parse_gates(text, limit: int = MAX_BATCH) -> list[float]:
    """γ values from text such as "0, .25, .5, .75, 1" (or a list of numbers); ValueError says what is wrong."""
    if isinstance(text, (list, tuple)):
        parts = list(text)
    else:
        parts = [part for part in re.split(r"[\s,;]+", str(text or "")) if part]
    if not parts:
        raise ValueError("the γ list is empty; enter values between 0 and 1 such as 0, 0.25, 0.5, 0.75, 1")
    gates = []
    for part in parts:
        try:
            value = float(part)
        except (TypeError, ValueError):
            raise ValueError(f"γ value {part!r} is not a number; enter values between 0 and 1") from None
        if math.isnan(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"γ value {value:g} is outside 0…1")
        gates.append(value)
    if len(gates) > limit:
        raise ValueError(f"{len(gates)} γ values given; at most {limit} fit in one run")
    return gates
