"""One render as the handlers see it: subject photos + Settings + γ values in, step previews and saved
results out; the core's ValueErrors become gr.Error so the user sees the message and the app keeps serving."""
from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import gradio as gr
from PIL import Image

from .context import Studio, ensure_loaded
from .engine import RenderCancelled, make_request
from .exports import save_result
from .runner import Done, Step, stream_render
from .settings import MAX_SEED, Settings
from .state import Photo, Result, fingerprint
from .uploads import open_photo

logger = logging.getLogger(__name__)

PREVIEW_SIDE = 256  # previews are upscaled to about this size so the browser shows blocks, not a blur


@dataclass(frozen=True)
class Preview:
    step: int  # steps done
    total: int  # steps in the run
    images: list  # one preview per γ of the batch being rendered, upscaled for display
    gates: list  # the γ of each preview


def random_seed() -> int:
    return random.SystemRandom().randint(0, MAX_SEED)


def read_settings(form: dict) -> Settings:
    """Settings from the form's values (keys: Settings fields); gr.Error naming the first unusable one."""
    def number(key, kind):
        value = form.get(key)
        try:
            return kind(value) if kind is float else int(round(float(value)))
        except (TypeError, ValueError):
            raise gr.Error(f"{key.replace('_', ' ')} is {value!r}; enter a number") from None

    seed = form.get("seed")
    if seed is None or seed == "" or (isinstance(seed, (int, float)) and seed < 0):
        seed = None  # -1 or empty: a random seed
    return Settings(
        prompt=str(form.get("prompt") or "").strip(), negative_prompt=str(form.get("negative_prompt") or "").strip(),
        gate=number("gate", float), strength=number("strength", float),
        seed=random_seed() if seed is None else number("seed", int),
        steps=number("steps", int), guidance=number("guidance", float), width=number("width", int),
        height=number("height", int), scheduler=str(form.get("scheduler") or ""),
        identity_early=number("identity_early", float),
    )


def _upscale(image: Image.Image) -> Image.Image:
    factor = max(1, PREVIEW_SIDE // max(image.size))
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST) if factor > 1 else image


async def render(studio: Studio, photos: Sequence[Photo], settings: Settings, gates: Sequence[float],
                 progress: gr.Progress | None = None, one_at_a_time: bool = False
                 ) -> AsyncIterator[Preview | list[Result]]:
    """Yield a Preview per step, then the list of saved Results (one per γ). `one_at_a_time` renders the γ
    values as separate batches of one (less device memory; the low-VRAM option)."""
    if not photos:
        raise gr.Error("add at least one photo of the subject first (drop, paste or upload it in the Subject panel)")
    if not settings.prompt:
        raise gr.Error("the prompt is empty; describe what to make of the subject")
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
        request = make_request(references, weights, settings, batch)
        try:
            async for event in stream_render(studio.engine, request):
                if isinstance(event, Step):
                    yield Preview(event.step, event.total, [_upscale(image) for image in event.previews], batch)
                elif isinstance(event, Done):
                    results.extend(_save(studio, settings, subject, event))
        except ValueError as error:
            raise gr.Error(str(error)) from None
        except RenderCancelled:
            logger.info("render cancelled")
            return
    for warning in dict.fromkeys(w for result in results for w in result.warnings):  # each once, in order
        gr.Warning(warning)
    yield results


def _save(studio: Studio, settings: Settings, subject: str, done: Done) -> list[Result]:
    saved = []
    for rendered in done.results:
        gate = rendered.parameters.get("gate", settings.gate)
        parameters = {**settings.as_core_parameters(), **rendered.parameters}
        path = save_result(rendered.image, parameters, studio.results_folder)
        used = Settings.from_parameters(parameters, fallback=settings.with_gate(gate))
        saved.append(Result(path=path, settings=used, identity=rendered.identity, subject=subject,
                            parameters=parameters, warnings=rendered.warnings))
    return saved
