"""Scheduler names -> a fresh diffusers scheduler per call (schedulers hold per-run state)."""
from __future__ import annotations

# name -> (diffusers class name, extra config); importing this module does not import diffusers.
SCHEDULERS = {
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}
SCHEDULER_NAMES = tuple(SCHEDULERS)


def make_scheduler(name: str | None, base_config):
    """A new scheduler named `name` built from the base model's scheduler config (None: the base's own class)."""
    import diffusers

    if name is None:
        return getattr(diffusers, base_config["_class_name"]).from_config(base_config)
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)} or None")
    class_name, extra = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(base_config, **extra)
