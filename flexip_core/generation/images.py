"""Reference-photo loading and validation: every check runs before pixels are decoded."""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 25 * 1024 * 1024  # largest accepted file, in bytes
    max_pixels: int = 40_000_000  # width * height above this is refused (decompression bombs)
    max_side: int = 8192  # largest accepted width or height, in pixels
    min_side: int = 8  # smallest accepted width or height, in pixels


DEFAULT_LIMITS = ImageLimits()
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF", "MPO")


def _describe(source, name: str | None) -> str:
    if name:
        return name
    if isinstance(source, (str, Path)):
        return Path(source).name
    return "uploaded image"


def _read_bytes(source, label: str, limits: ImageLimits) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"{label}: file not found ({path})")
        size = path.stat().st_size
        if size > limits.max_bytes:
            raise ValueError(
                f"{label}: file is {size / 2**20:.1f} MiB; the largest accepted is {limits.max_bytes / 2**20:.0f} MiB"
            )
        data = path.read_bytes()
    if not data:
        raise ValueError(f"{label}: file is empty; upload a PNG, JPEG or WebP photo")
    if len(data) > limits.max_bytes:
        raise ValueError(
            f"{label}: file is {len(data) / 2**20:.1f} MiB; the largest accepted is {limits.max_bytes / 2**20:.0f} MiB"
        )
    head = data[:256].lstrip().lower()
    if head.startswith(b"<?xml") or head.startswith(b"<svg") or b"<svg" in head:
        raise ValueError(f"{label}: SVG (vector) images are not accepted; export it as PNG first")
    return data


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode (RGBA, LA, P, I;16, I, F, CMYK, L, 1) to RGB; alpha is composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        array = np.clip(array / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    return image.convert("RGB")


def load_reference_image(source, name: str | None = None, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """Open a reference photo (path or bytes), validate it, apply EXIF orientation and return it as RGB."""
    return to_rgb(open_image(source, name, limits))


def open_image(source, name: str | None = None, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """What load_reference_image returns before the RGB conversion: validated and EXIF-oriented, in its own mode
    (for callers that read the alpha channel, such as masks)."""
    if isinstance(source, Image.Image):
        _check_dimensions(source.size, name or "reference image", limits)
        return ImageOps.exif_transpose(source) or source
    label = _describe(source, name)
    data = _read_bytes(source, label, limits)
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        accepted = ", ".join(ACCEPTED_FORMATS)
        raise ValueError(f"{label}: not an image PIL can read; accepted formats: {accepted}") from None
    except Image.DecompressionBombError:
        raise ValueError(f"{label}: pixel count is far over the limit (decompression bomb); refused") from None
    except (OSError, SyntaxError) as error:  # a header cut short ("Truncated File Read")
        raise ValueError(f"{label}: image data is truncated or corrupt ({error})") from None
    if image.format not in ACCEPTED_FORMATS:
        raise ValueError(f"{label}: format {image.format} is not accepted; use one of {', '.join(ACCEPTED_FORMATS)}")
    if getattr(image, "n_frames", 1) > 1 and image.format != "MPO":
        raise ValueError(f"{label}: animated images are not accepted; upload a single still frame")
    _check_dimensions(image.size, label, limits)  # header only: no pixel has been decoded yet
    try:
        image.load()
    except (OSError, SyntaxError) as error:
        raise ValueError(f"{label}: image data is truncated or corrupt ({error})") from None
    return ImageOps.exif_transpose(image) or image


def _check_dimensions(size: tuple[int, int], label: str, limits: ImageLimits) -> None:
    width, height = size
    if width * height > limits.max_pixels or max(width, height) > limits.max_side:
        raise ValueError(
            f"{label}: image is {width}x{height}; the largest accepted is {limits.max_side} px per side "
            f"and {limits.max_pixels / 1e6:.0f} megapixels"
        )
    if min(width, height) < limits.min_side:
        raise ValueError(f"{label}: image is {width}x{height}; the smallest accepted is {limits.min_side} px per side")


def prepare_image(image: Image.Image, name: str | None = None, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """Validate an already-open PIL image, apply its EXIF orientation and convert it to RGB."""
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL image, got {type(image).__name__}")
    label = name or "reference image"
    _check_dimensions(image.size, label, limits)
    image = ImageOps.exif_transpose(image) or image
    return to_rgb(image)


def is_flat(image: Image.Image, spread: float = 2.0) -> bool:
    """Whether the photo is one flat colour (every channel's standard deviation under `spread` levels): a blank
    or fully transparent file, with no subject in it to keep. Accepted, but worth a warning."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32).reshape(-1, 3)
    return bool(pixels.std(axis=0).max() < spread)


def flat_photo_note(name: str) -> str:
    """What the user is told about a photo for which is_flat holds."""
    return f"{name}: the photo is one flat colour, so it shows no subject to keep"


def square_view(image: Image.Image, size: int, aspect: str = "crop") -> Image.Image:
    """What an encoder sees: resize the short side to `size` and centre-crop, or pad the long side ("pad")."""
    if aspect not in ("crop", "pad"):
        raise ValueError(f"aspect must be 'crop' or 'pad', got {aspect!r}")
    width, height = image.size
    if aspect == "pad":
        side = max(width, height)
        canvas = Image.new("RGB", (side, side), (255, 255, 255))
        canvas.paste(image, ((side - width) // 2, (side - height) // 2))
        return canvas.resize((size, size), Image.BICUBIC)
    scale = size / min(width, height)
    resized = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BICUBIC)
    left = (resized.width - size) // 2
    top = (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))
