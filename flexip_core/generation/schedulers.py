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
    cls = getattr(diffusers, class_name)
    if base_config.get("rescale_betas_zero_snr") and not supports_zero_snr(cls):
        usable = [n for n, (c, _) in SCHEDULERS.items() if supports_zero_snr(getattr(diffusers, c))]
        raise ValueError(f"scheduler {name!r} cannot sample this model: it was trained with a zero-terminal-SNR noise "
                         f"schedule, which {class_name} does not implement; choose one of {', '.join(usable)}")
    return cls.from_config(base_config, **extra)


def supports_zero_snr(cls) -> bool:
    """Whether a diffusers scheduler class can rescale its betas to zero terminal SNR (PNDM, for one, cannot)."""
    import inspect

    return "rescale_betas_zero_snr" in inspect.signature(cls.__init__).parameters


def scheduler_name(scheduler) -> str | None:
    """The name in SCHEDULERS of a scheduler object (its class and the extra config that name sets), else None."""
    config = getattr(scheduler, "config", {})
    for name, (class_name, extra) in SCHEDULERS.items():
        if type(scheduler).__name__ == class_name and all(config.get(k) == v for k, v in extra.items()):
            if not extra and any(config.get(k) for other, (c, e) in SCHEDULERS.items() if c == class_name
                                 for k in e):
                continue  # a Karras-sigmas DPM solver is not plain dpmpp_2m
            return name
    return None
