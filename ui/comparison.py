"""Comparisons: a same-seed sweep of γ rendered as one batch beside the reference, and a prompt × γ grid."""
from __future__ import annotations

import logging
from dataclasses import replace

import gradio as gr

from .context import Studio
from .exports import zip_results
from .handlers import describe, reference_view
from .rendering import Preview, read_settings, render
from .settings import parse_gates, parse_prompts
from .state import Session
from .subject import weighted_photos

logger = logging.getLogger(__name__)


def _settings_and_gates(session: Session, form: dict, gates_text: str):
    session.photos = weighted_photos(session.photos, form)
    try:
        gates = parse_gates(gates_text)
    except ValueError as error:
        raise gr.Error(str(error)) from None
    return read_settings(form), gates


def _download(paths: list[str], studio: Studio, stem: str):
    return gr.update(value=zip_results(paths, studio.results_folder, stem), interactive=True)


async def sweep(studio: Studio, *, session: Session, gates_text: str, low_vram: bool = False,
                progress=gr.Progress(), **form):
    """Render the same seed at each γ of `gates_text` in one batched call; the result nearest the slider's γ
    becomes the large image, and dragging the slider then shows these at once."""
    settings, gates = _settings_and_gates(session, form, gates_text)
    reference = reference_view(session)
    async for event in render(studio, session.photos, settings, gates, progress, one_at_a_time=low_vram):
        if isinstance(event, Preview):
            previews = zip(event.images, event.gates, strict=True)
            yield {"sweep_gallery": [(image, f"γ {gate:.2f}") for image, gate in previews],
                   "info": f"sweep · **seed {settings.seed}** · step {event.step}/{event.total}"}
            continue
        for result in event:
            session.remember(result, history=False)
        session.sweep = list(event)
        current = session.nearest(settings) or event[0]
        session.current = current
        yield {
            "sweep_gallery": [(reference, "reference")] * bool(reference) + [(r.path, r.gate_caption) for r in event],
            "sweep_zip": _download([r.path for r in event], studio, "flexip-sweep"),
            "result": current.path, "compare": (reference, current.path) if reference else None,
            "info": describe(current), "session": session,
        }


async def grid(studio: Studio, *, session: Session, prompts_text: str, gates_text: str, low_vram: bool = False,
               progress=gr.Progress(), **form):
    """Render each prompt (one per line) at each γ: one batched call per prompt, same seed throughout."""
    settings, gates = _settings_and_gates(session, form, gates_text)
    try:
        prompts = parse_prompts(prompts_text)
    except ValueError as error:
        raise gr.Error(str(error)) from None
    cells = []
    for row, prompt in enumerate(prompts, start=1):
        row_settings = replace(settings, prompt=prompt)
        async for event in render(studio, session.photos, row_settings, gates, progress, one_at_a_time=low_vram):
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
           "info": f"grid of {len(prompts)} prompts × {len(gates)} γ values · **seed {settings.seed}** · {rows}"}
