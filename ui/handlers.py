"""Every event handler of the studio: the subject panel (photos, weights, examples), Generate, the live γ slider
(peek while dragging, render on release), history, seeds, restoring settings, the γ sweep and the prompt × γ grid,
the header, and the `/generate` and `/sweep` API endpoints.

Each handler returns (or yields) a dict keyed by output name (ui.layout binds the names to components), so tests
call them with a fake engine and no server. Every render is one `Generation` (flexip_core.generation.settings) plus
the subject photos and the γ values to render; the core's ValueErrors become gr.Error so the user sees the message
and the app keeps serving."""
# No `from __future__ import annotations`: Gradio reads the gr.SelectData annotation as a class.
import asyncio
import logging
import random
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import gradio as gr
from PIL import Image

from flexip_core.generation.gate import GateSchedule
from flexip_core.generation.settings import MAX_SEED, Generation, parse_gates

from .engine import Done, RenderCancelled, Step, stream_render
from .files import EXAMPLES, ensure_examples, example_path, save_result, zip_results
from .state import Photo, Result, Session, Studio, accept_photos, fingerprint, open_photo, read_png_generation

logger = logging.getLogger(__name__)

# The generation panel's controls, named as Generation.to_parameters() names them, in layout order.
CONTROLS = ("prompt", "negative_prompt", "gate", "strength", "seed", "num_inference_steps", "guidance_scale", "width",
            "height", "scheduler", "pres_until")
# The API's argument names for these where they differ (a public contract kept from before the fields were renamed).
API_NAMES = {"num_inference_steps": "steps", "guidance_scale": "guidance", "pres_until": "identity_early"}
MAX_SWEEP = 9  # γ values in one sweep or grid row
MAX_GRID_PROMPTS = 4  # rows of the prompt × γ grid
PREVIEW_SIDE = 256  # previews are upscaled to about this size so the browser shows blocks, not a blur
METRICS = {"clip": "CLIP cosine with the subject",  # what each identity metric (parameters["identity_metric"]) reads
           "toyworld": "share of the toy's shape, colour and pattern kept, read by the toy-world oracle"}


# --- the form ------------------------------------------------------------------------------------------
def random_seed() -> int:
    return random.SystemRandom().randint(0, MAX_SEED)


def read_form(form: dict) -> Generation:
    """The Generation the controls describe (keys: CONTROLS; seed empty or negative: a random one); gr.Error
    naming the first value that is not a number. Ranges are checked by Generation.check when rendering."""
    def number(key, kind):
        value = form.get(key)
        try:
            return float(value) if kind is float else int(round(float(value)))
        except (TypeError, ValueError, OverflowError):
            raise gr.Error(f"{key.replace('_', ' ')} is {value!r}; enter a number") from None

    seed = form.get("seed")
    draw = seed is None or seed == "" or (isinstance(seed, (int, float)) and seed < 0)  # -1 or empty: a random one
    try:
        windows = GateSchedule(pres_until=number("pres_until", float))
    except ValueError as error:
        raise gr.Error(f"identity until: {error}") from None
    return Generation(
        prompt=str(form.get("prompt") or "").strip(), negative_prompt=str(form.get("negative_prompt") or "").strip(),
        gate=number("gate", float), strength=number("strength", float),
        seed=random_seed() if draw else number("seed", int),
        num_inference_steps=number("num_inference_steps", int), guidance_scale=number("guidance_scale", float),
        width=number("width", int), height=number("height", int), scheduler=str(form.get("scheduler") or "") or None,
        windows=windows,
    )


def weighted_photos(photos: list[Photo], form: dict) -> list[Photo]:
    """The photos with the slot weights (`weight0`, `weight1`, ... popped from `form`) applied."""
    slots = {key: form.pop(key) for key in [k for k in form if k.startswith("weight") and k[6:].isdigit()]}
    result = []
    for i, photo in enumerate(photos):
        value = slots.get(f"weight{i}")
        try:
            weight = photo.weight if value is None else float(value)
        except (TypeError, ValueError):
            raise gr.Error(f"weight of {photo.name} is {value!r}; use a number from 0 to 10") from None
        if not 0.0 <= weight <= 10.0:
            raise gr.Error(f"weight of {photo.name} is {weight:g}; use a value from 0 to 10")
        result.append(replace(photo, weight=weight))
    if result and not any(photo.weight > 0 for photo in result):
        raise gr.Error("every photo has weight 0; give at least one photo a weight above 0")
    return result


def parse_prompts(text: str, limit: int = MAX_GRID_PROMPTS) -> list[str]:
    """One prompt per non-empty line; raises ValueError when there are none or too many."""
    prompts = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not prompts:
        raise ValueError("no prompts given; write one prompt per line")
    if len(prompts) > limit:
        raise ValueError(f"{len(prompts)} prompts given; the grid takes at most {limit}")
    return prompts


def _gates(text: str) -> list[float]:
    try:
        return parse_gates(text, limit=MAX_SWEEP)
    except ValueError as error:
        raise gr.Error(str(error)) from None


# --- the engine: loading, the header, one render -------------------------------------------------------
async def ensure_loaded(studio: Studio, progress: gr.Progress | None = None) -> None:
    """Load the models on first use (once, in a worker thread), showing progress meanwhile."""
    if studio.engine.ready():
        return
    if progress is not None:
        progress(None, desc=f"Loading the {studio.engine.profile} models (first run only)…")
    try:
        await asyncio.to_thread(studio.engine.load)
    except Exception as error:
        logger.exception("loading profile %s failed", studio.engine.profile)
        raise gr.Error(f"The {studio.engine.profile} models could not be loaded: {error}") from error


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


async def render(studio: Studio, photos: Sequence[Photo], generation: Generation, gates: Sequence[float],
                 progress: gr.Progress | None = None, one_at_a_time: bool = False
                 ) -> AsyncIterator[Preview | list[Result]]:
    """Yield a Preview per step, then the list of saved Results (one per γ). `one_at_a_time` renders the γ
    values as separate batches of one (less device memory, more time)."""
    if not photos:
        raise gr.Error("add at least one photo of the subject first (drop, paste or upload it in the Subject panel)")
    if not generation.prompt:
        raise gr.Error("the prompt is empty; describe what to make of the subject")
    try:
        generation.check(studio.engine.defaults().max_side)  # before loading: a bad size must not wait for the models
    except ValueError as error:
        raise gr.Error(str(error)) from None
    await ensure_loaded(studio, progress)
    try:
        references = [open_photo(photo) for photo in photos]
    except ValueError as error:
        raise gr.Error(str(error)) from None
    weights = [photo.weight for photo in photos]
    subject = fingerprint(list(photos))
    batches = [[gate] for gate in gates] if one_at_a_time else [list(gates)]
    results: list[Result] = []
    for batch in batches:
        try:
            async for event in stream_render(studio.engine, references, weights, generation, batch):
                if isinstance(event, Step):
                    yield Preview(event.step, event.total, [_upscale(image) for image in event.previews], batch)
                elif isinstance(event, Done):
                    results.extend(_save(studio, subject, event))
        except ValueError as error:
            raise gr.Error(str(error)) from None
        except RenderCancelled:
            logger.info("render cancelled")
            return
    for warning in dict.fromkeys(w for result in results for w in result.warnings):  # each once, in order
        gr.Warning(warning)
    yield results


def _save(studio: Studio, subject: str, done: Done) -> list[Result]:
    return [Result(path=save_result(r.image, r.parameters, studio.results_folder), generation=r.generation,
                   identity=r.identity, subject=subject, parameters=r.parameters, warnings=r.warnings)
            for r in done.results]


# --- showing results -----------------------------------------------------------------------------------
def describe(result: Result) -> str:
    g = result.generation
    score = "n/a" if result.identity is None else f"{result.identity:.3f}"
    metric = result.parameters.get("identity_metric", "clip")
    notes = "".join(f" · ⚠ {warning}" for warning in result.warnings)
    return (f"**seed {g.seed}** · γ {g.gate:.2f} · strength {g.strength:g} · {g.num_inference_steps} steps · "
            f"identity score **{score}** ({METRICS.get(metric, metric)}){notes}")


def reference_view(session: Session) -> str | None:
    return session.photos[0].view if session.photos else None


def show(session: Session, result: Result) -> dict:
    """Outputs that put `result` on screen: large, against the reference, in the history, as a download."""
    reference = reference_view(session)
    return {
        "result": result.path, "compare": (reference, result.path) if reference else None,
        "info": describe(result), "download": gr.update(value=result.path, interactive=True),
        "history": [(r.path, r.caption) for r in session.history], "session": session,
    }


def restore_outputs(generation: Generation) -> dict:
    """Outputs that put `generation` back into the controls (and lock the seed so a rerun reproduces); a value
    the core left open (the pipeline's own scheduler, the input image's size) leaves its control as it is."""
    values = generation.to_parameters()
    return {**{name: gr.update() if values[name] is None else values[name] for name in CONTROLS}, "lock_seed": True}


# --- subject panel -------------------------------------------------------------------------------------
def slot_names(count: int) -> list[str]:
    """Output names of the photo slots: a group, its thumbnail and its weight slider per slot."""
    return [name for i in range(count) for name in (f"slot{i}", f"thumb{i}", f"weight{i}")]


def slot_updates(session: Session, count: int) -> dict:
    """Show one slot per photo (the encoder's square view, the file name, the weight); hide the rest."""
    values = {}
    for i in range(count):
        photo = session.photos[i] if i < len(session.photos) else None
        values[f"slot{i}"] = gr.update(visible=photo is not None)
        values[f"thumb{i}"] = gr.update(value=photo.view if photo else None, label=photo.name if photo else "")
        values[f"weight{i}"] = gr.update(value=photo.weight if photo else 1.0)
    return values


def add_photos(studio: Studio, *, session: Session, files: list[str] | None) -> dict:
    """Validate dropped/pasted/uploaded files; keep the good ones, warn about each bad one by name."""
    accepted, rejected = accept_photos(files or [], studio.photos_folder)
    for rejection in rejected:
        gr.Warning(rejection.reason)
    known = {photo.digest for photo in session.photos}
    for photo in accepted:
        if photo.digest in known:
            gr.Warning(f"{photo.name}: this photo is already in the subject")
            continue
        if len(session.photos) >= studio.max_photos:
            gr.Warning(f"{photo.name}: the subject holds at most {studio.max_photos} photos; remove one first")
            continue
        if photo.flat:
            gr.Warning(photo.flat_warning)
        session.photos.append(photo)
        known.add(photo.digest)
    logger.info("subject now has %d photo(s); %d rejected", len(session.photos), len(rejected))
    return {"session": session, "files": None, **slot_updates(session, studio.max_photos)}


def remove_photo(studio: Studio, *, session: Session, index: int) -> dict:
    """Drop the photo in slot `index` (its results stay in the history)."""
    if 0 <= index < len(session.photos):
        removed = session.photos.pop(index)
        logger.info("removed %s from the subject", removed.name)
    return {"session": session, **slot_updates(session, studio.max_photos)}


def load_example(studio: Studio, *, session: Session, name: str) -> dict:
    """Replace the subject with one of the drawn example subjects and put its prompt in place."""
    example = next((e for e in EXAMPLES if e.name == name), None)
    if example is None:
        raise gr.Error(f"unknown example {name!r}")
    ensure_examples()
    accepted, rejected = accept_photos([str(example_path(example))], studio.photos_folder)
    if rejected:
        raise gr.Error(rejected[0].reason)
    session.photos = accepted
    return {"session": session, "prompt": example.prompt, **slot_updates(session, studio.max_photos)}


# --- generation: Generate, the γ slider, history, seed, PNG restore -------------------------------------
async def _render_one(studio: Studio, session: Session, generation: Generation, progress):
    label = f"**seed {generation.seed}** · γ {generation.gate:.2f}"
    yield {"seed": generation.seed, "info": f"{label} · starting…"}
    try:
        async for event in render(studio, session.photos, generation, [generation.gate], progress):
            if isinstance(event, Preview):
                yield {"result": event.images[0], "info": f"{label} · step {event.step}/{event.total}"}
            elif event:
                result = event[0]
                session.remember(result)
                session.current = result
                yield show(session, result)
    except gr.Error as error:
        yield {"info": f"{label} · not rendered: {error.message}"}
        raise


async def generate(studio: Studio, *, session: Session, lock_seed: bool, progress=gr.Progress(), **form):
    """Generate one image with the current settings; a new random seed unless the seed is locked."""
    session.photos = weighted_photos(session.photos, form)
    generation = read_form(form)
    if not lock_seed:
        generation = replace(generation, seed=random_seed())
    async for values in _render_one(studio, session, generation, progress):
        yield values


async def release(studio: Studio, *, session: Session, progress=gr.Progress(), **form):
    """The γ slider was released: render at the new γ with the same seed and settings (a render already
    made for exactly these settings is shown at once instead)."""
    session.photos = weighted_photos(session.photos, form)
    generation = read_form(form)
    cached = session.exact(generation)
    if cached is not None:
        session.current = cached
        yield show(session, cached)
        return
    async for values in _render_one(studio, session, generation, progress):
        yield values


def peek(studio: Studio, *, session: Session, **form) -> dict:
    """While the slider is dragged: show the nearest γ already rendered for this subject, prompt, seed and
    settings, computing nothing."""
    try:
        photos = weighted_photos(session.photos, dict(form))
        generation = read_form(form)
    except gr.Error:
        return {}
    nearest = session.nearest(generation, fingerprint(photos))
    if nearest is None:
        return {"info": f"γ {generation.gate:.2f} · release the slider to render"}
    reference = reference_view(session)
    return {"result": nearest.path, "compare": (reference, nearest.path) if reference else None,
            "info": f"showing the nearest rendered γ {nearest.generation.gate:.2f} (slider at {generation.gate:.2f})"
                    " · release to render"}


def select_history(studio: Studio, evt: gr.SelectData, *, session: Session) -> dict:
    """A history thumbnail was clicked: show that result and restore its settings."""
    index = evt.index if isinstance(evt.index, int) else evt.index[0]
    if not 0 <= index < len(session.history):
        return {}
    result = session.history[index]
    session.current = result
    return {**show(session, result), **restore_outputs(result.generation)}


def restore_png(studio: Studio, *, file: str | None) -> dict:
    """A FlexIP PNG was dropped: restore the settings written in its `parameters` chunk (a setting it does not
    name takes Generation's default)."""
    if not file:
        return {}
    name = Path(file).name
    try:
        generation, params = read_png_generation(file)
    except ValueError as error:
        raise gr.Error(str(error)) from None
    profile = params.get("profile")
    if profile and profile != studio.engine.profile:
        gr.Warning(f"{name} was made with profile {profile!r}; this app runs {studio.engine.profile!r}, "
                   "so the same settings give a different image")
    windows, default = generation.windows, GateSchedule()
    unshown = [f"{key} {getattr(windows, key):g}" for key in ("pres_from", "pers_from", "pers_until")
               if getattr(windows, key) != getattr(default, key)]
    unshown += [f"task {generation.task}"] * (generation.task != "text-to-image")
    if unshown:
        gr.Warning(f"{name}: the studio has no control for {', '.join(unshown)}; those settings were not restored")
    gr.Info(f"settings restored from {name}")
    return {**restore_outputs(generation), "restore_file": None,
            "info": f"settings restored from {name}: seed {generation.seed}, γ {generation.gate:.2f}"}


def new_seed() -> dict:
    return {"seed": random_seed()}


# --- comparisons: a same-seed γ sweep beside the reference, a prompt × γ grid ---------------------------
def _download(paths: list[str], studio: Studio, stem: str):
    return gr.update(value=zip_results(paths, studio.results_folder, stem), interactive=True)


async def sweep(studio: Studio, *, session: Session, gates_text: str, sequential_sweep: bool = False,
                progress=gr.Progress(), **form):
    """Render the same seed at each γ of `gates_text` in one batched call (one call per γ when
    `sequential_sweep`); the result nearest the slider's γ becomes the large image, and dragging the slider then
    shows these at once."""
    session.photos = weighted_photos(session.photos, form)
    gates = _gates(gates_text)
    generation = read_form(form)
    reference = reference_view(session)
    async for event in render(studio, session.photos, generation, gates, progress, one_at_a_time=sequential_sweep):
        if isinstance(event, Preview):
            previews = zip(event.images, event.gates, strict=True)
            yield {"sweep_gallery": [(image, f"γ {gate:.2f}") for image, gate in previews],
                   "info": f"sweep · **seed {generation.seed}** · step {event.step}/{event.total}"}
            continue
        for result in event:
            session.remember(result, history=False)
        session.sweep = list(event)
        current = session.nearest(generation) or event[0]
        session.current = current
        yield {
            "sweep_gallery": [(reference, "reference")] * bool(reference) + [(r.path, r.gate_caption) for r in event],
            "sweep_zip": _download([r.path for r in event], studio, "flexip-sweep"),
            "result": current.path, "compare": (reference, current.path) if reference else None,
            "info": describe(current), "session": session,
        }


async def grid(studio: Studio, *, session: Session, prompts_text: str, gates_text: str,
               sequential_sweep: bool = False, progress=gr.Progress(), **form):
    """Render each prompt (one per line) at each γ: one batched call per prompt, same seed throughout."""
    session.photos = weighted_photos(session.photos, form)
    gates = _gates(gates_text)
    generation = read_form(form)
    try:
        prompts = parse_prompts(prompts_text)
    except ValueError as error:
        raise gr.Error(str(error)) from None
    cells = []
    for row, prompt in enumerate(prompts, start=1):
        async for event in render(studio, session.photos, replace(generation, prompt=prompt), gates, progress,
                                  one_at_a_time=sequential_sweep):
            if isinstance(event, Preview):
                yield {"info": f"grid · prompt {row}/{len(prompts)} · step {event.step}/{event.total}"}
                continue
            for result in event:
                session.remember(result, history=False)
            cells.extend(event)
            yield {"grid_gallery": gr.update(value=[(r.path, r.gate_caption) for r in cells], columns=len(gates))}
    if not cells:
        return
    session.sweep = list(cells)
    rows = " · ".join(f"row {row}: *{prompt}*" for row, prompt in enumerate(prompts, start=1))
    yield {"grid_zip": _download([r.path for r in cells], studio, "flexip-grid"), "session": session,
           "info": f"grid of {len(prompts)} prompts × {len(gates)} γ values · **seed {generation.seed}** · {rows}"}


# --- the API: /generate and /sweep, stateless (photos with each call; the core caches their encoding) -----
def _api_subject(studio: Studio, photos: list[str] | None, weights: str) -> list[Photo]:
    if not photos:
        raise gr.Error("no subject photos given; pass one or more image files as `photos`")
    if len(photos) > studio.max_photos:
        raise gr.Error(f"{len(photos)} photos given; at most {studio.max_photos} are accepted")
    accepted, rejected = accept_photos(photos, studio.photos_folder)
    if rejected:
        raise gr.Error("; ".join(rejection.reason for rejection in rejected))
    parts = [part for part in re.split(r"[\s,;]+", weights or "") if part]
    if parts and len(parts) != len(accepted):
        raise gr.Error(f"{len(parts)} weights given for {len(accepted)} photos; give one per photo or none")
    try:
        values = [float(part) for part in parts] or [1.0] * len(accepted)
    except ValueError:
        raise gr.Error(f"weights {weights!r} are not numbers; give them as e.g. '1, 0.5'") from None
    if any(not 0 <= value <= 10 for value in values) or not any(values):
        raise gr.Error(f"weights {weights!r}: each must be from 0 to 10 and at least one above 0")
    return [replace(photo, weight=value) for photo, value in zip(accepted, values, strict=True)]


def _api_generation(settings: dict) -> Generation:
    """The Generation of the API's arguments (API_NAMES: steps, guidance, identity_early, the rest as named)."""
    return read_form({name: settings.get(API_NAMES.get(name, name)) for name in CONTROLS})


async def _api_run(studio: Studio, photos: list[Photo], generation: Generation, gates: list[float], progress
                   ) -> tuple[list[str], list[dict]]:
    """The PNGs of one render and, per PNG, its parameters with its identity score, file name and warnings."""
    results: list[Result] = []
    async for event in render(studio, photos, generation, gates, progress):
        if isinstance(event, Preview):
            if progress is not None:
                progress((event.step, event.total), desc="denoising", unit="steps")
        else:
            results = event
    notes = [photo.flat_warning for photo in photos if photo.flat]
    return [result.path for result in results], [
        {**result.parameters, "identity_score": result.identity, "file": Path(result.path).name,
         "warnings": notes + list(result.warnings)} for result in results]


async def api_generate(studio: Studio, *, photos: list[str] | None, weights: str = "", progress=gr.Progress(),
                       **settings) -> dict:
    """Generate one image of the subject.

    Args:
        photos: image files of one subject.
        weights: optional, one number per photo ("1, 0.5").
        settings: prompt, negative_prompt, gate, strength, seed (-1: a random one), steps, guidance, width, height,
            scheduler, identity_early (the identity branch acts in this first fraction of the steps).

    Returns the PNG (with its `parameters` chunk) and a list with its settings (named as Generation.to_parameters()
    names them), identity score, file name and warnings."""
    subject = _api_subject(studio, photos, weights)
    generation = _api_generation(settings)
    paths, described = await _api_run(studio, subject, generation, [generation.gate], progress)
    return {"api_images": paths, "api_parameters": described}


async def api_sweep(studio: Studio, *, photos: list[str] | None, weights: str = "",
                    gates: str = "0, 0.25, 0.5, 0.75, 1", progress=gr.Progress(), **settings) -> dict:
    """Render the same seed at several γ values in one batched call.

    Args:
        photos, weights, settings: as for /generate (its `gate` is not used).
        gates: comma-separated γ values in 0…1.

    Returns one PNG per γ, their settings and identity scores, and a zip of the PNGs."""
    subject = _api_subject(studio, photos, weights)
    values = _gates(gates)
    paths, described = await _api_run(studio, subject, _api_generation({**settings, "gate": values[0]}), values,
                                      progress)
    archive = zip_results(paths, studio.results_folder) if paths else None
    return {"api_images": paths, "api_parameters": described, "api_zip": archive}
