"""The generation settings a user controls, as one frozen value, and their round trip through the PNG chunk."""
from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, fields, replace

logger = logging.getLogger(__name__)

MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class Settings:
    prompt: str  # what to make of the subject
    negative_prompt: str = ""  # what to steer away from ("" = none)
    gate: float = 0.5  # γ: 1 keeps identity, 0 follows the prompt freely
    strength: float = 1.0  # overall adapter strength s (w_pres = s·γ, w_pers = s·(1-γ))
    seed: int = 0  # noise seed; the same seed and settings give the same image
    steps: int = 20  # denoising steps
    guidance: float = 7.5  # classifier-free guidance scale
    width: int = 512  # output width in pixels
    height: int = 512  # output height in pixels
    scheduler: str = "dpmpp_2m"  # sampler name, one of the engine's schedulers
    identity_early: float = 1.0  # identity branch only for this first fraction of the steps (1.0 = all steps)

    def with_gate(self, gate: float) -> Settings:
        return replace(self, gate=float(gate))

    def cache_key(self, subject: str) -> tuple:
        """Everything but γ: renders that share this key differ only by γ, so the slider may show them."""
        values = asdict(self)
        values.pop("gate")
        return (subject, *sorted(values.items()))

    def as_core_parameters(self) -> dict:
        """The settings in the core's parameters vocabulary (flexip_core.generation.metadata, out.parameters)."""
        return {
            "prompt": self.prompt, "negative_prompt": self.negative_prompt, "gate": self.gate,
            "strength": self.strength, "seed": self.seed, "num_inference_steps": self.steps,
            "guidance_scale": self.guidance, "width": self.width, "height": self.height,
            "scheduler": self.scheduler, "gate_schedule": None if self.identity_early >= 1.0 else self.identity_early,
        }

    @classmethod
    def from_parameters(cls, params: dict, fallback: Settings | None = None) -> Settings:
        """Settings from a parameters dict (the core's out.parameters or a parsed PNG chunk); missing keys keep
        `fallback`'s values. Raises ValueError naming the first value that cannot be read."""
        base = asdict(fallback or cls(prompt=""))
        aliases = {"num_inference_steps": "steps", "guidance_scale": "guidance", "cfg_scale": "guidance",
                   "sampler": "scheduler", "negative": "negative_prompt"}
        values = {aliases.get(key, key): value for key, value in params.items()}
        if "size" in values and values["size"] not in (None, ""):
            width, height = _parse_size(values.pop("size"))
            base.update(width=width, height=height)
        if "gate_schedule" in values:
            schedule = values.pop("gate_schedule")
            base["identity_early"] = 1.0 if schedule in (None, "", "None", "none") else schedule
        known = {field.name: field.type for field in fields(cls)}
        for key, value in values.items():
            if key in known and value is not None:
                base[key] = value
        try:
            return cls(
                prompt=str(base["prompt"]), negative_prompt=str(base["negative_prompt"] or ""),
                gate=float(base["gate"]), strength=float(base["strength"]), seed=int(float(base["seed"])),
                steps=int(float(base["steps"])), guidance=float(base["guidance"]), width=int(float(base["width"])),
                height=int(float(base["height"])), scheduler=str(base["scheduler"]),
                identity_early=float(base["identity_early"]),
            )
        except (TypeError, ValueError) as error:
            raise ValueError(f"the saved settings cannot be read ({error})") from None


def _parse_size(size) -> tuple[int, int]:
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return int(size[0]), int(size[1])
    match = re.fullmatch(r"\s*(\d+)\s*[xX×,]\s*(\d+)\s*", str(size))
    if not match:
        raise ValueError(f"size {size!r} is not WIDTHxHEIGHT")
    return int(match.group(1)), int(match.group(2))


def parse_gates(text: str, limit: int = 9) -> list[float]:
    """γ values from text such as "0, .25, .5, .75, 1"; raises ValueError naming what is wrong."""
    parts = [part for part in re.split(r"[\s,;]+", text or "") if part]
    if not parts:
        raise ValueError("the γ list is empty; enter values between 0 and 1 such as 0, 0.25, 0.5, 0.75, 1")
    gates = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"γ value {part!r} is not a number; enter values between 0 and 1") from None
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"γ value {value:g} is outside 0…1")
        gates.append(value)
    if len(gates) > limit:
        raise ValueError(f"{len(gates)} γ values given; at most {limit} fit in one sweep")
    return gates


def parse_prompts(text: str, limit: int = 4) -> list[str]:
    """One prompt per non-empty line; raises ValueError when there are none or too many."""
    prompts = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not prompts:
        raise ValueError("no prompts given; write one prompt per line")
    if len(prompts) > limit:
        raise ValueError(f"{len(prompts)} prompts given; the grid takes at most {limit}")
    return prompts
