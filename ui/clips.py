"""The Animate mode's own pieces: its settings (frames, fps) read and checked, a render's frames written as a clip,
and the row of clips the γ sweep plays side by side. Torch-free; the clip is written by the core's video module
(MP4 through imageio-ffmpeg, else animated WebP), its settings in the file's metadata."""
from __future__ import annotations

import html
import itertools
import logging
from collections.abc import Sequence
from pathlib import Path

from flexip_core.generation.task_inputs import TaskInputs
from flexip_core.generation.video import video_formats, write_video

logger = logging.getLogger(__name__)

ANIMATE = "animate"  # the mode, and the core task that runs it
MIN_FRAMES, MAX_FRAMES = 8, 32  # frames per clip the studio renders (AnimateDiff's motion modules cover up to 32)
MIN_FPS, MAX_FPS = 1, 30  # frames per second a clip plays at
DEFAULT_FRAMES, DEFAULT_FPS = 16, 8  # as the animate profiles suggest
_NAMES = itertools.count()  # file numbers of clips written before the gallery takes them


def clip_task(frames: int, fps: int, height: int, width: int) -> TaskInputs:
    """The Animate mode's inputs, `frames` and `fps` already read (MIN_FRAMES to MAX_FRAMES, MIN_FPS to MAX_FPS).
    The clip renders at the generation's size (the memory check is the core's, against the card)."""
    return TaskInputs(ANIMATE, ANIMATE, {}, height, width, {"mode": ANIMATE, "frames": frames, "fps": fps})


def write_clip(frames: Sequence, folder: Path, parameters: dict, fps: int) -> Path:
    """The frames as a clip in `folder` (MP4 when an encoder is installed, else animated WebP), the settings in its
    metadata; its path."""
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".mp4" if "mp4" in video_formats() else ".webp"
    path = folder / f"clip-{next(_NAMES):06d}-g{parameters.get('gate', 0):.2f}{suffix}"
    return write_video(list(frames), path, parameters, fps=fps)


def clip_url(path: str) -> str:
    """Where the page fetches a file the studio serves (the gallery's images folder is an allowed path)."""
    return f"/gradio_api/file={html.escape(path, quote=True)}"


def clips_row(tiles: Sequence[tuple[str, str]]) -> str:
    """The γ sweep's clips side by side, each looping, muted and in step: (clip path, caption) per tile."""
    if not tiles:
        return '<div class="clips-row empty">Run a sweep in the Animate mode: its clips play here side by side.</div>'
    cells = "".join(
        f'<figure><video src="{clip_url(path)}" autoplay loop muted playsinline></video>'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>" for path, caption in tiles)
    return f'<div class="clips-row">{cells}</div>'
