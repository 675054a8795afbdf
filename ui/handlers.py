"""Event handlers of the generation panel: Generate, the live γ slider (peek while dragging, render on
release), history, seeds and restoring settings. Each returns (or yields) a dict keyed by output name."""
# No `from __future__ import annotations`: Gradio reads the gr.SelectData annotation as a class.
import logging
from dataclasses import asdict, replace

import gradio as gr

from flexip_core.loading.profiles import IDENTITY_METRICS

from .context import Studio, engine_status
from .rendering import Preview, random_seed, read_settings, render
from .settings import Settings
from .state import Result, Session, fingerprint
from .subject import weighted_photos
from .uploads import file_name, read_png_parameters

logger = logging.getLogger(__name__)

SETTING_NAMES = tuple(field for field in asdict(Settings(prompt="")))  # form inputs that make up Settings


def describe(result: Result) -> str:
    s = result.settings
    score = "n/a" if result.identity is None else f"{result.identity:.3f}"
    metric = IDENTITY_METRICS.get(result.parameters.get("identity_metric", "clip"), IDENTITY_METRICS["clip"])
    notes = "".join(f" · ⚠ {warning}" for warning in result.warnings)
    return (f"**seed {s.seed}** · γ {s.gate:.2f} · strength {s.strength:g} · {s.steps} steps · "
            f"identity score **{score}** ({metric}){notes}")


def gallery(results: list[Result]) -> list[tuple[str, str]]:
    return [(result.path, result.caption) for result in results]


def reference_view(session: Session) -> str | None:
    return session.photos[0].view if session.photos else None


def show(session: Session, result: Result) -> dict:
    """Outputs that put `result` on screen: large, against the reference, in the history, as a download."""
    reference = reference_view(session)
    return {
        "result": result.path, "compare": (reference, result.path) if reference else None,
        "info": describe(result), "download": gr.update(value=result.path, interactive=True),
        "history": gallery(session.history), "session": session,
    }


async def _render_one(studio: Studio, session: Session, settings: Settings, progress):
    label = f"**seed {settings.seed}** · γ {settings.gate:.2f}"
    yield {"seed": settings.seed, "info": f"{label} · starting…"}
    try:
        async for event in render(studio, session.photos, settings, [settings.gate], progress):
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
    settings = read_settings(form)
    if not lock_seed:
        settings = replace(settings, seed=random_seed())
    async for values in _render_one(studio, session, settings, progress):
        yield values


async def release(studio: Studio, *, session: Session, progress=gr.Progress(), **form):
    """The γ slider was released: render at the new γ with the same seed and settings (a render already
    made for exactly these settings is shown at once instead)."""
    session.photos = weighted_photos(session.photos, form)
    settings = read_settings(form)
    cached = session.exact(settings)
    if cached is not None:
        session.current = cached
        yield show(session, cached)
        return
    async for values in _render_one(studio, session, settings, progress):
        yield values


def peek(studio: Studio, *, session: Session, **form) -> dict:
    """While the slider is dragged: show the nearest γ already rendered for this subject, prompt, seed and
    settings, computing nothing."""
    try:
        photos = weighted_photos(session.photos, dict(form))
        settings = read_settings(form)
    except gr.Error:
        return {}
    nearest = session.nearest(settings, fingerprint(photos))
    if nearest is None:
        return {"info": f"γ {settings.gate:.2f} · release the slider to render"}
    reference = reference_view(session)
    return {"result": nearest.path, "compare": (reference, nearest.path) if reference else None,
            "info": f"showing the nearest rendered γ {nearest.settings.gate:.2f} (slider at {settings.gate:.2f}) · "
                    f"release to render"}


def restore_outputs(settings: Settings) -> dict:
    """Outputs that put `settings` back into the controls (and lock the seed so a rerun reproduces)."""
    return {**{name: getattr(settings, name) for name in SETTING_NAMES}, "lock_seed": True}


def select_history(studio: Studio, evt: gr.SelectData, *, session: Session) -> dict:
    """A history thumbnail was clicked: show that result and restore its settings."""
    index = evt.index if isinstance(evt.index, int) else evt.index[0]
    if not 0 <= index < len(session.history):
        return {}
    result = session.history[index]
    session.current = result
    return {**show(session, result), **restore_outputs(result.settings)}


def restore_png(studio: Studio, *, file: str | None, **form) -> dict:
    """A FlexIP PNG was dropped: restore the settings written in its `parameters` chunk."""
    if not file:
        return {}
    try:
        current = read_settings(form)
    except gr.Error:
        current = Settings(prompt="")
    try:
        params = read_png_parameters(file)
        settings = Settings.from_parameters(params, fallback=current)
    except ValueError as error:
        raise gr.Error(str(error)) from None
    profile = params.get("profile")
    if profile and profile != studio.engine.profile:
        gr.Warning(f"{file_name(file)} was made with profile {profile!r}; this app runs {studio.engine.profile!r}, "
                   "so the same settings give a different image")
    gr.Info(f"settings restored from {file_name(file)}")
    return {**restore_outputs(settings), "restore_file": None,
            "info": f"settings restored from {file_name(file)}: seed {settings.seed}, γ {settings.gate:.2f}"}


def new_seed() -> dict:
    return {"seed": random_seed()}


def status(studio: Studio) -> dict:
    """Engine state for the header; the timer keeps polling only while the models are loading."""
    waiting = not studio.engine.ready() and studio.engine.failure() is None
    return {"status": engine_status(studio), "timer": gr.Timer(active=waiting)}
