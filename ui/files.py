"""Files the studio writes: each result as a PNG carrying its `parameters` chunk, sweeps and grids as a zip, the
pruning of old ones, and the example subjects' photos, toys drawn by the project's own toy world (toyworld.world).
`python -m ui.files` (re)renders the examples into assets/examples/."""
from __future__ import annotations

import logging
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

logger = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "examples"
EXAMPLE_SIDE = 256  # rendered size of an example photo, px


def zip_results(paths: list[str], folder: Path, stem: str = "flexip-sweep") -> str:
    """Bundle result PNGs (chunks intact) into one zip; returns its path."""
    if not paths:
        raise ValueError("nothing to download yet; run a sweep or a grid first")
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{stem}-{uuid.uuid4().hex[:8]}.zip"
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED) as archive:  # PNGs are compressed already
        for index, path in enumerate(paths):
            archive.write(path, arcname=f"{index:02d}-{Path(path).name}")
    return str(target)


def prune(folder: Path, max_age_s: float) -> int:
    """Delete files under `folder` older than `max_age_s` seconds (Gradio's cache forgets its copies as fast)."""
    cutoff = time.time() - max_age_s
    removed = 0
    for path in folder.rglob("*"):
        if path.is_file() and path.stat().st_mtime < cutoff:
            path.unlink(missing_ok=True)
            removed += 1
    if removed:
        logger.info("removed %d files older than %.0f h from %s", removed, max_age_s / 3600, folder)
    return removed


# --- example subjects, for a first click ---------------------------------------------------------------
@dataclass(frozen=True)
class Example:
    name: str  # file stem in assets/examples
    label: str  # button text
    subject: tuple[str, str, str]  # toy-world identity: shape, colour, pattern
    prompt: str  # a scene the subject is not shown in, so the slider's two ends differ


EXAMPLES = (
    Example("red-striped-star", "Red star", ("star", "red", "stripes"),
            "a small, squashed toy on the left, on a sky background, shadowed style"),
    Example("yellow-dotted-circle", "Yellow circle", ("circle", "yellow", "dots"),
            "a large, stretched toy on the right, on a gray background, outlined style"),
    Example("blue-checkered-square", "Blue square", ("square", "blue", "checker"),
            "a small, upright toy on the right, on a sand background, flat style"),
)


def example_path(example: Example, folder: Path = EXAMPLES_DIR) -> Path:
    return folder / f"{example.name}.png"


def render_example(example: Example) -> Image.Image:
    """The example's reference photo: the subject alone, large and centred on the neutral background."""
    from toyworld import world

    scene = world.Scene(world.NEUTRAL_BACKGROUND, "large", "center", "upright", "flat")
    return world.render(world.Subject(*example.subject), scene, size=EXAMPLE_SIDE)


def ensure_examples(folder: Path = EXAMPLES_DIR) -> list[Path]:
    """Render any example image missing from `folder`; returns all example paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for example in EXAMPLES:
        path = example_path(example, folder)
        if not path.exists():
            render_example(example).save(path)
            logger.info("rendered example %s", path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    for stale in EXAMPLES_DIR.glob("*.png"):
        stale.unlink()
    ensure_examples()
