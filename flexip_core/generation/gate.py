"""The dynamic weight gate: user gamma and strength -> (w_pres, w_pers), optionally varying over the steps."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def check_unit(value, name: str, high: float = 1.0) -> float:
    """A finite number in [0, high], or a ValueError saying what is accepted."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, {high:g}], got {value!r}") from None
    if math.isnan(number) or not 0.0 <= number <= high:
        raise ValueError(f"{name} must be a number in [0, {high:g}], got {value!r}")
    return number


@dataclass(frozen=True)
class GateCurve:
    """Maps gamma (1 = keep identity, 0 = follow the prompt) to branch weights at strength 1.

    The default is the spec's linear curve w_pres = gamma, w_pers = 1 - gamma. A calibrated curve gives
    the weights at sample points of gamma; values in between are linearly interpolated.
    """

    gammas: tuple[float, ...] = (0.0, 1.0)  # sample points of gamma, increasing, from 0 to 1
    pres: tuple[float, ...] = (0.0, 1.0)  # w_pres at each sample point (strength 1)
    pers: tuple[float, ...] = (1.0, 0.0)  # w_pers at each sample point (strength 1)

    def __post_init__(self):
        if not (len(self.gammas) == len(self.pres) == len(self.pers)) or len(self.gammas) < 2:
            raise ValueError("a gate curve needs at least two points, with as many weights as gammas")
        if self.gammas[0] != 0.0 or self.gammas[-1] != 1.0 or any(np.diff(self.gammas) <= 0):
            raise ValueError("gate curve gammas must increase from 0 to 1")

    @classmethod
    def from_dict(cls, data: dict | None) -> GateCurve:
        if not data:
            return cls()
        return cls(tuple(data["gammas"]), tuple(data["pres"]), tuple(data["pers"]))

    def weights(self, gamma: float, strength: float = 1.0) -> tuple[float, float]:
        gamma = check_unit(gamma, "gate (gamma)")
        strength = check_unit(strength, "strength", high=2.0)
        w_pres = float(np.interp(gamma, self.gammas, self.pres))
        w_pers = float(np.interp(gamma, self.gammas, self.pers))
        return strength * w_pres, strength * w_pers


@dataclass(frozen=True)
class GateSchedule:
    """The window of the denoising steps in which each branch acts, as fractions of the steps run: identity early
    (`pres_until` < 1), identity late (`pres_from` > 0, PhotoMaker-style), or any window per branch."""

    pres_from: float = 0.0  # preservation acts on steps with progress >= pres_from ...
    pres_until: float = 1.0  # ... and progress < pres_until
    pers_from: float = 0.0  # personalization acts on steps with progress >= pers_from ...
    pers_until: float = 1.0  # ... and progress < pers_until

    def __post_init__(self):
        for name in ("pres_from", "pres_until", "pers_from", "pers_until"):
            check_unit(getattr(self, name), name)
        for branch in ("pres", "pers"):
            start, end = getattr(self, f"{branch}_from"), getattr(self, f"{branch}_until")
            if start >= end:
                raise ValueError(f"{branch}_from ({start:g}) must be below {branch}_until ({end:g}); to turn a branch "
                                 "off, set its weight to 0")

    @property
    def is_default(self) -> bool:
        return self == GateSchedule()

    def factors(self, step: int, total: int) -> tuple[float, float]:
        """(preservation on, personalization on) for step `step` of `total`; step 0 never depends on `total`."""
        progress = step / total
        return (float(self.pres_from <= progress < self.pres_until),
                float(self.pers_from <= progress < self.pers_until))


def as_schedule(value) -> GateSchedule | None:
    """None, a GateSchedule, or a float f meaning 'identity only in the first f of the steps'."""
    if value is None or isinstance(value, GateSchedule):
        return value
    fraction = check_unit(value, "gate_schedule (fraction of steps with identity)")
    if fraction == 0.0:
        raise ValueError("gate_schedule must be in (0, 1]; use gate=0 to turn identity off")
    return GateSchedule(pres_until=fraction)
