"""What every handler shares (the engine and the output folder) and the helpers around the engine's load."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from .engine import Engine
from .state import MAX_PHOTOS

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Studio:
    engine: Engine  # shared by all users; never mutated per request
    folder: Path  # where the app writes validated photos and results (the only files it serves back)
    max_photos: int = MAX_PHOTOS  # subject photos per session

    @property
    def photos_folder(self) -> Path:
        return self.folder / "photos"

    @property
    def results_folder(self) -> Path:
        return self.folder / "results"


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


def engine_status(studio: Studio) -> str:
    """The header: profile and model state, then what the profile's models are (the offline `mini` draws toys)."""
    if studio.engine.ready():
        state = "ready"
    elif studio.engine.failure():
        state = f"could not be loaded: {studio.engine.failure()}"
    else:
        state = "loading… (the first run waits for it)"
    line = f"**FlexIP Studio** · profile `{studio.engine.profile}` · models {state}"
    about = studio.engine.description()
    return f"{line} · *{about}*" if about else line
