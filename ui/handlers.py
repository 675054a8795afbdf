"""Every event handler of the studio: the subject panel (photos, weights, examples), Generate, the live γ slider
(peek while dragging, render on release), Stop, history, seeds, restoring settings, the γ sweep and the prompt × γ
grid, the header, and the `/generate` and `/sweep` API endpoints.

Each handler returns (or yields) a dict keyed by output name (ui.layout binds the names to components), so tests
call them with a fake engine and no server. Every render is one `Generation` (flexip_core.generation.settings) plus
the subject photos and the γ values to render.

How the page answers: a long action says in the status line (`info`) what it is doing (step n of N); Stop ends it
within a step and puts back the last finished image or sweep, saying where it stopped; a refused or failed action
leaves the screen as it was and says what and why in one toast and the line. The page never gets gr.Error, whose
badges cover the controls; the API endpoints do (a client needs an error). A warning that every render of a subject
repeats (the model's note on its photo, words it left out) is a toast once per subject and stays in the line."""
# No `from __future__ import annotations`: Gradio reads the gr.SelectData annotation as a class.
import asyncio
import base64
import contextlib
import html
import io
import itertools
import logging
import random
import re
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import gradio as gr
from PIL import Image

from flexip_core.generation.gate import GateSchedule
from flexip_core.generation.metadata import save_png
from flexip_core.generation.settings import MAX_SEED, Generation, parse_gates
from flexip_core.generation.task_inputs import MODES, TaskInputs, prepare

from .clips import (
    ANIMATE,
    DEFAULT_FPS,
    DEFAULT_FRAMES,
    MAX_FPS,
    MAX_FRAMES,
    MIN_FPS,
    MIN_FRAMES,
    clip_task,
    clips_row,
    write_clip,
)
from .engine import Done, RenderCancelled, Step, stream_render
from .files import EXAMPLES, ensure_examples, example_path, zip_results
from .gallery import MAX_LIMIT, GalleryWriteError
from .scrub import TICKS
from .state import (
    MAX_HISTORY,
    Photo,
    Result,
    Run,
    Session,
    Studio,
    accept_photos,
    fingerprint,
    open_photo,
    pixel_digest,
    read_png_generation,
)

logger = logging.getLogger(__name__)

# The generation panel's controls, named as Generation.to_parameters() names them, in layout order.
CONTROLS = ("prompt", "negative_prompt", "gate", "strength", "seed", "num_inference_steps", "guidance_scale", "width",
            "height", "scheduler", "pres_from", "pres_until", "pers_from", "pers_until")
WINDOW_PRESETS = {"whole run": (0.0, 1.0), "identity early": (0.0, 0.5), "identity late": (0.5, 1.0)}  # pres window
# The mode panel's inputs (Mode, its picture, the inpainting scene and mask, and each mode's settings); the mode
# "text" is text-to-image, the others are task_inputs.MODES.
MODE_INPUTS = ("mode", "mode_image", "scene", "mask", "denoise", "control", "control_scale", "frames", "fps")
MODE_SETTINGS = ("mode", "denoise", "control", "control_scale", "frames", "fps")  # what a PNG or history restores
TEXT_MODE = dict(mode="text", mode_image=None, scene=None, mask=None, denoise=0.6, control="canny",
                 control_scale=1.0, frames=DEFAULT_FRAMES, fps=DEFAULT_FPS)  # the panel as the page starts
MODE_FIELDS = ("task", "task_inputs", "height", "width", "num_frames", "fps")  # the Generation fields with_task sets
MODE_OF_TASK = {task: mode for mode, task in MODES.items()} | {"text-to-image": "text", ANIMATE: ANIMATE}
# The API's argument names for these where they differ (a public contract kept from before the fields were renamed).
API_NAMES = {"num_inference_steps": "steps", "guidance_scale": "guidance", "pres_until": "identity_early"}
MAX_SWEEP = 9  # γ values in one sweep or grid row
MAX_BATCH_IMAGES = 8  # images per Generate click (consecutive seeds, one batched call)
MAX_GRID_PROMPTS = 4  # rows of the prompt × γ grid
PREVIEW_SIDE = 256  # previews are upscaled to about this size so the browser shows blocks, not a blur
PREVIEW_EVERY_S = 0.25  # at most four previews a second: each is an encode, a message and a fetch for the browser
STOP_WAIT_S = 10.0  # how long Stop or a History click waits for the render it halted to end
GRID_TILE = 128  # grid tiles are sent inline, at most this many pixels a side (the zip has the full images)
_TICK_NAMES = itertools.count()  # file numbers of the renders not kept yet
METRICS = {"clip": "CLIP cosine with the subject",  # what each identity metric (parameters["identity_metric"]) reads
           "toyworld": "share of the toy's shape, colour and pattern kept, read by the toy-world oracle"}


class NotLoaded(RuntimeError):
    """The profile's models could not be loaded; the message says why (a missing file, a bad path)."""


# --- the form ------------------------------------------------------------------------------------------
def random_seed() -> int:
    return random.SystemRandom().randint(0, MAX_SEED)


def read_form(form: dict) -> Generation:
    """The Generation the controls describe (keys: CONTROLS; seed empty or negative: a random one); ValueError
    naming the first value that is not a number. Ranges are checked by Generation.check when rendering."""
    def number(key, kind):
        value = form.get(key)
        try:
            return float(value) if kind is float else int(round(float(value)))
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{key.replace('_', ' ')} is {value!r}; enter a number") from None

    seed = form.get("seed")
    draw = seed is None or seed == "" or (isinstance(seed, (int, float)) and seed < 0)  # -1 or empty: a random one
    def window(key: str) -> float:  # a window the form leaves out keeps its default (all steps)
        return getattr(GateSchedule(), key) if form.get(key) is None else number(key, float)

    try:
        windows = GateSchedule(**{key: window(key) for key in ("pres_from", "pres_until", "pers_from", "pers_until")})
    except ValueError as error:
        raise ValueError(f"branch windows: {error}") from None
    return Generation(
        prompt=str(form.get("prompt") or "").strip(), negative_prompt=str(form.get("negative_prompt") or "").strip(),
        gate=number("gate", float), strength=number("strength", float),
        seed=random_seed() if draw else number("seed", int),
        num_inference_steps=number("num_inference_steps", int), guidance_scale=number("guidance_scale", float),
        width=number("width", int), height=number("height", int), scheduler=str(form.get("scheduler") or "") or None,
        windows=windows,
    )


def weighted_photos(photos: list[Photo], form: dict) -> list[Photo]:
    """The photos with the slot weights (`weight0`, `weight1`, ... popped from `form`) applied; ValueError for a
    weight that is not a number from 0 to 10, or when none is above 0."""
    slots = {key: form.pop(key) for key in [k for k in form if k.startswith("weight") and k[6:].isdigit()]}
    result = []
    for i, photo in enumerate(photos):
        value = slots.get(f"weight{i}")
        try:
            weight = photo.weight if value is None else float(value)
        except (TypeError, ValueError):
            raise ValueError(f"weight of {photo.name} is {value!r}; use a number from 0 to 10") from None
        if not 0.0 <= weight <= 10.0:
            raise ValueError(f"weight of {photo.name} is {weight:g}; use a value from 0 to 10")
        result.append(replace(photo, weight=weight))
    if result and not any(photo.weight > 0 for photo in result):
        raise ValueError("every photo has weight 0; give at least one photo a weight above 0")
    return result


def parse_prompts(text: str, limit: int = MAX_GRID_PROMPTS) -> list[str]:
    """One prompt per non-empty line; raises ValueError when there are none or too many."""
    prompts = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not prompts:
        raise ValueError("no prompts given; write one prompt per line")
    if len(prompts) > limit:
        raise ValueError(f"{len(prompts)} prompts given; the grid takes at most {limit}")
    return prompts


def read_request(studio: Studio, session: Session, form: dict
                 ) -> tuple[list[Photo], Generation, TaskInputs | None]:
    """The weighted subject photos, the Generation of the controls and the mode's inputs (None: text-to-image);
    ValueError says which value is wrong. The session keeps its photos until the request is known to be readable."""
    form = dict(form)
    photos = weighted_photos(session.photos, form)
    modes = {key: form.pop(key, None) for key in MODE_INPUTS}
    generation = read_form(form)
    task = read_task(studio, modes, generation)
    for note in task.notes if task is not None else ():  # e.g. a resized scene: said once per session
        if ("mode", note) not in session.told:
            session.told.add(("mode", note))
            toast(note)
    generation = with_task(generation, task)
    if task is not None:  # what the slider's events, which send no pictures, render and look up in this mode
        session.mode_tasks[task.mode] = (task, {name: getattr(generation, name) for name in MODE_FIELDS})
    return photos, generation, task


def whole_number(value, name: str, low: int, high: int) -> int:
    """A whole number in [low, high] from a control or an API argument (2.0 is 2); ValueError names it otherwise."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not number.is_integer() or not low <= number <= high:
        raise ValueError(f"{name} must be a whole number from {low} to {high}, got {value!r}")
    return int(number)


def read_batch(value) -> int:
    """Images per click: a whole number from 1 to MAX_BATCH_IMAGES (ValueError says so)."""
    return whole_number(value, "images per click", 1, MAX_BATCH_IMAGES)


def read_task(studio: Studio, values: dict, generation: Generation) -> TaskInputs | None:
    """The mode's inputs, checked and fitted to the generation's size (its longer side); None for text-to-image.
    ValueError names the input that is wrong, or says why this profile cannot run the mode."""
    mode = values.get("mode") or "text"
    if mode == "text":
        return None
    if mode not in MODES and mode != ANIMATE:
        raise ValueError(f"unknown mode {mode!r}; one of text, {', '.join(MODES)}, {ANIMATE}")
    reason = studio.engine.modes().get(mode)
    if reason:
        raise ValueError(reason)
    if mode == ANIMATE:
        return clip_task(whole_number(values.get("frames"), "frames", MIN_FRAMES, MAX_FRAMES),
                         whole_number(values.get("fps"), "fps", MIN_FPS, MAX_FPS), generation.height, generation.width)
    inpaint, value = mode == "inpaint", values.get
    return prepare(mode, image=value("scene") if inpaint else value("mode_image"),
                   mask=value("mask") if value("mask") is not None or not isinstance(value("scene"), dict)
                   else value("scene"),  # no uploaded mask: the strokes drawn on the scene
                   denoise=value("denoise"), control=value("control"), control_scale=value("control_scale"),
                   side=max(generation.width or 0, generation.height or 0) or studio.engine.defaults().height,
                   max_side=studio.engine.defaults().max_side)


def with_task(generation: Generation, task: TaskInputs | None) -> Generation:
    """The Generation of a mode: its task, size and scalar inputs, plus digests of its pictures, so that renders
    of other pictures are never taken for this one (and the PNG says which picture made it)."""
    if task is None:
        return generation
    inputs = {key: value for key, value in task.pipeline_kwargs.items()
              if isinstance(value, (int, float)) and not isinstance(value, bool)}
    inputs.update({key: value for key, value in task.settings.items() if key == "control"})
    for key in ("image", "mask_image"):
        if key in task.pipeline_kwargs:
            inputs[key] = pixel_digest(task.pipeline_kwargs[key], 12)
    clip = {"num_frames": task.settings["frames"], "fps": task.settings["fps"]} if task.task == ANIMATE else {}
    return replace(generation, task=task.task, height=task.height, width=task.width, **clip,
                   task_inputs=tuple(sorted((key, float(v) if not isinstance(v, str) else v)
                                            for key, v in inputs.items())))


# --- the engine: loading, the header, one render -------------------------------------------------------
async def ensure_loaded(studio: Studio, progress: gr.Progress | None = None) -> None:
    """Load the models on first use (once, in a worker thread), showing progress meanwhile; NotLoaded says why
    they could not be."""
    if studio.engine.ready():
        return
    if progress is not None:
        progress(None, desc=f"Loading the {studio.engine.profile} models (first run only)…")
    try:
        await asyncio.to_thread(studio.engine.load)
    except Exception as error:
        logger.exception("loading profile %s failed", studio.engine.profile)
        raise NotLoaded(f"The {studio.engine.profile} models could not be loaded: {error}") from error


def status(studio: Studio) -> dict:
    """The header: profile and model state, then what the profile's models are (the offline `mini` draws toys).
    The timer keeps polling only while the models are loading."""
    engine = studio.engine
    if engine.ready():
        state = "ready"
    elif engine.failure():
        state = f"could not be loaded: {engine.failure()}"
    else:
        state = "loading… (the first run waits for it)"
    line = f"**FlexIP Studio** · profile `{engine.profile}` · models {state}"
    about = engine.description()
    waiting = not engine.ready() and engine.failure() is None
    return {"status": f"{line} · *{about}*" if about else line, "timer": gr.Timer(active=waiting)}


@dataclass(frozen=True)
class Preview:
    step: int  # steps done
    total: int  # steps in the run
    images: list  # one preview per γ of the batch being rendered, upscaled for display
    gates: list  # the γ of each preview


def _upscale(image: Image.Image) -> Image.Image:
    factor = max(1, PREVIEW_SIDE // max(image.size))
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST) if factor > 1 else image


def check_request(studio: Studio, photos: Sequence[Photo], generation: Generation) -> None:
    """ValueError for a request that cannot render, before the models are waited for."""
    if not photos:
        raise ValueError("add at least one photo of the subject first (drop, paste or upload it in the Subject panel)")
    if not generation.prompt:
        raise ValueError("the prompt is empty; describe what to make of the subject")
    generation.check(studio.engine.defaults().max_side)


async def render(studio: Studio, photos: Sequence[Photo], generation: Generation, gates: Sequence[float],
                 run: Run | None = None, progress: gr.Progress | None = None, one_at_a_time: bool = False,
                 task: TaskInputs | None = None, images: int = 1, keep: bool = True, decode: str = "full"
                 ) -> AsyncIterator[Preview | list[Result]]:
    """Yield a Preview at most every PREVIEW_EVERY_S, then the list of saved Results (one per γ); `run` follows
    the step count. `one_at_a_time` renders the γ values as separate batches of one (less device memory, more
    time). A render kept (`keep`, every request of a user) drops the slider's background ticks and goes into the
    gallery; one not kept (the ticks, renders made while dragging) is written beside the app's other files.
    ValueError for a refused request (before anything renders) or a setting the engine refuses; NotLoaded."""
    check_request(studio, photos, generation)
    if keep:
        studio.scrubber.drop()
    await ensure_loaded(studio, progress)
    references = [open_photo(studio, photo) for photo in photos]
    weights = [photo.weight for photo in photos]
    subject = fingerprint(list(photos))
    if keep:
        studio.gallery.remember_subject(subject, [p.path for p in photos], weights, [p.name for p in photos])
    batches = [[gate] for gate in gates] if one_at_a_time else [list(gates)]
    results: list[Result] = []
    halt = run.halted if run is not None else None
    for number, batch in enumerate(batches, start=1):
        if halt is not None and halt.is_set():
            raise Stopped
        stage = f"γ {number} of {len(batches)} · " if len(batches) > 1 else ""

        def track(step: Step, stage=stage) -> None:
            if run is not None:
                run.progress = f"{run.stage}{stage}step {step.step} of {step.total}"

        track(Step(0, generation.num_inference_steps, []))
        try:
            async for event in stream_render(studio.engine, references, weights, generation, batch,
                                             preview_every=PREVIEW_EVERY_S, on_step=track, halt=halt, task=task,
                                             images=images, decode=decode):
                if isinstance(event, Step):
                    yield Preview(event.step, event.total, [_upscale(image) for image in event.previews], batch)
                elif isinstance(event, Done):
                    results.extend(_save(studio, subject, event) if keep else _save_aside(studio, subject, event))
        except RenderCancelled:
            if halt is not None and halt.is_set():  # Stop: the handler says so
                raise Stopped from None
            logger.info("render cancelled")  # the consumer has gone away: nothing to show it to
            return
    yield results


class Stopped(Exception):
    """The render was halted by Stop: its handler shows the stopped state as its last answer."""


def _save(studio: Studio, subject: str, done: Done) -> list[Result]:
    """Each render into the gallery (the PNG written atomically, then indexed; a clip first, beside it);
    GalleryWriteError when it cannot."""
    entries = []
    for r in done.results:
        clip = None if r.frames is None else write_clip(r.frames, studio.results_folder / "clips", r.parameters,
                                                       r.generation.fps or DEFAULT_FPS)
        try:
            entries.append(studio.gallery.add(r.image, r.parameters, subject=subject, identity=r.identity,
                                              warnings=r.warnings, clip=clip))
        finally:
            if clip is not None:
                clip.unlink(missing_ok=True)  # the gallery keeps its own copy
    return [replace(Result.from_entry(entry), generation=r.generation) for entry, r in zip(entries, done.results)]


def _save_aside(studio: Studio, subject: str, done: Done) -> list[Result]:
    """Renders not kept yet (slider ticks, renders made while dragging): PNGs beside the app's other files."""
    folder = studio.results_folder / "ticks"
    folder.mkdir(parents=True, exist_ok=True)
    results = []
    for r in done.results:
        path = folder / f"tick-{next(_TICK_NAMES):06d}-gate{r.generation.gate:.2f}-seed{r.generation.seed}.png"
        save_png(r.image, path, r.parameters)
        results.append(Result(str(path), r.generation, r.identity, subject, r.parameters, r.warnings, kept=False))
    return results


def keep_result(studio: Studio, session: Session, result: Result) -> Result:
    """A render not kept yet goes into the gallery and the history (it was released on); a kept one is as it is."""
    if result.kept:
        return result
    with Image.open(result.path) as image:
        entry = studio.gallery.add(image, result.parameters, subject=result.subject, identity=result.identity,
                                   warnings=result.warnings)
    kept = replace(Result.from_entry(entry), generation=result.generation)
    session.remember(kept)
    return kept


# --- how the page answers: runs, messages, the stopped state -------------------------------------------
@contextlib.asynccontextmanager
async def running(session: Session, kind: str, label: str):
    """The session's render in flight for the duration of a handler, however it ends (done, stopped, failed,
    cancelled). Stop halts it: the render ends at its next step (raising Stopped), and the handler's last answer,
    given inside this block, is the stopped state. Gradio's own cancel is left to the slider, whose newer render
    replaces the screen; a render it cancels is kept as `session.cancelled`, for a Stop right after."""
    run = Run(kind, label)
    session.run, session.cancelled = run, None
    try:
        yield run
    except (asyncio.CancelledError, GeneratorExit):
        session.cancelled = run
        raise
    finally:
        if session.run is run:
            session.run = None
        run.finished.set()


async def halt(session: Session) -> Run | None:
    """Halt the session's render in flight and wait (at most STOP_WAIT_S) for its handler to end, so that what the
    caller shows comes after the render's last answer; None when nothing was rendering."""
    run = session.run
    if run is None:
        return None
    run.halted.set()
    try:
        await asyncio.wait_for(run.finished.wait(), STOP_WAIT_S)
    except TimeoutError:
        logger.warning("the %s render did not end within %.0f s of being stopped", run.kind, STOP_WAIT_S)
    return run


def starting(studio: Studio) -> str:
    engine = studio.engine
    return "starting…" if engine.ready() else f"loading the {engine.profile} models (first run only)…"


def still_showing(session: Session) -> str:
    """What the large image is, for a line that is about something else."""
    if session.current is None:
        return ""
    g = session.current.generation
    return f" · showing **seed {g.seed}** · γ {g.gate:.2f}"


def refused(session: Session, error: Exception, label: str = "") -> dict:
    """A toast and the line for an action that did not happen; every other output stays as it was."""
    if isinstance(error, (ValueError, NotLoaded, GalleryWriteError)):
        why = str(error)
        logger.info("not rendered: %s", why)
    else:  # unexpected: with its traceback in the log, and said on the page
        why = f"{type(error).__name__}: {error}"
        logger.error("render failed", exc_info=error)
    toast(why)
    return {"info": f"{label + ' · ' if label else ''}✕ not rendered: {why}{still_showing(session)}"}


def refused_call(error: Exception) -> gr.Error:
    """An API call refused for the caller's input: its message for the client, a line (not a traceback) in the log."""
    logger.info("API call refused: %s", error)
    return gr.Error(str(error), print_exception=False)


def toast(message: str) -> None:
    """A warning toast (Gradio renders its message as HTML: file names and prompts are escaped)."""
    gr.Warning(html.escape(message, quote=False))


def warn_once(session: Session, results: Sequence[Result]) -> None:
    """A toast for each warning of these results not yet shown for their subject (the line keeps showing them)."""
    for result in results:
        for warning in result.warnings:
            if (result.subject, warning) not in session.told:
                session.told.add((result.subject, warning))
                toast(warning)


# --- showing results -----------------------------------------------------------------------------------
def describe(result: Result) -> str:
    g = result.generation
    score = "n/a" if result.identity is None else f"{result.identity:.3f}"
    metric = result.parameters.get("identity_metric", "clip")
    notes = "".join(f" · ⚠ {warning}" for warning in result.warnings)
    clip = f"{g.num_frames} frames at {g.fps} fps · " if g.num_frames else ""
    return (f"**seed {g.seed}** · γ {g.gate:.2f} · strength {g.strength:g} · {g.num_inference_steps} steps · {clip}"
            f"identity score **{score}** ({METRICS.get(metric, metric)}{' of its first frame' * bool(clip)}){notes}")


def reference_view(session: Session) -> str | None:
    return session.photos[0].view if session.photos else None


def large(session: Session, result: Result | None) -> dict:
    """The large image, or for a clip its player in the image's place, and the comparison with the reference (for a
    clip, with its first frame)."""
    if result is None:
        return {**on_screen(None), "compare": None}
    reference = reference_view(session)
    return {"result": gr.update(value=result.path, visible=result.clip is None),
            "clip": gr.update(value=result.clip, visible=result.clip is not None),
            "compare": (reference, result.path) if reference else None}


def on_screen(image) -> dict:
    """An image (a step's preview, a clip's included) in the large view, any clip's player hidden."""
    return {"result": gr.update(value=image, visible=True), "clip": gr.update(value=None, visible=False)}


def show(session: Session, result: Result) -> dict:
    """Outputs that put `result` on screen: large, against the reference, in the history, as a download."""
    return {
        **large(session, result), "info": describe(result),
        "download": gr.update(value=result.clip or result.path, interactive=True,
                              label=f"Download {'clip' if result.clip else 'PNG'} (with settings)"),
        "history": [(r.path, r.caption) for r in session.history], "session": session,
    }


def sweep_view(session: Session) -> dict:
    """The γ sweep tab as the last finished sweep left it (its clips side by side, for the Animate mode)."""
    return {"sweep_gallery": list(session.sweep_tiles), "sweep_clips": clips_row(session.sweep_clips),
            "sweep_zip": gr.update(value=session.sweep_zip, interactive=session.sweep_zip is not None)}


def grid_view(session: Session) -> dict:
    """The prompt × γ grid tab as its last finished rows left it."""
    return {"grid_view": grid_table(session.grid_rows),
            "grid_zip": gr.update(value=session.grid_zip, interactive=session.grid_zip is not None)}


def _tile(path: str) -> str:
    """An inline image for the grid table: the PNG itself when small, else a WebP at most GRID_TILE a side."""
    with Image.open(path) as image:
        if max(image.size) <= GRID_TILE:
            return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()
        image = image.convert("RGB")
        image.thumbnail((GRID_TILE, GRID_TILE))
        buffer = io.BytesIO()
        image.save(buffer, format="WEBP", quality=85)
    return "data:image/webp;base64," + base64.b64encode(buffer.getvalue()).decode()


def grid_table(rows: Sequence[tuple[str, Sequence[Result]]]) -> str:
    """The prompt × γ grid as a table: one row per prompt (named on its left), one column per γ (named on top),
    each tile with its identity score."""
    if not rows:
        return '<p class="grid-empty">Write up to four prompts above and run the grid: one row per prompt.</p>'
    gates = [result.generation.gate for result in rows[0][1]]
    head = "".join(f"<th>γ {gate:.2f}</th>" for gate in gates)
    body = []
    for number, (prompt, results) in enumerate(rows, start=1):
        cells = []
        for result in results:
            score = "" if result.identity is None else f"id {result.identity:.2f}"
            cells.append(f'<td><img src="{_tile(result.path)}" alt="{html.escape(result.caption)}">'
                         f"<span>{score}</span></td>")
        body.append(f'<tr><th scope="row"><b>{number}</b> {html.escape(prompt)}</th>{"".join(cells)}</tr>')
    return (f'<table class="grid-table" style="--rows: {len(rows)}"><thead><tr><th>prompt</th>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def restore_outputs(generation: Generation) -> dict:
    """Outputs that put `generation` back into the controls, its mode and the mode's settings included; a value
    the core left open (the pipeline's own scheduler, the input image's size) leaves its control as it is. The
    mode's pictures are not in the settings: the user adds them again."""
    values = generation.to_parameters()
    inputs = dict(generation.task_inputs)
    mode = {"mode": MODE_OF_TASK.get(generation.task, "text"), "denoise": inputs.get("strength"),
            "control": inputs.get("control"), "control_scale": inputs.get("controlnet_conditioning_scale"),
            "frames": generation.num_frames, "fps": generation.fps}
    return {**{name: gr.update() if values[name] is None else values[name] for name in CONTROLS},
            **{name: gr.update() if value is None else value for name, value in mode.items()}}


def rows(count: int) -> str:
    return f"{count} row" + "s" * (count != 1)


def stopped(studio: Studio, session: Session, run: Run | None) -> dict:
    """The screen after Stop: the last finished image (or sweep, or the grid's finished rows) back, and the line
    saying where the render stopped."""
    if run is None:
        return {"info": f"**stopped** · no render was under way{still_showing(session)}"}
    where = f"{run.label} · **stopped** at {run.progress}"
    if run.kind == "sweep":
        kept = "the previous sweep" if session.sweep_tiles else "no sweep yet"
        return {**sweep_view(session), "info": f"{where} · the γ sweep tab shows {kept}{still_showing(session)}"}
    if run.kind == "grid":
        if session.grid_rows and session.grid_zip is None:
            session.grid_zip = zip_results([r.path for _, row in session.grid_rows for r in row],
                                           studio.results_folder, "flexip-grid")
        return {**grid_view(session), "session": session,
                "info": f"{where} · the grid shows its {rows(len(session.grid_rows))} finished{still_showing(session)}"}
    if session.current is None:
        return {**large(session, None), "info": f"{where} · no image finished yet"}
    return {**show(session, session.current), "info": f"{where} · showing the last finished image: "
                                                      f"{describe(session.current)}"}


async def stop(studio: Studio, *, session: Session) -> dict:
    """Stop: the render in flight ends at its next step, and its handler's last answer shows the last finished image
    or sweep again, the line saying where it stopped; this answers only when nothing was rendering (or the slider had
    just cancelled a render). A render queued behind it still runs, as in other SD tools' Interrupt."""
    studio.scrubber.drop()
    if await halt(session) is not None:
        return {}
    run, session.cancelled = session.cancelled, None
    return stopped(studio, session, run)


# --- subject panel -------------------------------------------------------------------------------------
def slot_names(count: int) -> list[str]:
    """Output names of the photo slots: a group, its thumbnail and its weight slider per slot, then the hint."""
    return [name for i in range(count) for name in (f"slot{i}", f"thumb{i}", f"weight{i}")] + ["slots_hint"]


def slot_updates(session: Session, count: int) -> dict:
    """Show one slot per photo (the encoder's square view, the file name, the weight); hide the rest, and the
    hint on what a slot shows when there is none."""
    values = {"slots_hint": gr.update(visible=bool(session.photos))}
    for i in range(count):
        photo = session.photos[i] if i < len(session.photos) else None
        values[f"slot{i}"] = gr.update(visible=photo is not None)
        values[f"thumb{i}"] = gr.update(value=photo.view if photo else None, label=photo.name if photo else "")
        values[f"weight{i}"] = gr.update(value=photo.weight if photo else 1.0)
    return values


def add_photos(studio: Studio, *, session: Session, files: list[str] | None) -> dict:
    """Validate dropped/pasted/uploaded files; keep the good ones, warn about each bad one by name."""
    studio.scrubber.drop()
    accepted, rejected = accept_photos(files or [], studio.photos_folder)
    for rejection in rejected:
        toast(rejection.reason)
    known = {photo.digest for photo in session.photos}
    for photo in accepted:
        if photo.digest in known:
            toast(f"{photo.name}: this photo is already in the subject")
            continue
        if len(session.photos) >= studio.max_photos:
            toast(f"{photo.name}: the subject holds at most {studio.max_photos} photos; remove one first")
            continue
        if photo.flat:
            toast(photo.flat_warning)
        session.photos.append(photo)
        known.add(photo.digest)
    logger.info("subject now has %d photo(s); %d rejected", len(session.photos), len(rejected))
    session.uploads += 1
    return {"session": session, "files": None, "uploads_done": str(session.uploads),
            **slot_updates(session, studio.max_photos)}


def remove_photo(studio: Studio, *, session: Session, index: int) -> dict:
    """Drop the photo in slot `index` (its results stay in the history)."""
    studio.scrubber.drop()
    if 0 <= index < len(session.photos):
        removed = session.photos.pop(index)
        logger.info("removed %s from the subject", removed.name)
    return {"session": session, **slot_updates(session, studio.max_photos)}


async def example(studio: Studio, *, session: Session, name: str, gates_text: str, sequential_sweep: bool = False,
                  **form):
    """An example: its drawn subject replaces the photos, its prompt goes in place, and a γ sweep of it renders
    in the γ sweep tab, which is brought to the front."""
    chosen = {example.name: example for example in EXAMPLES}[name]  # the layout binds the names
    ensure_examples()
    accepted, rejected = accept_photos([str(example_path(chosen))], studio.photos_folder)
    if rejected:  # the shipped file is damaged: say so, change nothing
        yield refused(session, ValueError(rejected[0].reason))
        return
    session.photos = accepted
    yield {"session": session, "prompt": chosen.prompt, "tabs": gr.update(selected="sweep"), "mode": "text",
           **slot_updates(session, studio.max_photos)}
    weights = {key: 1.0 for key in form if key.startswith("weight")}  # the new photo's weight, not the old slot's
    async for values in sweep(studio, session=session, gates_text=gates_text, sequential_sweep=sequential_sweep,
                              **{**form, **weights, "prompt": chosen.prompt, "mode": "text"}):
        yield values


# --- generation: Generate, the γ slider, history, seed, PNG restore -------------------------------------
async def _render_one(studio: Studio, session: Session, generation: Generation, task: TaskInputs | None,
                      images: int = 1):
    """Render one image (or a batch of `images` with consecutive seeds, the first shown large, all in the history)."""
    seeds = f"seeds {generation.seed}–{generation.seed + images - 1}" if images > 1 else f"seed {generation.seed}"
    label = f"**{seeds}** · γ {generation.gate:.2f}"
    async with running(session, "image", label) as run:
        run.gate = generation.gate
        yield {"seed": generation.seed, "info": f"{label} · {starting(studio)}"}
        try:
            began = time.perf_counter()
            async for event in render(studio, session.photos, generation, [generation.gate], run, task=task,
                                      images=images):
                if isinstance(event, Preview):
                    yield {**on_screen(event.images[0]), "info": f"{label} · {run.progress}"}
                elif event:
                    for result in reversed(event):  # the history lists the first seed first
                        session.remember(result)
                    session.current = event[0]
                    warn_once(session, event)
                    more = f" · a batch of {len(event)} ({seeds}), all in the history" if len(event) > 1 else ""
                    yield {**show(session, event[0]), "info": describe(event[0]) + more}
                    if images == 1:
                        studio.scrubber.render_s = time.perf_counter() - began
                        logger.info("rendered γ %.2f in %.2f s", generation.gate, studio.scrubber.render_s)
                        start_ticks(studio, session, generation, task)
        except Stopped:
            if not run.superseded:  # Stop; a slider move shows what it shows
                yield stopped(studio, session, run)
        except Exception as error:  # said on the page (and logged); the last finished image goes back
            yield {**large(session, session.current), **refused(session, error, label)}


async def generate(studio: Studio, *, session: Session, lock_seed: bool, batch=1, **form):
    """Generate one image with the current settings, or a batch of `batch` (1 to MAX_BATCH_IMAGES) with consecutive
    seeds in one call; a new random seed unless the seed is locked."""
    try:
        images = read_batch(batch)
        session.photos, generation, task = read_request(studio, session, form)
        check_request(studio, session.photos, generation)
    except ValueError as error:
        yield refused(session, error)
        return
    if not lock_seed:
        generation = replace(generation, seed=random_seed())
    async for values in _render_one(studio, session, generation, task, images):
        yield values


def start_ticks(studio: Studio, session: Session, generation: Generation, task: TaskInputs | None) -> None:
    """Render the slider's ticks (ui.scrub.TICKS) of `generation` that are not rendered yet, in the background."""
    if generation.task == ANIMATE:  # eleven clips are not a background job
        return
    photos = list(session.photos)
    subject = fingerprint(photos)
    missing = [gate for gate in TICKS if session.exact(generation.at(gate), subject) is None]
    if missing:
        studio.scrubber.start((subject, generation.without_gate()),
                              lambda halted: _render_ticks(studio, session, photos, generation, task, missing, halted))


async def _render_ticks(studio: Studio, session: Session, photos: list[Photo], generation: Generation,
                        task: TaskInputs | None, gates: list[float], halted: threading.Event) -> None:
    """The background job: the ticks in one batched call (one at a time if the device runs out of memory), each
    remembered for the slider as it is saved; dropped (`halted`) at its next step."""
    run = Run("ticks", "slider ticks", halted=halted)
    began = time.perf_counter()
    for one_at_a_time in (False, True):
        try:
            async for event in render(studio, photos, generation, gates, run, one_at_a_time=one_at_a_time, task=task,
                                      keep=False):
                if isinstance(event, list):
                    for result in event:
                        session.remember(result, history=False)
                    logger.info("slider ticks rendered: γ %s in %.2f s", ", ".join(f"{gate:g}" for gate in gates),
                                time.perf_counter() - began)
            return
        except Stopped:
            return
        except Exception as error:  # nobody waits for the ticks: said in the log only
            if one_at_a_time or "out of memory" not in str(error).lower():
                logger.warning("background slider ticks failed: %s", error)
                return
            logger.info("background slider ticks: out of memory in one batch; rendering them one at a time")


async def release(studio: Studio, *, session: Session, **form):
    """The γ slider was released (mouse, a click on its track, a pause after arrow keys, Enter in its box): render
    at the new γ with the same seed and settings (a render already made for exactly these, a slider tick's
    included, is shown and kept at once)."""
    try:
        session.photos, generation, task = read_request(studio, session, form)
        check_request(studio, session.photos, generation)
    except ValueError as error:
        yield refused(session, error)
        return
    cached = session.exact(generation)
    if cached is not None:
        try:
            session.current = keep_result(studio, session, cached)
        except (OSError, GalleryWriteError) as error:
            yield refused(session, error)
            return
        yield show(session, session.current)
        start_ticks(studio, session, generation, task)
        return
    async for values in _render_one(studio, session, generation, task):
        yield values


def supersede(session: Session, gate: float) -> None:
    """The slider moved to `gate`: the session's render in flight (a sweep, a grid, an image at another γ) ends at
    its next step, quietly. Not Gradio's cancel: the page's events run beside each other, and a cancel posted by one
    move could land on the release that came after it (its render then never showed)."""
    run = session.run
    if run is not None and run.gate != gate and not run.halted.is_set():
        run.superseded = True
        run.halted.set()


def _dragged(session: Session, form: dict) -> tuple[list[Photo], Generation, TaskInputs | None]:
    """The photos (with the form's weights), Generation and mode inputs the slider's position names, in the mode's
    last pictures (the slider's events do not send pictures); ValueError for a form that names none yet."""
    mode = form.pop("mode", None) or "text"
    photos = weighted_photos(session.photos, dict(form))
    task, fields = session.mode_tasks.get(mode, (None, {}))
    return photos, replace(read_form(form), **fields), task


def peek(studio: Studio, *, session: Session, **form) -> dict:
    """While the slider moves: show the nearest γ already rendered for this subject, prompt, seed and settings
    (the slider's ticks included; else the last finished image), computing nothing; the line says which γ is shown
    and which will render."""
    session.cancelled = None  # a render this move stopped is replaced by what it shows
    try:
        photos, generation, _ = _dragged(session, form)
    except ValueError:
        return {}
    supersede(session, generation.gate)
    target = f"let go of the slider to render γ {generation.gate:.2f}"
    subject = fingerprint(photos)
    scrubber = studio.scrubber
    if scrubber.busy and scrubber.key == (subject, generation.without_gate()):
        target += " · the slider's ticks are rendering"
    nearest = session.nearest(generation, subject)
    if nearest is not None and nearest is session.current and nearest.generation.gate == generation.gate:
        return {**large(session, nearest), "info": describe(nearest)}  # released there already (a late move)
    if nearest is None:
        shown = f"{still_showing(session)} (other settings)" if session.current else ""
        return {**large(session, session.current), "info": f"{target}{shown}"}
    return {**large(session, nearest),
            "info": f"showing the nearest rendered γ {nearest.generation.gate:.2f} (slider at {generation.gate:.2f}) "
                    f"· {target}"}


async def drag(studio: Studio, *, session: Session, **form) -> dict:
    """While the slider moves, where single renders are fast (ui.scrub): render at the slider's γ (not kept; let
    go there and it is), so that dragging plays like a video. Elsewhere, or for a position already rendered, nothing:
    peek shows the nearest render. Gradio runs only the newest position after the render in flight."""
    mode = form.get("mode") or "text"
    if not studio.scrubber.fast or session.run is not None or mode == ANIMATE:
        return {}
    try:
        photos, generation, task = _dragged(session, form)
        check_request(studio, photos, generation)
    except ValueError:
        return {}
    subject = fingerprint(photos)
    if session.exact(generation, subject) is not None:
        return {}
    studio.scrubber.drop()  # the ticks give way to the slider itself
    began = time.perf_counter()
    try:
        async for event in render(studio, photos, generation, [generation.gate], task=task, keep=False,
                                  decode="fast"):  # the tiny autoencoder, where the profile has one
            if isinstance(event, list) and event:
                studio.scrubber.render_s = time.perf_counter() - began
                session.remember(event[0], history=False)
                return {**large(session, event[0]),
                        "info": f"γ {generation.gate:.2f}, rendered while dragging · let go to keep it"}
    except Exception as error:  # the slider goes on: the release renders and says what is wrong
        logger.info("render while dragging failed: %s", error)
    return {}


async def select_history(studio: Studio, evt: gr.SelectData, *, session: Session) -> dict:
    """A history thumbnail was clicked: stop a render in flight, show that result and restore its settings (the
    seed box gets its seed; Lock seed stays as it is)."""
    studio.scrubber.drop()
    await halt(session)
    session.cancelled = None
    index = evt.index if isinstance(evt.index, int) else evt.index[0]
    if not 0 <= index < len(session.history):
        return {}
    result = session.history[index]
    session.current = result
    return {**show(session, result), **restore_outputs(result.generation),
            "info": f"{describe(result)} · its settings are back in the controls"}


def restore_png(studio: Studio, *, file: str | None) -> dict:
    """A FlexIP PNG was dropped: restore the settings written in its `parameters` chunk (a setting it does not
    name takes Generation's default) and lock the seed, so Generate makes that image again."""
    if not file:
        return {}
    name = Path(file).name
    try:
        generation, params = read_png_generation(file)
    except ValueError as error:
        toast(str(error))
        return {"restore_file": None, "info": f"✕ settings not restored: {error}"}
    notes = []
    profile = params.get("profile")
    if profile and profile != studio.engine.profile:
        notes.append(f"it was made with profile {profile!r} and this app runs {studio.engine.profile!r}, so the same "
                     "settings give a different image")
    if generation.task != "text-to-image":
        mode = MODE_OF_TASK.get(generation.task, generation.task).replace("_", " ")
        notes.append(f"it was made in the {mode} mode, whose picture is not in the PNG: add it again")
    line = f"settings restored from {name}: seed {generation.seed} (locked), γ {generation.gate:.2f}"
    line += "".join(f" · ⚠ {note}" for note in notes)
    if notes:
        toast(f"{name}: " + "; ".join(notes))
    else:
        gr.Info(html.escape(f"settings restored from {name}; the seed is locked, so Generate makes it again",
                            quote=False))
    return {**restore_outputs(generation), "lock_seed": True, "restore_file": None, "info": line}


def window_preset(*, preset: str) -> dict:
    """The identity window a preset names (all steps, identity early, identity late); custom leaves the numbers."""
    if preset not in WINDOW_PRESETS:
        return {}
    start, end = WINDOW_PRESETS[preset]
    return {"pres_from": start, "pres_until": end}


def new_seed() -> dict:
    return {"seed": random_seed()}


# --- comparisons: a same-seed γ sweep beside the reference, a prompt × γ grid ---------------------------
async def sweep(studio: Studio, *, session: Session, gates_text: str, sequential_sweep: bool = False, **form):
    """Render the same seed at each γ of `gates_text` in one batched call (one call per γ when
    `sequential_sweep`); the result nearest the slider's γ becomes the large image, and dragging the slider then
    shows these at once."""
    try:
        gates = parse_gates(gates_text, limit=MAX_SWEEP)
        session.photos, generation, task = read_request(studio, session, form)
        check_request(studio, session.photos, generation)
    except ValueError as error:
        yield refused(session, error)
        return
    label = f"γ sweep · **seed {generation.seed}**"
    async with running(session, "sweep", label) as run:
        yield {"info": f"{label} · {starting(studio)}"}
        try:
            async for event in render(studio, session.photos, generation, gates, run, one_at_a_time=sequential_sweep,
                                      task=task):
                if isinstance(event, Preview):
                    previews = zip(event.images, event.gates, strict=True)
                    yield {"sweep_gallery": [(image, f"γ {gate:.2f}") for image, gate in previews],
                           "info": f"{label} · {run.progress}"}
                    continue
                for result in event:
                    session.remember(result, history=False)
                reference = reference_view(session)
                session.sweep_tiles = [(reference, "reference")] * bool(reference) + [
                    (r.path, r.gate_caption) for r in event]
                session.sweep_clips = [(r.clip, r.gate_caption) for r in event if r.clip]
                session.sweep_zip = zip_results([r.clip or r.path for r in event], studio.results_folder,
                                                "flexip-sweep")
                session.current = session.nearest(generation) or event[0]
                warn_once(session, event)
                yield {**sweep_view(session), **large(session, session.current), "info": describe(session.current),
                       "session": session}
        except Stopped:
            if not run.superseded:
                yield stopped(studio, session, run)
        except Exception as error:  # the previous sweep goes back
            yield {**sweep_view(session), **refused(session, error, label)}


async def grid(studio: Studio, *, session: Session, prompts_text: str, gates_text: str,
               sequential_sweep: bool = False, **form):
    """Render each prompt (one per line) at each γ: one batched call per prompt, same seed throughout; each
    finished row shows at once."""
    try:
        gates = parse_gates(gates_text, limit=MAX_SWEEP)
        prompts = parse_prompts(prompts_text)
        session.photos, generation, task = read_request(studio, session, form)
        for prompt in prompts:
            check_request(studio, session.photos, replace(generation, prompt=prompt))
    except ValueError as error:
        yield refused(session, error)
        return
    label = f"grid · **seed {generation.seed}**"
    rows: list[tuple[str, list[Result]]] = []
    async with running(session, "grid", label) as run:
        yield {"info": f"{label} · {starting(studio)}"}
        try:
            for number, prompt in enumerate(prompts, start=1):
                run.stage = f"prompt {number} of {len(prompts)} · "
                async for event in render(studio, session.photos, replace(generation, prompt=prompt), gates, run,
                                          one_at_a_time=sequential_sweep, task=task):
                    if isinstance(event, Preview):
                        yield {"info": f"{label} · {run.progress}"}
                        continue
                    for result in event:
                        session.remember(result, history=False)
                    rows.append((prompt, list(event)))
                    session.grid_rows, session.grid_zip = list(rows), None  # the new grid replaces the old one
                    warn_once(session, event)
                    yield {**grid_view(session), "session": session}
        except Stopped:  # the rows finished so far stay
            if not run.superseded:
                yield stopped(studio, session, run)
            return
        except Exception as error:  # the rows finished so far stay
            yield {**grid_view(session), **refused(session, error, label)}
            return
    if len(rows) < len(prompts):  # cancelled by a newer render
        return
    session.grid_zip = zip_results([r.path for _, row in rows for r in row], studio.results_folder, "flexip-grid")
    names = " · ".join(f"row {number}: *{prompt}*" for number, (prompt, _) in enumerate(rows, start=1))
    yield {**grid_view(session), "session": session,
           "info": f"grid of {len(prompts)} prompts × {len(gates)} γ values · **seed {generation.seed}** · {names}"}


# --- the gallery: every render kept on disk, across restarts -------------------------------------------
GALLERY_PAGE = 60  # renders shown at once in the Gallery tab
GALLERY_SORTS = ("newest", "oldest", "gate", "identity")
GALLERY_SINCE = {"any time": None, "today": 1, "this week": 7, "this month": 31}  # the date filter: days back


def load_history(studio: Studio, *, session: Session) -> dict:
    """The page opened: the history strip shows the newest renders the gallery keeps, earlier runs' included."""
    if not session.history:
        session.history = [Result.from_entry(entry) for entry in studio.gallery.entries(limit=MAX_HISTORY)]
    return {"history": [(r.path, r.caption) for r in session.history], "session": session}


def gallery_view(studio: Studio, *, session: Session, query: str = "", sort: str = "newest", gate_min=None,
                 gate_max=None, this_subject: bool = False, since: str = "any time") -> dict:
    """The Gallery tab: the kept renders matching the search (prompt words), γ range, subject and date, sorted."""
    import datetime

    days = GALLERY_SINCE.get(since)
    start = None if days is None else datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=days)
    filters = dict(subject=session.subject() if this_subject and session.photos else None,
                   gate_min=gate_min, gate_max=gate_max, since=start)
    try:
        entries = studio.gallery.entries(str(query or ""), sort=sort, limit=GALLERY_PAGE, **filters)
        total = studio.gallery.count(str(query or ""), **filters)
    except ValueError as error:
        toast(str(error))
        return {"gallery_info": f"✕ {error}"}
    session.gallery_shown = [entry.id for entry in entries]
    shown = f"the first {len(entries)} of " if total > len(entries) else ""
    return {"gallery_grid": [(e.path, f"{Result.from_entry(e).caption} · {e.created[:16].replace('T', ' ')}")
                             for e in entries],
            "gallery_info": f"{shown}{total} kept render{'s' * (total != 1)} in `{studio.gallery.folder}` · click one "
                            "to open it and put its settings back", "session": session}


def select_gallery(studio: Studio, evt: gr.SelectData, *, session: Session) -> dict:
    """A kept render was clicked: it shows large and its settings go back into the controls."""
    studio.scrubber.drop()
    index = evt.index if isinstance(evt.index, int) else evt.index[0]
    entry = studio.gallery.get(session.gallery_shown[index]) if 0 <= index < len(session.gallery_shown) else None
    if entry is None:
        return {"gallery_info": "✕ that render is no longer kept; refresh the gallery"}
    session.gallery_selected, session.current = entry.id, Result.from_entry(entry)
    return {**show(session, session.current), **restore_outputs(entry.generation),
            "info": f"{describe(session.current)} · from the gallery; its settings are back in the controls"}


def delete_from_gallery(studio: Studio, *, session: Session, **view) -> dict:
    """Delete the render last clicked in the Gallery tab (its file and its row), then show the gallery again."""
    if session.gallery_selected is None:
        toast("click a render in the gallery first, then Delete")
        return {}
    studio.gallery.delete(session.gallery_selected)
    session.history = [r for r in session.history if Path(r.path).exists()]
    session.gallery_selected = None
    return {**gallery_view(studio, session=session, **view), "history": [(r.path, r.caption) for r in session.history]}


def reuse_subject(studio: Studio, *, session: Session) -> dict:
    """Make the subject of the render last clicked in the Gallery tab the current one (its photos and weights)."""
    entry = studio.gallery.get(session.gallery_selected) if session.gallery_selected is not None else None
    subject = studio.gallery.subject(entry.subject) if entry is not None and entry.subject else None
    if subject is None:
        toast("click a render in the gallery first (one made in this studio, whose photos were kept)")
        return {}
    photos = []
    for path, weight, name in zip(subject.photos, subject.weights, subject.names, strict=True):
        accepted, rejected = accept_photos([path], studio.photos_folder)
        for problem in rejected:
            toast(f"{name}: {problem.reason}")
        photos += [replace(photo, weight=weight, name=name) for photo in accepted]
    if not photos:
        return {}
    session.photos = photos[:studio.max_photos]
    return {"session": session, **slot_updates(session, studio.max_photos),
            "info": f"subject back: {', '.join(subject.names)} ({subject.renders} render(s) kept)"}


def api_history(studio: Studio, *, query: str = "", limit: float = 50) -> dict:
    """The renders the studio keeps, newest first.

    Args:
        query: words the prompt contains (case-insensitive); empty: all.
        limit: how many, 1 to 1000.

    Returns the PNGs and, per PNG, its settings, identity score, file name, id and creation time (UTC)."""
    try:
        entries = studio.gallery.entries(str(query or ""), limit=whole_number(limit, "limit", 1, MAX_LIMIT))
    except ValueError as error:
        raise refused_call(error) from None
    return {"api_images": [e.path for e in entries] or None, "api_parameters": [
        {**e.parameters, "identity_score": e.identity, "file": Path(e.path).name, "id": e.id, "created": e.created,
         "warnings": list(e.warnings)} for e in entries]}


# --- the mode panel ------------------------------------------------------------------------------------
MODE_VIEWS = {"mode_image": ("start_image", "control"), "denoise": ("start_image",), "scene": ("inpaint",),
              "mask": ("inpaint",), "control": ("control",), "control_scale": ("control",), "edge_view": ("control",),
              "frames": (ANIMATE,), "fps": (ANIMATE,), "sweep_clips": (ANIMATE,)}
STILL_VIEWS = ("sweep_gallery",)  # shown in every mode but Animate, whose row of clips takes its place


def mode_view(studio: Studio, *, mode: str) -> dict:
    """Show the inputs of the chosen mode only; a mode this profile cannot run says why (and what would run it)."""
    studio.scrubber.drop()
    reason = studio.engine.modes().get(mode)
    hint = {"start_image": "Image to image: the picture is the start; Denoise says how much of it is repainted.",
            "inpaint": "Paint where the subject goes on the scene, or upload a mask (white: the subject); the rest of "
                       "the scene is kept.",
            "control": "The picture's edges (computed here) shape the result; the subject comes from the photos.",
            ANIMATE: "A short clip of the subject (AnimateDiff): the γ slider works as for images; the γ sweep plays "
                     "its clips side by side.",
            }.get(mode)
    return {**{name: gr.update(visible=mode in modes) for name, modes in MODE_VIEWS.items()},
            **{name: gr.update(visible=mode != ANIMATE) for name in STILL_VIEWS},
            "mode_hint": gr.update(value=f"⚠ {reason}" if reason else hint, visible=bool(reason or hint))}


def edge_preview(studio: Studio, *, mode: str, mode_image, control: str, width, height):
    """The edge map the Control mode will follow, at the size it will render (shown beside the picture)."""
    if mode != "control" or not mode_image:
        return {"edge_view": None}
    try:
        side = int(max(float(width or 0), float(height or 0))) or studio.engine.defaults().height
        task = prepare("control", image=mode_image, control=control, side=side,
                       max_side=studio.engine.defaults().max_side)
    except (ValueError, TypeError) as error:
        toast(str(error))
        return {"edge_view": None}
    return {"edge_view": task.shown}


# --- the API: /generate and /sweep, stateless (photos with each call; the core caches their encoding) -----
def _api_subject(studio: Studio, photos: list[str] | None, weights: str) -> list[Photo]:
    if not photos:
        raise ValueError("no subject photos given; pass one or more image files as `photos`")
    if len(photos) > studio.max_photos:
        raise ValueError(f"{len(photos)} photos given; at most {studio.max_photos} are accepted")
    accepted, rejected = accept_photos(photos, studio.photos_folder)
    if rejected:
        raise ValueError("; ".join(rejection.reason for rejection in rejected))
    parts = [part for part in re.split(r"[\s,;]+", weights or "") if part]
    if parts and len(parts) != len(accepted):
        raise ValueError(f"{len(parts)} weights given for {len(accepted)} photos; give one per photo or none")
    try:
        values = [float(part) for part in parts] or [1.0] * len(accepted)
    except ValueError:
        raise ValueError(f"weights {weights!r} are not numbers; give them as e.g. '1, 0.5'") from None
    if any(not 0 <= value <= 10 for value in values) or not any(values):
        raise ValueError(f"weights {weights!r}: each must be from 0 to 10 and at least one above 0")
    return [replace(photo, weight=value) for photo, value in zip(accepted, values, strict=True)]


def _api_generation(settings: dict) -> Generation:
    """The Generation of the API's arguments (API_NAMES: steps, guidance, identity_early, the rest as named)."""
    return read_form({name: settings.get(API_NAMES.get(name, name)) for name in CONTROLS})


async def _api_run(studio: Studio, photos: list[Photo], generation: Generation, gates: list[float], progress,
                   task: TaskInputs | None = None, images: int = 1) -> tuple[list[str], list[dict]]:
    """The PNGs of one render and, per PNG, its parameters with its identity score, file name and warnings."""
    results: list[Result] = []
    async for event in render(studio, photos, generation, gates, progress=progress, task=task, images=images):
        if isinstance(event, Preview):
            if progress is not None:
                progress((event.step, event.total), desc="denoising", unit="steps")
        else:
            results = event
    notes = [photo.flat_warning for photo in photos if photo.flat] + list(task.notes if task is not None else ())
    files = [result.clip or result.path for result in results]  # an animate render's file is its clip
    return files, [{**result.parameters, "identity_score": result.identity, "file": Path(file).name,
                    "warnings": notes + list(result.warnings)} for result, file in zip(results, files)]


async def api_generate(studio: Studio, *, photos: list[str] | None, weights: str = "", batch: float = 1,
                       progress=gr.Progress(), **settings) -> dict:
    """Generate one image of the subject (or a batch with consecutive seeds).

    Args:
        photos: image files of one subject.
        weights: optional, one number per photo ("1, 0.5").
        batch: images in one call, 1 to 8, with seeds seed, seed + 1, ...
        settings: prompt, negative_prompt, gate, strength, seed (-1: a random one), steps, guidance, width, height,
            scheduler, and the branch windows (fractions of the steps, a branch acts where from <= progress <
            until): pres_from, identity_early (the identity branch's until), pers_from, pers_until.

    Returns the PNG (with its `parameters` chunk) and a list with its settings (named as Generation.to_parameters()
    names them), identity score, file name and warnings; bad input raises gr.Error with the message."""
    try:
        images = read_batch(batch)
        subject = _api_subject(studio, photos, weights)
        generation = _api_generation(settings)
        paths, described = await _api_run(studio, subject, generation, [generation.gate], progress, images=images)
    except (ValueError, NotLoaded) as error:
        raise refused_call(error) from None
    return {"api_images": paths, "api_parameters": described}


async def api_sweep(studio: Studio, *, photos: list[str] | None, weights: str = "",
                    gates: str = "0, 0.25, 0.5, 0.75, 1", progress=gr.Progress(), **settings) -> dict:
    """Render the same seed at several γ values in one batched call.

    Args:
        photos, weights, settings: as for /generate (its `gate` is not used).
        gates: comma-separated γ values in 0…1.

    Returns one PNG per γ, their settings and identity scores, and a zip of the PNGs; bad input raises gr.Error."""
    try:
        subject = _api_subject(studio, photos, weights)
        values = parse_gates(gates, limit=MAX_SWEEP)
        paths, described = await _api_run(studio, subject, _api_generation({**settings, "gate": values[0]}), values,
                                          progress)
    except (ValueError, NotLoaded) as error:
        raise refused_call(error) from None
    archive = zip_results(paths, studio.results_folder) if paths else None
    return {"api_images": paths, "api_parameters": described, "api_zip": archive}


async def _api_mode(studio: Studio, mode: str, photos, weights: str, progress, values: dict, settings: dict) -> dict:
    try:
        subject = _api_subject(studio, photos, weights)
        generation = _api_generation(settings)
        task = read_task(studio, {"mode": mode, **values}, generation)
        generation = with_task(generation, task)
        check_request(studio, subject, generation)
        paths, described = await _api_run(studio, subject, generation, [generation.gate], progress, task)
    except (ValueError, NotLoaded) as error:
        raise refused_call(error) from None
    return {"api_images": paths, "api_parameters": described}


async def api_animate(studio: Studio, *, photos: list[str] | None, weights: str = "", frames: float = DEFAULT_FRAMES,
                      fps: float = DEFAULT_FPS, progress=gr.Progress(), **settings) -> dict:
    """A short clip of the subject (AnimateDiff; profiles with a motion adapter: sd15, sd15-animate, tiny).

    Args:
        photos, weights, settings: as for /generate (prompt, negative_prompt, gate, seed, steps, guidance, width,
            height, ...).
        frames: frames in the clip, 8 to 32.
        fps: frames per second it plays at, 1 to 30.

    Returns the clip (MP4, or animated WebP where no encoder is installed; its settings in the file's metadata) and
    its settings (task "animate", num_frames, fps, identity_score of its first frame, file, warnings)."""
    values = await _api_mode(studio, ANIMATE, photos, weights, progress, {"frames": frames, "fps": fps}, settings)
    return {"api_video": values["api_images"][0], "api_parameters": values["api_parameters"][0]}


async def api_start_image(studio: Studio, *, photos: list[str] | None, image: str | None, weights: str = "",
                          denoise: float = 0.6, progress=gr.Progress(), **settings) -> dict:
    """Image to image: the subject drawn over a start picture (or sketch) of yours.

    Args:
        photos, weights, settings: as for /generate (width and height: the picture is fitted to their longer side).
        image: the start picture.
        denoise: how much of the picture is repainted, in (0, 1].

    Returns the PNG and its settings (mode "image-to-image", `task_inputs` with the strength), like /generate."""
    return await _api_mode(studio, "start_image", photos, weights, progress, {"mode_image": image, "denoise": denoise},
                           settings)


async def api_inpaint(studio: Studio, *, photos: list[str] | None, image: str | None, mask: str | None,
                      weights: str = "", progress=gr.Progress(), **settings) -> dict:
    """Inpainting: the subject painted into a scene where the mask is white; the rest of the scene is kept.

    Args:
        photos, weights, settings: as for /generate (width and height: the scene is fitted to their longer side).
        image: the scene.
        mask: white where the subject goes (resized to the scene, with a note, when its size differs).

    Returns the PNG and its settings, like /generate."""
    return await _api_mode(studio, "inpaint", photos, weights, progress, {"scene": image, "mask": mask}, settings)


async def api_control(studio: Studio, *, photos: list[str] | None, image: str | None, weights: str = "",
                      control: str = "canny", control_scale: float = 1.0, progress=gr.Progress(), **settings) -> dict:
    """Control: the structure of a picture of yours (its edges, computed here) through a ControlNet.

    Args:
        photos, weights, settings: as for /generate (width and height: the picture is fitted to their longer side).
        image: the picture whose structure to follow.
        control: the kind of control image: "canny".
        control_scale: how strongly the structure is followed, in [0, 2].

    Returns the PNG and its settings, like /generate."""
    return await _api_mode(studio, "control", photos, weights, progress,
                           {"mode_image": image, "control": control, "control_scale": control_scale}, settings)
