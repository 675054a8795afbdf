"""The named API endpoints `/generate` and `/sweep` for gradio_client: stateless, photos passed with each call
(the core caches their encoding by content), PNGs with the parameters chunk plus their settings as JSON."""
from __future__ import annotations

import logging
import re
from dataclasses import replace
from pathlib import Path

import gradio as gr

from .context import Studio
from .exports import zip_results
from .rendering import Preview, read_settings, render
from .settings import parse_gates
from .state import Photo, Result
from .uploads import accept_photos

logger = logging.getLogger(__name__)


def _subject(studio: Studio, photos: list[str] | None, weights: str):
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


async def _run(studio: Studio, photos, settings, gates, progress, low_vram=False) -> list[Result]:
    results: list[Result] = []
    async for event in render(studio, photos, settings, gates, progress, one_at_a_time=low_vram):
        if isinstance(event, Preview):
            if progress is not None:
                progress((event.step, event.total), desc="denoising", unit="steps")
        else:
            results = event
    return results


def _describe(results: list[Result], photos: list[Photo]) -> list[dict]:
    notes = [photo.flat_warning for photo in photos if photo.flat]
    return [{**result.parameters, "identity_score": result.identity, "file": Path(result.path).name,
             "warnings": notes + list(result.warnings)} for result in results]


async def api_generate(studio: Studio, *, photos: list[str] | None, weights: str = "", progress=gr.Progress(),
                       **form) -> dict:
    """Generate one image of the subject. photos: image files of one subject; weights: optional, one number
    per photo ("1, 0.5"); seed: -1 for a random one. Returns the PNG (with its `parameters` chunk) and a list
    with its settings and identity score."""
    subject = _subject(studio, photos, weights)
    results = await _run(studio, subject, read_settings(form), [float(form.get("gate", 0.5))], progress)
    return {"api_images": [r.path for r in results], "api_parameters": _describe(results, subject)}


async def api_sweep(studio: Studio, *, photos: list[str] | None, weights: str = "",
                    gates: str = "0, 0.25, 0.5, 0.75, 1", progress=gr.Progress(), **form) -> dict:
    """Render the same seed at several γ values in one batched call. gates: comma-separated values in 0…1.
    Returns one PNG per γ, their settings and identity scores, and a zip of the PNGs."""
    subject = _subject(studio, photos, weights)
    try:
        values = parse_gates(gates)
    except ValueError as error:
        raise gr.Error(str(error)) from None
    results = await _run(studio, subject, read_settings(form), values, progress)
    paths = [r.path for r in results]
    archive = zip_results(paths, studio.results_folder) if paths else None
    return {"api_images": paths, "api_parameters": _describe(results, subject), "api_zip": archive}
