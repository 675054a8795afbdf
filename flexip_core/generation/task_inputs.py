"""The studio's task modes (start image, inpaint, control): what a user gives, read, checked and turned into the
images and scalars FlexIPPipeline passes to diffusers through `pipeline_kwargs`.

Torch-free; the control mode's edge map is Canny's detector (J. Canny, "A Computational Approach to Edge
Detection", IEEE TPAMI 1986) in numpy, on OpenCV's gradient scale (3x3 Sobel, |gx| + |gy|), so the thresholds
mean what they mean in `cv2.Canny`, which diffusers' ControlNet examples use.
"""
from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from flexip_core.generation.images import open_image, to_rgb
from flexip_core.generation.settings import MAX_SIDE, check_whole

logger = logging.getLogger(__name__)

MODES = {"start_image": "image-to-image", "inpaint": "inpainting", "control": "controlnet"}  # mode -> core task
CONTROL_KINDS = ("canny",)  # the control images the studio computes itself
INPUT_NAMES = {"start_image": "start image", "inpaint": "scene", "control": "control image"}  # what errors call it
DEFAULT_DENOISE = 0.6  # share of the start image repainted when none is given
DEFAULT_CONTROL_SCALE = 1.0  # diffusers' own default controlnet_conditioning_scale
MASK_THRESHOLD = 128  # grey levels at or above this are "paint the subject here"
ACCEPTED = "a PIL image, a uint8 array (HxW, HxWx3 or HxWx4), a file path or an ImageEditor value"


@dataclass(frozen=True)
class TaskInputs:
    """One task mode's checked inputs, ready for `FlexIPPipeline.for_task(task)(..., pipeline_kwargs=...)`."""

    mode: str  # the studio's mode: one of MODES
    task: str  # the core task that runs it (MODES[mode], one of settings.TASKS)
    pipeline_kwargs: dict  # images and scalars passed unchanged to the diffusers pipeline
    height: int | None  # output height; None for image-to-image (diffusers takes the size from the image)
    width: int | None  # output width; None for image-to-image
    settings: dict  # the mode's scalar settings, for the PNG parameters and restoring ({"mode": ..., ...})
    notes: tuple[str, ...] = ()  # what was changed on the way (resizes, whole-scene masks), for gr.Warning
    shown: Image.Image | None = None  # what the studio shows beside the result (the edge map), or None


# --- reading images -------------------------------------------------------------------------------------------
def _is_editor(value) -> bool:
    return isinstance(value, dict) and bool({"background", "layers", "composite"} & set(value))


def _array_image(array: np.ndarray, name: str) -> Image.Image:
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.dtype != np.uint8:
        raise ValueError(f"{name}: the array holds {array.dtype} values; give uint8 pixels (0-255)")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(f"{name}: an array of shape {array.shape} is not an image; give HxW, HxWx3 or HxWx4 pixels")
    return Image.fromarray(np.ascontiguousarray(array))


def _open(value, name: str) -> Image.Image:
    """`value` as a validated, EXIF-oriented PIL image in its own mode (alpha kept), or a ValueError naming it."""
    if value is None:
        raise ValueError(f"{name}: no image given")
    if isinstance(value, np.ndarray):
        value = _array_image(value, name)
    if isinstance(value, Image.Image):
        try:
            image = open_image(value, name)  # sizes are checked before a lazily opened file decodes
            image.load()
        except (OSError, SyntaxError) as error:
            raise ValueError(f"{name}: image data is truncated or corrupt ({error})") from None
        return image
    if isinstance(value, (str, Path, bytes, bytearray)):
        return open_image(value, name)
    raise ValueError(f"{name}: expected {ACCEPTED}; got {type(value).__name__}")


def read_image(value, name: str) -> Image.Image:
    """The picture a user gave, checked and as RGB (alpha composited on white).

    Args:
        value: a PIL image; a uint8 array (HxW, HxWx3 or HxWx4); a path to an image file; or a Gradio ImageEditor
            value, of which the background (the picture without the strokes painted on it) is read, or the
            composite when there is no background.
        name: what the user calls this input; every error starts with it.
    """
    if _is_editor(value):
        value = value.get("background") if value.get("background") is not None else value.get("composite")
    return to_rgb(_open(value, name))


# --- masks ----------------------------------------------------------------------------------------------------
def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info)


def _mask_pixels(image: Image.Image) -> np.ndarray:
    """(H, W) bool: white (>= MASK_THRESHOLD) pixels; on a transparent canvas, painted (non-transparent) ones too."""
    if not _has_alpha(image):
        return np.asarray(to_rgb(image).convert("L")) >= MASK_THRESHOLD
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)  # (H, W, 4)
    alpha = rgba[..., 3]
    luminance = (rgba[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)) * (alpha / 255.0)
    if not (alpha == 0).any():  # an opaque image: its alpha says nothing about where to paint
        return luminance >= MASK_THRESHOLD
    return np.maximum(luminance, alpha) >= MASK_THRESHOLD


def _stroke_pixels(layer: Image.Image) -> np.ndarray:
    """(H, W) bool: an ImageEditor layer's strokes, in any colour: its non-transparent pixels (non-black ones when
    the editor dropped the alpha channel, image_mode="RGB")."""
    if _has_alpha(layer):
        return np.asarray(layer.convert("RGBA"))[..., 3] > 0
    return np.asarray(to_rgb(layer)).max(axis=2) > 0


def _editor_mask(value: dict, name: str) -> np.ndarray:
    layers = [layer for layer in value.get("layers") or [] if layer is not None]
    if not layers:
        raise ValueError(f"{name}: the mask is empty; paint (white) where the subject goes")
    background = value.get("background")
    size = _open(background, f"{name} background").size if background is not None else None
    painted = None
    for index, layer in enumerate(layers, start=1):
        image = _open(layer, f"{name} layer {index}")
        size = size or image.size
        if image.size != size:
            image = image.resize(size, Image.NEAREST)
        strokes = _stroke_pixels(image)  # (H, W)
        painted = strokes if painted is None else painted | strokes
    return painted


def read_mask(value, scene: Image.Image, name: str = "mask") -> tuple[Image.Image, str | None]:
    """Where the subject goes in `scene`, as a mode "L" image of 0 and 255 at the scene's size, and a note for the
    user (or None).

    Args:
        value: an image (white = where the subject goes; grey is thresholded at 128; on a transparent canvas,
            painted pixels of any colour count as white), or a Gradio ImageEditor value whose layers' painted
            (non-transparent) pixels, in any colour, are the mask.
        scene: the picture the mask belongs to; a mask of another size is resized to it (nearest), with a note.
        name: what the user calls this input; every error starts with it.
    """
    if value is None:
        raise ValueError(f"{name}: no mask given; paint (white) where the subject goes")
    if not isinstance(scene, Image.Image):
        raise ValueError(f"{name}: the scene must be a PIL image, got {type(scene).__name__}")
    painted = _editor_mask(value, name) if _is_editor(value) else _mask_pixels(_open(value, name))  # (H, W)
    if not painted.any():
        raise ValueError(f"{name}: the mask is empty; paint (white) where the subject goes")
    mask = Image.fromarray(painted.astype(np.uint8) * 255, mode="L")
    notes = []
    if mask.size != scene.size:
        notes.append(f"{name}: the mask is {_size(mask)} but the scene is {_size(scene)}; it was resized to the scene")
        mask = mask.resize(scene.size, Image.NEAREST)
        _check_not_vanished(mask, name)
    if np.asarray(mask).min() == 255:
        notes.append(f"{name}: the mask covers the whole scene, so the whole scene is repainted")
    return mask, "; ".join(notes) or None


def _check_not_vanished(mask: Image.Image, name: str) -> None:
    if not np.asarray(mask).any():
        raise ValueError(f"{name}: the painted area is too thin to survive resizing to {_size(mask)}; paint a "
                         "larger area")


def _size(image: Image.Image) -> str:
    return f"{image.width}×{image.height}"


# --- size -----------------------------------------------------------------------------------------------------
def fit_size(image: Image.Image, side: int, max_side: int, *,
             label: str = "the image") -> tuple[Image.Image, str | None]:
    """`image` scaled so that its longer side is `side` (at most `max_side`), both sides multiples of 8 (at least
    64), the aspect ratio kept as near as that allows; and a note when the size changed ("the scene was resized
    from 1024×768 to 512×384"), naming the picture by `label`."""
    if not isinstance(image, Image.Image):
        raise ValueError(f"{label}: expected a PIL image, got {type(image).__name__}")
    max_side = check_whole(max_side, "max_side", 64, MAX_SIDE)
    side = check_whole(side, "side", 64, MAX_SIDE)
    longest = min(side, max_side) // 8 * 8
    width, height = image.size
    scale = longest / max(width, height)
    shorter = lambda length: min(longest, max(64, round(length * scale / 8) * 8))  # noqa: E731
    size = (longest, shorter(height)) if width >= height else (shorter(width), longest)
    if size == image.size:
        return image, None
    resized = image.resize(size, Image.LANCZOS)
    return resized, f"{label} was resized from {_size(image)} to {_size(resized)}"


# --- control images -------------------------------------------------------------------------------------------
def _correlate(array: np.ndarray, taps, axis: int) -> np.ndarray:
    """`array` correlated with the 1-D `taps` along `axis`, borders reflected (OpenCV's BORDER_REFLECT_101)."""
    radius = len(taps) // 2
    pad = [(0, 0), (0, 0)]
    pad[axis] = (radius, radius)
    padded = np.pad(array, pad, mode="reflect")
    length = array.shape[axis]
    out = np.zeros_like(array)
    for offset, weight in enumerate(taps):
        if weight:
            out += weight * (padded[offset:offset + length] if axis == 0 else padded[:, offset:offset + length])
    return out


def _hysteresis(strong: np.ndarray, weak: np.ndarray) -> np.ndarray:
    """The weak pixels 8-connected (through weak pixels) to a strong one: connected components of the weak pixels
    by hooking and pointer jumping (Shiloach and Vishkin), on the weak pixels only."""
    height, width = weak.shape
    grid = np.full((height + 2, width + 2), -1, dtype=np.int64)  # index of each weak pixel; -1 elsewhere and around
    rows, cols = np.nonzero(weak)
    count = rows.size
    if count == 0:
        return weak
    grid[rows + 1, cols + 1] = np.arange(count)
    pairs = []
    for dr, dc in ((0, 1), (1, -1), (1, 0), (1, 1)):  # half the 8 neighbours: each link once
        other = grid[rows + 1 + dr, cols + 1 + dc]
        linked = other >= 0
        pairs.append((np.flatnonzero(linked), other[linked]))
    a = np.concatenate([p[0] for p in pairs])
    b = np.concatenate([p[1] for p in pairs])
    label = np.arange(count)
    while True:
        la, lb = label[a], label[b]
        differ = la != lb
        if not differ.any():
            break
        low = np.minimum(la[differ], lb[differ])
        np.minimum.at(label, la[differ], low)  # hook each root under the smaller root it touches
        np.minimum.at(label, lb[differ], low)
        while True:  # pointer jumping: every pixel to its root
            jumped = label[label]
            if np.array_equal(jumped, label):
                break
            label = jumped
    kept_labels = np.zeros(count, dtype=bool)
    kept_labels[label[strong[rows, cols]]] = True
    out = np.zeros_like(weak)
    out[rows, cols] = kept_labels[label]
    return out


def canny_edges(image: Image.Image, low: int = 100, high: int = 200, *, sigma: float = 1.0) -> Image.Image:
    """Canny's edge detector (Canny 1986): grey, Gaussian blur (`sigma`; 0 = none), 3x3 Sobel gradients,
    non-maximum suppression, double threshold and hysteresis. `low` and `high` are on OpenCV's scale (|gx| + |gy| of
    the Sobel of 0-255 grey, as in cv2.Canny); returns white edges on black, RGB, at the image's size."""
    if not isinstance(image, Image.Image):
        raise ValueError(f"canny_edges: expected a PIL image, got {type(image).__name__}")
    if not 0 <= low <= high:
        raise ValueError(f"canny thresholds must satisfy 0 <= low <= high, got low={low!r}, high={high!r}")
    grey = np.asarray(to_rgb(image).convert("L"), dtype=np.float32)  # (H, W), 0-255
    if sigma > 0:
        radius = max(1, math.ceil(3 * sigma))
        x = np.arange(-radius, radius + 1, dtype=np.float32)
        kernel = np.exp(-x * x / (2 * sigma * sigma))
        kernel /= kernel.sum()
        grey = _correlate(_correlate(grey, kernel, 0), kernel, 1)
    gx = _correlate(_correlate(grey, (1, 2, 1), 0), (-1, 0, 1), 1)  # (H, W) Sobel, unnormalised like OpenCV's
    gy = _correlate(_correlate(grey, (1, 2, 1), 1), (-1, 0, 1), 0)
    magnitude = np.abs(gx) + np.abs(gy)

    # Non-maximum suppression along the gradient, in four directions (OpenCV's tan 22.5° / tan 67.5° sectors;
    # ">" on one side and ">=" on the other so that a plateau two pixels wide keeps one of them)
    ax, ay = np.abs(gx), np.abs(gy)
    along_x = ay <= ax * math.tan(math.pi / 8)
    along_y = ay > ax * math.tan(3 * math.pi / 8)
    diagonal = ~(along_x | along_y)
    same_sign = (gx * gy) > 0  # gradient towards down-right or up-left (rows grow downwards)
    height, width = magnitude.shape
    padded = np.pad(magnitude, 1)
    at = lambda dr, dc: padded[1 + dr:1 + dr + height, 1 + dc:1 + dc + width]  # noqa: E731
    peak = along_x & (magnitude > at(0, -1)) & (magnitude >= at(0, 1))
    peak |= along_y & (magnitude > at(-1, 0)) & (magnitude >= at(1, 0))
    peak |= diagonal & same_sign & (magnitude > at(-1, -1)) & (magnitude >= at(1, 1))
    peak |= diagonal & ~same_sign & (magnitude > at(-1, 1)) & (magnitude >= at(1, -1))

    # Double threshold and hysteresis: weak edges survive only when connected to a strong one
    weak = peak & (magnitude > low)
    edges = _hysteresis(weak & (magnitude > high), weak)
    return Image.fromarray(edges.astype(np.uint8) * 255, mode="L").convert("RGB")


def control_image(image: Image.Image, kind: str) -> Image.Image:
    """The ControlNet conditioning image of `kind` (one of CONTROL_KINDS) computed from `image`."""
    if kind == "canny":
        return canny_edges(image)
    raise ValueError(f"unknown control {kind!r}; one of {', '.join(CONTROL_KINDS)}")


# --- one mode's inputs ----------------------------------------------------------------------------------------
def _number(value, name: str, low: float, high: float, *, open_low: bool = False, meaning: str = "") -> float:
    interval = f"{'(' if open_low else '['}{low:g}, {high:g}]"
    number = float(value) if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) else math.nan
    if math.isnan(number) or not (low < number if open_low else low <= number) or not number <= high:
        raise ValueError(f"{name} must be a number in {interval}{meaning}, got {value!r}")
    return number


def prepare(mode: str, *, image, mask=None, denoise=None, control=None, control_scale=None, side: int,
            max_side: int) -> TaskInputs:
    """One task mode's inputs, checked, fitted to the generation size and shaped for FlexIPPipeline.

    Inputs that belong to another mode are ignored, so the studio may pass every control's value.

    Args:
        mode: "start_image" (image-to-image), "inpaint" (inpainting) or "control" (ControlNet).
        image: the start image, the scene to paint the subject into, or the picture whose structure to follow
            (anything `read_image` reads).
        mask: inpaint: where the subject goes (anything `read_mask` reads; the same ImageEditor value as `image`
            works: its background is the scene and its strokes the mask).
        denoise: start_image: how much of the start image is repainted, in (0, 1]; None = DEFAULT_DENOISE.
        control: control: the kind of control image, one of CONTROL_KINDS; None = "canny".
        control_scale: control: how strongly the structure is followed, in [0, 2]; None = DEFAULT_CONTROL_SCALE.
        side: the longer side of the generation, in pixels (the profile's default size).
        max_side: the largest side the profile accepts; `side` is capped to it.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
    # 1. Scalars first: cheap, and before any pixel is decoded
    if mode == "start_image":
        denoise = _number(DEFAULT_DENOISE if denoise is None else denoise, "denoise", 0.0, 1.0, open_low=True,
                          meaning=" (the share of the start image repainted)")
    if mode == "control":
        control = "canny" if control is None else control
        if not isinstance(control, str) or control not in CONTROL_KINDS:
            raise ValueError(f"control must be one of {', '.join(CONTROL_KINDS)}, got {control!r}")
        control_scale = _number(DEFAULT_CONTROL_SCALE if control_scale is None else control_scale, "control_scale",
                                0.0, 2.0)

    # 2. The picture, at the generation size
    name = INPUT_NAMES[mode]
    picture = read_image(image, name)
    fitted, note = fit_size(picture, side, max_side, label=f"the {name}")
    notes = [note] if note else []

    # 3. The mode's pipeline inputs
    if mode == "start_image":
        return TaskInputs(mode, MODES[mode], {"image": fitted, "strength": denoise}, None, None,
                          {"mode": mode, "denoise": denoise}, tuple(notes))
    if mode == "inpaint":
        mask_image, mask_note = read_mask(mask, picture)  # checked against the scene the user painted on
        notes += [mask_note] if mask_note else []
        if mask_image.size != fitted.size:  # follows the scene to the generation size
            mask_image = mask_image.resize(fitted.size, Image.NEAREST)
            _check_not_vanished(mask_image, "mask")
        return TaskInputs(mode, MODES[mode], {"image": fitted, "mask_image": mask_image}, fitted.height,
                          fitted.width, {"mode": mode}, tuple(notes))
    edges = control_image(fitted, control)
    if not np.asarray(edges).any():
        notes.append(f"{name}: no edges were found in the picture, so the control adds no structure")
    return TaskInputs(mode, MODES[mode], {"image": edges, "controlnet_conditioning_scale": control_scale},
                      fitted.height, fitted.width, {"mode": mode, "control": control, "control_scale": control_scale},
                      tuple(notes), shown=edges)
