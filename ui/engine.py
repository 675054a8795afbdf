"""The studio's narrow view of the FlexIP core: the Engine protocol the handlers call, CoreEngine over
flexip_core.FlexIPPipeline, and stream_render, which runs a blocking render in a worker thread and streams its step
previews. Everything crossing this boundary is PIL images, numbers, strings and `Generation` values.

stream_render passes on at most one preview per `preview_every` seconds (the newest): the denoising loop makes one
per step, far more than a browser can fetch and draw. Stop sets the render's `halt` flag, and cancelling the task that
consumes it (Gradio's `cancels=`: a newer slider release) sets its own stop flag; the next step callback turns either
into RenderCancelled, so the device is free again within one step."""
from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from PIL import Image

from flexip_core.generation.schedulers import SCHEDULER_NAMES
from flexip_core.generation.settings import Generation
from flexip_core.generation.task_inputs import TaskInputs
from flexip_core.loading.profiles import Defaults

from .clips import ANIMATE

logger = logging.getLogger(__name__)

SCHEDULERS = SCHEDULER_NAMES  # the core's names; importing them does not import diffusers
StepCallback = Callable[[int, int, list], None]  # (step, total, preview images); may raise RenderCancelled


class RenderCancelled(Exception):
    """A render stopped early because the user (or a newer slider move) cancelled it."""


@dataclass(frozen=True)
class Rendered:
    image: Image.Image  # the final image
    generation: Generation  # what made it, as the core reports it (its γ, and the size and scheduler used)
    parameters: dict  # the core's parameters entry: generation.to_parameters() plus model names, written to the PNG
    identity: float | None  # its identity score (parameters["identity_metric"] says which), None if unavailable
    warnings: tuple[str, ...] = ()  # non-fatal notes from the core, e.g. that the prompt was cut off
    frames: tuple[Image.Image, ...] | None = None  # an animate render's clip, `image` being its first frame


class Engine(Protocol):
    profile: str  # name of the loaded (or to-be-loaded) profile
    schedulers: tuple[str, ...]  # sampler names the engine accepts
    world: str | None  # the profile's world plugin when its model knows only that world (mini: toyworld.plugin)

    def defaults(self) -> Defaults:
        """The profile's suggested settings (size, steps, guidance, scheduler) and its largest side."""

    def ready(self) -> bool: ...

    def description(self) -> str:
        """One line on what the profile's models are (shown on the header line)."""

    def load(self) -> None:
        """Load the models once; later calls return at once. Safe to call from several threads."""

    def failure(self) -> str | None:
        """Why the last attempt to load failed (None when it did not, or none was made); a later load retries."""

    def modes(self) -> dict[str, str | None]:
        """Each studio mode beyond text-to-image ("start_image", "inpaint", "control", "animate") and why this
        profile cannot run it (None when it can)."""

    def render(self, references: Sequence[Image.Image], weights: Sequence[float], generation: Generation,
               gates: Sequence[float], on_step: StepCallback | None = None, task: TaskInputs | None = None,
               images: int = 1, decode: str = "full") -> list[Rendered]:
        """Render `generation` once per γ of `gates` (one batch), or `images` times at its one γ with consecutive
        seeds, for the subject in `references` (validated RGB photos, one weight each), in the mode `task` describes
        (None: text-to-image); `decode` "fast" decodes with the profile's tiny autoencoder where it has one (the
        slider's renders while dragging; without one, the VAE). ValueError for bad settings or a mode the profile
        cannot run, RenderCancelled when stopped."""


@dataclass
class CoreEngine:
    """Engine over flexip_core: loads the pipeline lazily, once, and runs one render at a time on the device."""

    profile: str
    overrides: dict = field(default_factory=dict)  # keyword arguments of FlexIPPipeline.from_profile
    _pipe: object = field(default=None, init=False, repr=False)
    _failure: str | None = field(default=None, init=False, repr=False)
    _load_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _device_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _notes: dict = field(default_factory=dict, init=False, repr=False)  # subject key -> the model's notes on its photos
    _tasks: dict = field(default_factory=dict, init=False, repr=False)  # (task, control kind) -> its FlexIPPipeline
    _modes: dict = field(default_factory=dict, init=False, repr=False)  # mode -> why the profile cannot run it

    @property
    def schedulers(self) -> tuple[str, ...]:
        return SCHEDULERS

    @property
    def world(self) -> str | None:
        from flexip_core.loading.profiles import load_profile  # a data file: no torch import

        return load_profile(self.profile).world

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

    def modes(self) -> dict[str, str | None]:
        if not self._modes:
            from flexip_core.generation.task_inputs import MODES
            from flexip_core.loading.assembly import resolve_placeholders, task_unavailable
            from flexip_core.loading.profiles import Profile, load_profile

            parts = {k: v for k, v in self.overrides.items() if k in Profile.__dataclass_fields__}  # not device, ...
            profile = resolve_placeholders(load_profile(self.profile).with_overrides(**parts))
            tasks = {**MODES, ANIMATE: ANIMATE}  # the studio's modes: the picture tasks, and clips
            self._modes.update({mode: task_unavailable(profile, task) for mode, task in tasks.items()})
        return dict(self._modes)

    def _pipeline_for(self, task: TaskInputs | None):
        """The loaded FlexIPPipeline of the task (built once, sharing the models already loaded)."""
        if task is None:
            return self._pipe
        from flexip_core.loading.assembly import load_task

        key = (task.task, task.settings.get("control"))
        if key not in self._tasks:
            logger.info("building the %s pipeline%s", task.task, f" ({key[1]})" if key[1] else "")
            self._tasks[key] = load_task(self._pipe, task.task, key[1])
        return self._tasks[key]

    def defaults(self) -> Defaults:
        from flexip_core.loading.profiles import load_profile  # a data file: no torch import, so the page comes up fast

        return self._pipe.defaults if self._pipe is not None else load_profile(self.profile).defaults

    def render(self, references: Sequence[Image.Image], weights: Sequence[float], generation: Generation,
               gates: Sequence[float], on_step: StepCallback | None = None, task: TaskInputs | None = None,
               images: int = 1, decode: str = "full") -> list[Rendered]:
        from flexip_core import GenerationCancelled

        self.load()

        def callback(step: int, total: int, previews: list) -> None:
            if on_step is None:
                return
            try:
                on_step(step, total, previews)
            except RenderCancelled:
                raise GenerationCancelled(f"cancelled at step {step}/{total}") from None

        references = list(references)
        with self._device_lock:  # a cancelled run may still be finishing its step; wait for it
            pipe = self._pipeline_for(task)
            subject = pipe.encode_subject(references, [float(w) for w in weights])  # cached by content
            kwargs = dict(task.pipeline_kwargs) if task is not None else None
            if pipe.preview_decoder.autoencoder is None:  # no tiny autoencoder: the VAE, not the blurry projection
                decode = "full"
            try:
                out = pipe(subject=subject, gate=[float(g) for g in gates], generation=generation, callback=callback,
                           pipeline_kwargs=kwargs, num_images=images, decode=decode)
            except GenerationCancelled as stop:
                raise RenderCancelled(str(stop)) from None
            scores = pipe.identity_score(out.images, subject, references)
            if subject.key not in self._notes:  # the same photos give the same notes: read them once
                self._notes[subject.key] = tuple(pipe.reference_notes(references))
        warnings = tuple(out.warnings) + self._notes[subject.key]
        clips = out.frames or [None] * len(out.images)
        return [Rendered(image, made, params, None if score is None else float(score), warnings,
                         None if frames is None else tuple(frames))
                for image, made, params, score, frames in zip(out.images, out.generations, out.parameters, scores,
                                                               clips, strict=True)]


# --- streaming a render to an async handler -------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    step: int  # steps done so far
    total: int  # steps in this render
    previews: list  # cheap preview images, one per γ


@dataclass(frozen=True)
class Done:
    results: list[Rendered]


async def stream_render(engine: Engine, references: Sequence[Image.Image], weights: Sequence[float],
                        generation: Generation, gates: Sequence[float], preview_every: float = 0.0,
                        on_step: Callable[[Step], None] | None = None, halt: threading.Event | None = None,
                        task: TaskInputs | None = None, images: int = 1, decode: str = "full"
                        ) -> AsyncIterator[Step | Done]:
    """Yield the newest Step at most once per `preview_every` seconds (and none that a slower consumer has not
    taken in time), then one Done; `on_step` sees every step that arrives (a progress count). Setting `halt` (Stop)
    ends the render at its next step. Errors from the engine (ValueError, RenderCancelled when halted, ...) are
    re-raised in the consumer."""
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()  # the consumer has gone away

    def post(kind: str, payload) -> None:
        try:
            loop.call_soon_threadsafe(inbox.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
            stop.set()

    def report(step: int, total: int, previews: list) -> None:  # in the worker thread
        if stop.is_set() or (halt is not None and halt.is_set()):
            raise RenderCancelled(f"stopped at step {step}/{total}")
        post("step", Step(step, total, list(previews)))

    def work() -> None:
        try:
            post("done", Done(engine.render(references, weights, generation, gates, on_step=report, task=task,
                                            images=images, decode=decode)))
        except BaseException as error:  # handed to the consumer, which re-raises it
            post("error", error)

    worker = threading.Thread(target=work, name="flexip-render", daemon=True)
    worker.start()
    finished = False  # the engine's result (or error) has arrived
    due = 0.0  # when the next preview may be passed on (loop time)
    pending: Step | None = None  # the newest step not passed on yet
    try:
        while True:
            wait = None if pending is None else max(0.0, due - loop.time())
            try:
                kind, payload = await asyncio.wait_for(inbox.get(), wait)
            except TimeoutError:  # no newer step came before the preview was due: pass this one on
                kind, payload = "step", pending
            else:
                while kind == "step":  # count every step, keep only the newest preview
                    if on_step is not None:
                        on_step(payload)
                    if inbox.empty():
                        break
                    kind, payload = inbox.get_nowait()
            if kind == "step":
                if loop.time() < due:
                    pending = payload
                    continue
                pending, due = None, loop.time() + preview_every
            finished = kind in ("done", "error")
            if kind == "error":
                raise payload
            yield payload
            if kind == "done":
                return
    finally:
        if not finished:
            logger.info("render abandoned by its caller; stopping it at the next step")
        stop.set()
