"""Scheduler names -> a fresh diffusers scheduler per call (schedulers hold per-run state)."""
from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

SCHEDULERS = {
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
    "lcm": (LCMScheduler, {}),
}


def make_scheduler(name: str | None, base_config):
    """A new scheduler named `name` built from the base model's scheduler config (None: the base's own class)."""
    if name is None:
        from diffusers import SchedulerMixin  # noqa: F401  (class name is stored in the config)
        import diffusers

        cls = getattr(diffusers, base_config["_class_name"])
        return cls.from_config(base_config)
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)} or None")
    cls, extra = SCHEDULERS[name]
    return cls.from_config(base_config, **extra)
