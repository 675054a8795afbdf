"""Uploaded files: subject photos validated by the core before any pixel is decoded, and the settings read
back from a dropped FlexIP PNG (its `parameters` text chunk, read from the header without decoding)."""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from flexip_core.generation.images import DEFAULT_LIMITS, is_flat, load_reference_image, square_view
from flexip_core.generation.metadata import parse_parameters

from .state import Photo

logger = logging.getLogger(__name__)

ENCODER_VIEW = 224  # side of the square crop shown as "what the encoders see"


@dataclass(frozen=True)
class Rejected:
    name: str  # file name as uploaded
    reason: str  # the validator's message (already names the file)


def file_name(path: str | Path) -> str:
    return Path(path).name


def accept_photos(paths: list[str], folder: Path) -> tuple[list[Photo], list[Rejected]]:
    """Validate each uploaded file; save the accepted ones (RGB PNG plus encoder view) under `folder`."""
    accepted, rejected = [], []
    for path in paths or []:
        name = file_name(path)
        try:
            image = load_reference_image(path, name=name)
        except ValueError as error:
            logger.info("rejected upload %s: %s", name, error)
            rejected.append(Rejected(name, str(error)))
            continue
        accepted.append(store_photo(image, name, folder))
    return accepted, rejected


def store_photo(image: Image.Image, name: str, folder: Path) -> Photo:
    """Save a validated RGB photo and its encoder view under content-addressed names."""
    digest = hashlib.sha1(image.tobytes() + repr(image.size).encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    path, view = folder / f"photo-{digest}.png", folder / f"photo-{digest}-view.png"
    if path.exists() and view.exists():
        path.touch()  # in use again: not old enough to prune
        view.touch()
    else:
        image.save(path)
        square_view(image, ENCODER_VIEW).save(view)
    return Photo(name=name, path=str(path), view=str(view), digest=digest, flat=is_flat(image))


def open_photo(photo: Photo) -> Image.Image:
    """Re-open a stored photo (already validated and converted to RGB when it was accepted)."""
    try:
        with Image.open(photo.path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise ValueError(f"{photo.name}: this photo has expired from the server; remove it and add it again") from None


def read_png_parameters(path: str) -> dict:
    """The `parameters` chunk of a PNG as a dict; ValueError naming the file when there is none."""
    name = file_name(path)
    size = Path(path).stat().st_size
    if size == 0:
        raise ValueError(f"{name}: file is empty")
    if size > DEFAULT_LIMITS.max_bytes:
        raise ValueError(f"{name}: file is {size / 2**20:.1f} MiB; the largest accepted is "
                         f"{DEFAULT_LIMITS.max_bytes / 2**20:.0f} MiB")
    try:
        with Image.open(path) as image:  # reads the header and the text chunks before IDAT; no pixel decoding
            if image.format != "PNG":
                raise ValueError(f"{name}: settings can only be restored from a PNG saved by FlexIP Studio")
            text = image.info.get("parameters")
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(f"{name}: not a readable PNG ({error})") from None
    if not text:
        raise ValueError(f"{name}: this PNG carries no FlexIP settings (no 'parameters' text chunk)")
    return parse_parameters(text)
