"""The studio's narrow view of the FlexIP core: an Engine protocol the handlers call, and CoreEngine, which
wraps flexip_core.FlexIPPipeline. Everything crossing this boundary is PIL images, numbers and strings."""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from PIL import Image

from flexip_core.generation.schedulers import SCHEDULER_NAMES

logger = logging.getLogger(__name__)

SCHEDULERS = SCHEDULER_NAMES  # the core's names; importing them does not import diffusers
StepCallback = Callable[[int, int, list], None]  # (step, total, preview images); may raise RenderCancelled


class RenderCancelled(Exception):
    """A render stopped early because the user (or a newer slider move) cancelled it."""


@dataclass(frozen=True)
class Defaults:
    width: int  # profile's default output width
    height: int  # profile's default output height
    steps: int  # profile's default number of denoising steps
    guidance: float  # profile's default classifier-free guidance scale
    scheduler: str  # profile's default sampler
    max_side: int = 1024  # largest width or height the profile accepts


@dataclass(frozen=True)
class RenderRequest:
    references: tuple[Image.Image, ...]  # validated RGB photos of one subject
    weights: tuple[float, ...]  # one weight per photo
    prompt: str
    negative_prompt: str
    gates: tuple[float, ...]  # one output image per γ, rendered as one batch
    strength: float
    seed: int
    steps: int
    guidance: float
    width: int
    height: int
    scheduler: str
    identity_early: float | None  # None: identity branch on every step


@dataclass(frozen=True)
class Rendered:
    image: Image.Image  # the final image
    parameters: dict  # the settings used, as the core reports them (written into the PNG chunk)
    identity: float | None  # its identity score (parameters["identity_metric"] says which), None if unavailable
    warnings: tuple[str, ...] = ()  # non-fatal notes from the core, e.g. that the prompt was cut off


class Engine(Protocol):
    profile: str  # name of the loaded (or to-be-loaded) profile
    schedulers: tuple[str, ...]  # sampler names the engine accepts

    def defaults(self) -> Defaults: ...

    def ready(self) -> bool: ...

    def description(self) -> str:
        """One line on what the profile's models are (shown on the header line)."""

    def load(self) -> None:
        """Load the models once; later calls return at once. Safe to call from several threads."""

    def failure(self) -> str | None:
        """Why the last attempt to load failed (None when it did not, or none was made); a later load retries."""

    def render(self, request: RenderRequest, on_step: StepCallback | None = None) -> list[Rendered]:
        """Render one image per γ of the request; ValueError for bad settings, RenderCancelled when stopped."""


@dataclass
class CoreEngine:
    """Engine over flexip_core: loads the pipeline lazily, once, and runs one render at a time on the device."""

    profile: str
    overrides: dict = field(default_factory=dict)  # keyword overrides passed to FlexIPPipeline.from_profile
    _pipe: object = field(default=None, init=False, repr=False)
    _failure: str | None = field(default=None, init=False, repr=False)
    _load_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _device_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def schedulers(self) -> tuple[str, ...]:
        return SCHEDULERS

    def ready(self) -> bool:
        return self._pipe is not None

    def description(self) -> str:
        from flexip_core.loading.profiles import load_profile  # a data file: no torch import

        return load_profile(self.profile).description

    def load(self) -> None:
        with self._load_lock:
            if self._pipe is not None:
                return
            from flexip_core import FlexIPPipeline

            logger.info("loading FlexIP profile %r %s", self.profile, self.overrides or "")
            try:
                self._pipe = FlexIPPipeline.from_profile(self.profile, **self.overrides)
            except Exception as error:
                self._failure = str(error)
                raise
            self._failure = None
            logger.info("profile %r loaded", self.profile)

    def failure(self) -> str | None:
        return self._failure

    def defaults(self) -> Defaults:
        from flexip_core.loading.profiles import load_profile  # a data file: no torch import, so the page comes up fast

        d = self._pipe.defaults if self._pipe is not None else load_profile(self.profile).defaults
        return Defaults(width=d.width, height=d.height, steps=d.num_inference_steps,
                        guidance=d.guidance_scale, scheduler=d.scheduler or SCHEDULERS[0],
                        max_side=d.max_side)

    def render(self, request: RenderRequest, on_step: StepCallback | None = None) -> list[Rendered]:
        from flexip_core import GenerationCancelled

        self.load()

        def callback(step: int, total: int, previews: list) -> None:
            if on_step is None:
                return
            try:
                on_step(step, total, previews)
            except RenderCancelled:
                raise GenerationCancelled(f"cancelled at step {step}/{total}") from None

        with self._device_lock:  # a cancelled run may still be finishing its step; wait for it
            pipe = self._pipe
            subject = pipe.encode_subject(list(request.references), list(request.weights))  # cached by content
            try:
                out = pipe(
                    request.prompt, subject=subject, gate=list(request.gates), strength=request.strength,
                    negative_prompt=request.negative_prompt or None, num_inference_steps=request.steps,
                    guidance_scale=request.guidance, height=request.height, width=request.width,
                    seed=request.seed, scheduler=request.scheduler, callback=callback,
                    gate_schedule=request.identity_early,
                )
            except GenerationCancelled as stop:
                raise RenderCancelled(str(stop)) from None
            scores = pipe.identity_score(out.images, subject, list(request.references))
        metric = pipe.profile.identity_metric
        warnings = tuple(out.warnings) + tuple(pipe.reference_notes(list(request.references)))
        return [Rendered(image, {**params, "identity_metric": metric}, None if score is None else float(score),
                         warnings)
                for image, params, score in zip(out.images, out.parameters, scores, strict=True)]


def make_request(references: Sequence[Image.Image], weights: Sequence[float], settings, gates: Sequence[float]
                 ) -> RenderRequest:
    """A RenderRequest from ui.settings.Settings plus the subject photos and the γ values to render."""
    early = settings.identity_early
    return RenderRequest(
        references=tuple(references), weights=tuple(float(w) for w in weights), prompt=settings.prompt,
        negative_prompt=settings.negative_prompt, gates=tuple(float(g) for g in gates),
        strength=settings.strength, seed=settings.seed, steps=settings.steps, guidance=settings.guidance,
        width=settings.width, height=settings.height, scheduler=settings.scheduler,
        identity_early=None if early >= 1.0 else early,
    )
