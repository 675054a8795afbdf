"""Attribute oracle for the FlexIP-mini toy world: reads identity and edits back from an image by measurement."""

from __future__ import annotations

import logging

import numpy as np
from PIL import Image

from toyworld import world as tw

logger = logging.getLogger(__name__)

BODY_DISTANCE = (20.0, 40.0)  # range of the min RGB distance of a body pixel from the backdrop-ink segment
NOISE_MARGIN = 4.0  # that distance, in backdrop noise standard deviations, clipped to the range above
MIN_BODY = 6  # fewer body pixels than this: no subject found
MASK_FRINGE = 0.6  # px by which the body mask overreaches the drawn edge (blurred edges pass the threshold)
PLAIN_CONTRAST = 0.19  # max 95th-percentile relative darkness of a plain body
STRIPE_COHERENCE = 0.55  # min structure-tensor coherence of a striped body
DOT_FRACTION = 0.42  # max fraction of dark pixels in a dotted (rather than checkered) body
OUTLINE_INK = 0.2  # min ink fraction of the upper-left halo for an outline
SHADOW_INK = 0.15  # min ink fraction of the lower-right halo for a drop shadow
TOY_MATCH = 20.0  # max mean |difference| (of 255) between an image and the toy re-drawn from what is read in it:
#   renders 0.2-1.6, FlexIP-mini's own outputs 8-29, DreamBench photos 28-83 (64 px)
NOT_A_TOY = ("the subject photo is not a toy of the mini's world (FlexIP-mini draws only its own toys), so it has no "
             "identity score; for photos of your own subjects use real weights (docs/real-weights.md)")

def _hue(rgb: np.ndarray) -> np.ndarray:
    """Hue in degrees of (..., 3) RGB values."""
    r, g, b = np.moveaxis(rgb.astype(np.float64), -1, 0)
    hi, lo = rgb.max(-1), rgb.min(-1)
    delta = np.maximum(hi - lo, 1e-6)
    hue = np.where(hi == r, (g - b) / delta, np.where(hi == g, 2 + (b - r) / delta, 4 + (r - g) / delta))
    return np.mod(hue * 60.0, 360.0)


_HUES = {name: float(_hue(np.array(rgb, np.float64))) for name, rgb in tw.COLOURS.items()}  # palette, degrees


def _nearest(value: float, table: dict[str, float]) -> str:
    return min(table, key=lambda name: abs(table[name] - value))


def _neighbours(mask: np.ndarray) -> np.ndarray:
    """Number of set pixels among the 8 neighbours of each pixel."""
    padded = np.pad(mask, 1).astype(np.int32)
    h, w = mask.shape
    return sum(padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)) - mask


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    return ~tw.dilate(~mask, radius)


def _colour(rgb: np.ndarray, core: np.ndarray) -> str:
    """Palette colour nearest to the chroma-weighted circular mean hue of the body."""
    pixels = rgb[core]
    weight = pixels.max(-1) - pixels.min(-1)
    angle = np.deg2rad(_hue(pixels))
    mean = np.rad2deg(np.arctan2((weight * np.sin(angle)).sum(), (weight * np.cos(angle)).sum()))
    return min(_HUES, key=lambda name: abs((_HUES[name] - mean + 180.0) % 360.0 - 180.0))


def _pattern_features(rgb: np.ndarray, core: np.ndarray) -> tuple[float, float, float]:
    """(contrast, coherence, dark fraction) of the body's relative darkness; none depends on pattern phase."""
    value = rgb.max(-1)
    darkness = np.clip(1.0 - value / max(np.percentile(value[core], 95), 1.0), 0.0, 1.0)
    inside = darkness[core]
    contrast = float(np.percentile(inside, 95))
    gy, gx = np.gradient(darkness)
    jxx, jyy, jxy = (gx * gx)[core].sum(), (gy * gy)[core].sum(), (gx * gy)[core].sum()
    coherence = float(np.sqrt((jxx - jyy) ** 2 + 4 * jxy**2) / max(jxx + jyy, 1e-9))  # 1 = one orientation
    return contrast, coherence, float(np.mean(inside > 0.5 * contrast))


def _pattern(rgb: np.ndarray, core: np.ndarray) -> str:
    """Plain (no contrast), stripes (one orientation), dots (sparse dark) or checker (half dark)."""
    contrast, coherence, dark_fraction = _pattern_features(rgb, core)
    if contrast < PLAIN_CONTRAST:
        return "plain"
    if coherence > STRIPE_COHERENCE:
        return "stripes"
    return "dots" if dark_fraction < DOT_FRACTION else "checker"


def _style(ink: np.ndarray, body: np.ndarray, cx: float, cy: float, size: int) -> str:
    """Flat / outlined / shadowed from ink in a halo around the body: all round, lower-right only, or none."""
    halo = tw.dilate(body, max(2, round(tw.OUTLINE_WIDTH * size))) & ~body
    ys, xs = np.mgrid[: body.shape[0], : body.shape[1]] + 0.5
    lower_right = (xs - cx) + (ys - cy) > 0
    upper_left_ink = ink[halo & ~lower_right].mean() if (halo & ~lower_right).any() else 0.0
    lower_right_ink = ink[halo & lower_right].mean() if (halo & lower_right).any() else 0.0
    if upper_left_ink > OUTLINE_INK:
        return "outlined"
    return "shadowed" if lower_right_ink > SHADOW_INK else "flat"


def _segment(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backdrop colour, body mask and ink mask (outline or shadow) of an RGB array.

    Backdrop-ink mixtures (outline, shadow and their anti-aliased fringes) lie on the RGB segment between the two
    colours; body pixels, bright or patterned, are saturated and lie far from it.
    """
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])  # (4 * size, 3)
    backdrop = np.median(border, axis=0)
    ink_colour = np.array(tw.INK, np.float64)
    axis = backdrop - ink_colour
    t = np.clip((rgb - ink_colour) @ axis / max(axis @ axis, 1e-9), 0.0, 1.0)  # (size, size), 0 = ink, 1 = backdrop
    off_axis = np.linalg.norm(rgb - ink_colour - t[..., None] * axis, axis=-1)  # (size, size)
    edge = np.concatenate([off_axis[0], off_axis[-1], off_axis[:, 0], off_axis[:, -1]])
    noise = np.median(edge) / 1.1774  # the median of a 2-D Rayleigh distribution is 1.1774 sigma
    body = off_axis > np.clip(NOISE_MARGIN * noise, *BODY_DISTANCE)
    body &= _neighbours(body) >= 2  # drop isolated noise specks
    return backdrop, body, ~body & (t < 0.5)


def _fit_shape(body: np.ndarray, centre: tuple[float, float], stretch_x: float) -> tuple[str, float]:
    """Analysis by synthesis: the shape whose template of equal area and stretch overlaps the body best."""
    fits = []
    for shape in tw.SHAPES:
        radius = float(np.sqrt(body.sum() / tw.shape_area(shape)))
        template = tw.shape_coverage(shape, body.shape[0], centre, radius, (stretch_x, 1 / stretch_x)) > 0.5
        fits.append(((template & body).sum() / max((template | body).sum(), 1), shape, radius))
    _, shape, radius = max(fits)
    return shape, radius


def read_attributes(image: Image.Image) -> dict[str, str | None]:
    """All identity and editable attributes of a toy-world image; None where no subject is found."""
    if image.width != image.height:
        raise ValueError(f"image is {image.width}x{image.height}; the toy world is square, resize or crop it first")
    image = image.convert("RGB")
    if image.width != tw.NATIVE_SIZE:  # measure at one resolution so that every threshold holds at any size
        resample = Image.BOX if image.width > tw.NATIVE_SIZE else Image.BICUBIC
        image = image.resize((tw.NATIVE_SIZE, tw.NATIVE_SIZE), resample)
    rgb = np.asarray(image, np.float64)  # (size, size, 3)
    size = rgb.shape[0]
    found: dict[str, str | None] = {name: None for name in (*tw.IDENTITY_ATTRIBUTES, *tw.EDITABLE_ATTRIBUTES)}
    # 1. Segment backdrop, body and ink.
    backdrop, body, ink = _segment(rgb)
    found["background"] = min(tw.BACKGROUNDS, key=lambda name: np.linalg.norm(tw.BACKGROUNDS[name] - backdrop))
    if body.sum() < MIN_BODY:
        logger.debug("no subject found in a %d px image", size)
        return found
    # 2. Moments: the centroid gives position, the variance ratio pose.
    ys, xs = np.nonzero(body)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    log_ratio = np.log(max(xs.var(), 1e-3) / max(ys.var(), 1e-3))  # = 4 log(stretch) for isotropic shapes
    found["position"] = _nearest(cx / size, tw.POSITIONS)
    found["pose"] = _nearest(log_ratio, {name: 4 * np.log(stretch) for name, stretch in tw.POSES.items()})
    # 3. Shape by template fit; its area then gives the scale.
    found["shape"], radius = _fit_shape(body, (cx, cy), float(np.exp(log_ratio / 4)))
    scale = (radius - MASK_FRINGE) / size
    found["scale"] = _nearest(np.log(scale), {name: np.log(r) for name, r in tw.SCALES.items()})
    # 4. Surface, measured away from edges where blur mixes in backdrop or ink: hue, texture, ink around the body.
    core = _erode(body, 1) & ~tw.dilate(ink, 2)
    core = core if core.sum() >= 12 else _erode(body, 1)
    core = core if core.sum() >= 12 else body
    found["colour"] = _colour(rgb, core)
    found["pattern"] = _pattern(rgb, core)
    found["style"] = _style(ink, body, cx, cy, size)
    return found


def identity_matches(found: dict[str, str | None], subject: tw.Subject) -> dict[str, bool]:
    """Which of the subject's identity attributes the attributes `found` in an image (read_attributes) match."""
    return {name: found[name] == getattr(subject, name) for name in tw.IDENTITY_ATTRIBUTES}


def identity_score(image: Image.Image, subject: tw.Subject) -> float:
    """Fraction of the subject's identity attributes (shape, colour, pattern) found in the image."""
    return float(np.mean(list(identity_matches(read_attributes(image), subject).values())))


def read_toy(image: Image.Image) -> tw.Subject | None:
    """The identity of the toy in a toy-world image (its centre square, as the encoders see it), or None when it
    is not one: no subject found, or the toy re-drawn from every attribute read differs from it (a photo, say)."""
    from flexip_core.generation.images import square_view

    small = square_view(image, 4 * tw.NATIVE_SIZE, "crop").convert("RGB").resize((tw.NATIVE_SIZE,) * 2, Image.BOX)
    found = read_attributes(small)
    if found["shape"] is None:
        return None
    subject = tw.Subject(**{name: found[name] for name in tw.IDENTITY_ATTRIBUTES})
    scene = tw.Scene(**{name: found[name] for name in tw.EDITABLE_ATTRIBUTES})
    redrawn = np.asarray(tw.render(subject, scene), np.float64)
    return subject if np.abs(redrawn - np.asarray(small, np.float64)).mean() <= TOY_MATCH else None


def identity_kept(images: list[Image.Image], reference: Image.Image) -> list[float | None]:
    """For each image, the share of the identity attributes of the toy in `reference` (read_toy) that are found
    again; None for all when the reference is not a toy-world image."""
    subject = read_toy(reference)
    return [None if subject is None else identity_score(image, subject) for image in images]


def prompt_score(image: Image.Image, requested: dict[str, str]) -> float:
    """Fraction of requested attributes (e.g. parse_prompt(prompt): editable ones, and a colour) found in the
    image."""
    allowed = tw.REQUESTABLE_ATTRIBUTES
    if not requested:
        raise ValueError("no attributes requested; pass e.g. parse_prompt(prompt) of a prompt naming some")
    for name, value in requested.items():
        if name not in allowed:
            raise ValueError(f"{name!r} is not an attribute a prompt can ask for; use {', '.join(allowed)}")
        if value not in allowed[name]:
            raise ValueError(f"{name}={value!r} is unknown; choose one of {', '.join(allowed[name])}")
    return prompt_fraction(read_attributes(image), requested)


def prompt_fraction(found: dict[str, str | None], requested: dict[str, str]) -> float:
    """Fraction of the requested attributes among the attributes `found` in an image (read_attributes)."""
    return float(np.mean([found[name] == value for name, value in requested.items()]))
