"""The subject panel: adding photos (validated, several at once), removing them, and their weights."""
from __future__ import annotations

import logging
from dataclasses import replace

import gradio as gr

from .context import Studio
from .state import Photo, Session
from .uploads import accept_photos

logger = logging.getLogger(__name__)


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
    from .examples import EXAMPLES, ensure_examples, example_path

    example = next((e for e in EXAMPLES if e.name == name), None)
    if example is None:
        raise gr.Error(f"unknown example {name!r}")
    ensure_examples()
    accepted, rejected = accept_photos([str(example_path(example))], studio.photos_folder)
    if rejected:
        raise gr.Error(rejected[0].reason)
    session.photos = accepted
    return {"session": session, "prompt": example.prompt, **slot_updates(session, studio.max_photos)}
