"""Example subjects for a first click: toys rendered by the project's own toy world (toyworld.world), each
with a prompt in that world's vocabulary. `python -m ui.examples` (re)renders them into assets/examples/."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "examples"
SIDE = 256  # rendered size of an example photo, px


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


def render_example(example: Example):
    """The example's reference photo: the subject alone, large and centred on the neutral background."""
    from flexip_core import toyworld

    scene = toyworld.Scene(toyworld.NEUTRAL_BACKGROUND, "large", "center", "upright", "flat")
    return toyworld.render(toyworld.Subject(*example.subject), scene, size=SIDE)


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
