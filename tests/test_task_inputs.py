"""The task modes' inputs: every accepted form of image and mask, refusals that name the input, the numpy Canny
detector on synthetic pictures, and prepare()'s pipeline_kwargs for each mode. No models."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from flexip_core.generation.settings import TASKS
from flexip_core.generation.task_inputs import (
    CONTROL_KINDS,
    MODES,
    TaskInputs,
    canny_edges,
    control_image,
    fit_size,
    prepare,
    read_image,
    read_mask,
)

SCENE = Image.new("RGB", (64, 48), (10, 20, 30))


def edges_of(image: Image.Image, **kwargs) -> np.ndarray:
    """(H, W) bool: canny_edges' white pixels."""
    out = canny_edges(image, **kwargs)
    assert out.mode == "RGB" and out.size == image.size
    array = np.asarray(out)
    assert set(np.unique(array)) <= {0, 255}
    return array[..., 0] > 0


def grey(array) -> Image.Image:
    return Image.fromarray(np.asarray(array).clip(0, 255).astype(np.uint8), mode="L")


def square(size: int = 128, low: int = 0, high: int = 255, box=(32, 96)) -> np.ndarray:
    array = np.full((size, size), low, dtype=np.uint8)
    array[box[0]:box[1], box[0]:box[1]] = high
    return array


def transparent_strokes(size=(64, 48), boxes=((5, 5, 20, 20),), colour=(255, 0, 0, 255)) -> Image.Image:
    """What an ImageEditor layer holds: a transparent canvas with strokes painted on it."""
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for box in boxes:
        draw.rectangle(box, fill=colour)
    return layer


def test_module_is_torch_free_at_import():
    code = "import sys, flexip_core.generation.task_inputs; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(Path(__file__).resolve().parent.parent))


def test_modes_name_core_tasks():
    assert MODES == {"start_image": "image-to-image", "inpaint": "inpainting", "control": "controlnet"}
    assert set(MODES.values()) <= set(TASKS)
    assert CONTROL_KINDS == ("canny",)


# --- read_image -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, expected", [
    (lambda tmp: Image.new("RGB", (20, 10), (1, 2, 3)), (1, 2, 3)),
    (lambda tmp: Image.new("RGBA", (20, 10), (0, 0, 0, 0)), (255, 255, 255)),  # transparent: composited on white
    (lambda tmp: Image.new("L", (20, 10), 77), (77, 77, 77)),
    (lambda tmp: np.full((10, 20, 3), (4, 5, 6), dtype=np.uint8), (4, 5, 6)),
    (lambda tmp: np.full((10, 20, 4), (4, 5, 6, 255), dtype=np.uint8), (4, 5, 6)),
    (lambda tmp: np.full((10, 20), 9, dtype=np.uint8), (9, 9, 9)),
    (lambda tmp: str(save(Image.new("RGB", (20, 10), (7, 8, 9)), tmp / "a.png")), (7, 8, 9)),
    (lambda tmp: save(Image.new("RGB", (20, 10), (7, 8, 9)), tmp / "b.png"), (7, 8, 9)),  # a pathlib.Path
    (lambda tmp: {"background": Image.new("RGB", (20, 10), (1, 1, 1)), "layers": [transparent_strokes((20, 10))],
                  "composite": Image.new("RGB", (20, 10), (255, 0, 0))}, (1, 1, 1)),  # the scene, not the strokes
    (lambda tmp: {"background": None, "layers": [], "composite": Image.new("RGB", (20, 10), (3, 3, 3))}, (3, 3, 3)),
])
def test_read_image_accepts_each_form(tmp_path, make, expected):
    image = read_image(make(tmp_path), "photo")
    assert image.mode == "RGB" and image.size == (20, 10)
    assert image.getpixel((10, 5)) == expected


def save(image: Image.Image, path):
    image.save(path)
    return path


@pytest.mark.parametrize("make, message", [
    (lambda tmp: None, "no image given"),
    (lambda tmp: {"background": None, "layers": [], "composite": None}, "no image given"),
    (lambda tmp: str(tmp / "missing.png"), "file not found"),
    (lambda tmp: write(tmp / "notes.png", b"these are not pixels"), "not an image PIL can read"),
    (lambda tmp: write(tmp / "cut.png", png_bytes(Image.new("RGB", (64, 64), (1, 2, 3)))[:80]), "truncated or corrupt"),
    (lambda tmp: write(tmp / "empty.png", b""), "empty"),
    (lambda tmp: np.zeros((9000, 10, 3), dtype=np.uint8), "9000.*largest accepted is 8192 px"),
    (lambda tmp: np.zeros((4, 4, 3), dtype=np.uint8), "smallest accepted is 8 px"),
    (lambda tmp: np.zeros((10, 10, 3), dtype=np.float32), "float32 values; give uint8"),
    (lambda tmp: np.zeros((10, 10, 2), dtype=np.uint8), r"shape \(10, 10, 2\) is not an image"),
    (lambda tmp: 42, "expected a PIL image.*got int"),
])
def test_read_image_refusals_name_the_input(tmp_path, make, message):
    with pytest.raises(ValueError, match=f"^photo: .*{message}"):
        read_image(make(tmp_path), "photo")


def write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def png_bytes(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_lazily_opened_corrupt_file_is_refused_by_name(tmp_path):
    data = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="^scene: image data is truncated or corrupt"):
        read_image(Image.open(path), "scene")


# --- read_mask --------------------------------------------------------------------------------------------------
def test_grey_mask_is_thresholded_at_128():
    array = np.zeros((48, 64), dtype=np.uint8)
    array[:, 10] = 127
    array[:, 20] = 128
    array[:, 30] = 255
    mask, note = read_mask(array, SCENE)
    assert note is None and mask.mode == "L" and mask.size == SCENE.size
    values = np.asarray(mask)
    assert set(np.unique(values)) == {0, 255}
    assert np.flatnonzero(values[0]).tolist() == [20, 30]


def test_rgb_mask_from_a_file(tmp_path):
    image = Image.new("RGB", (64, 48), (0, 0, 0))
    ImageDraw.Draw(image).rectangle((8, 8, 15, 15), fill=(255, 255, 255))
    mask, _ = read_mask(str(save(image, tmp_path / "mask.png")), SCENE)
    assert np.asarray(mask).sum() // 255 == 64
    assert mask.getpixel((8, 8)) == 255 and mask.getpixel((16, 16)) == 0


def test_rgba_mask_painted_on_transparent_canvas_counts_any_colour(tmp_path):
    layer = transparent_strokes(boxes=((0, 0, 9, 9),), colour=(0, 0, 255, 255))  # dark blue: luminance < 128
    ImageDraw.Draw(layer).rectangle((30, 30, 39, 39), fill=(255, 255, 255, 0))  # white but fully transparent
    mask, _ = read_mask(str(save(layer, tmp_path / "strokes.png")), SCENE)  # alpha survives the file
    values = np.asarray(mask)
    assert values[:10, :10].min() == 255
    assert values.sum() // 255 == 100  # the transparent white square is not painted


def test_opaque_rgba_mask_is_read_by_luminance():
    array = np.zeros((48, 64, 4), dtype=np.uint8)
    array[..., 3] = 255  # opaque everywhere: the alpha says nothing
    array[:5, :5, :3] = 255
    mask, _ = read_mask(array, SCENE)
    assert np.asarray(mask).sum() // 255 == 25


def test_editor_mask_is_the_union_of_all_layers_strokes(tmp_path):
    first = transparent_strokes(boxes=((0, 0, 9, 9),), colour=(255, 0, 0, 255))
    second = np.asarray(transparent_strokes(boxes=((20, 20, 29, 29),), colour=(0, 0, 0, 60)))  # faint black, numpy
    third = str(save(transparent_strokes(boxes=((50, 40, 53, 43),), colour=(0, 255, 0, 255)), tmp_path / "l3.png"))
    value = {"background": SCENE, "layers": [first, second, None, third], "composite": SCENE}
    mask, note = read_mask(value, SCENE)
    values = np.asarray(mask) // 255
    assert note is None
    assert values.sum() == 100 + 100 + 16
    assert values[:10, :10].all() and values[20:30, 20:30].all() and values[40:44, 50:54].all()


def test_editor_layer_without_alpha_counts_non_black_strokes():
    layer = np.zeros((48, 64, 3), dtype=np.uint8)  # gr.ImageEditor(image_mode="RGB") drops the layers' alpha
    layer[3:6, 3:6] = (0, 0, 90)
    mask, _ = read_mask({"background": SCENE, "layers": [layer], "composite": SCENE}, SCENE)
    assert np.asarray(mask).sum() // 255 == 9


def test_mask_of_another_size_is_resized_nearest_with_a_note():
    array = np.zeros((96, 128), dtype=np.uint8)
    array[:48, :64] = 255  # the top-left quarter
    mask, note = read_mask(array, SCENE)
    assert mask.size == SCENE.size
    assert note == "mask: the mask is 128×96 but the scene is 64×48; it was resized to the scene"
    values = np.asarray(mask)
    assert set(np.unique(values)) == {0, 255}
    assert values[:24, :32].all() and not values[24:].any() and not values[:, 32:].any()


@pytest.mark.parametrize("value", [
    np.zeros((48, 64), dtype=np.uint8),
    np.full((48, 64), 127, dtype=np.uint8),
    {"background": SCENE, "layers": [], "composite": SCENE},
    {"background": SCENE, "layers": [Image.new("RGBA", (64, 48), (255, 255, 255, 0))], "composite": SCENE},
])
def test_empty_mask_is_refused(value):
    with pytest.raises(ValueError, match=r"^mask: the mask is empty; paint \(white\) where the subject goes$"):
        read_mask(value, SCENE)


def test_mask_refusals_name_the_input(tmp_path):
    with pytest.raises(ValueError, match="^mask: no mask given"):
        read_mask(None, SCENE)
    with pytest.raises(ValueError, match="^mask: file not found"):
        read_mask(str(tmp_path / "nothing.png"), SCENE)
    with pytest.raises(ValueError, match="^mask layer 1: .*smallest accepted"):
        read_mask({"background": None, "layers": [np.zeros((2, 2, 4), np.uint8)], "composite": None}, SCENE)


def test_whole_scene_mask_is_allowed_with_a_note():
    mask, note = read_mask(np.full((48, 64), 255, dtype=np.uint8), SCENE)
    assert np.asarray(mask).min() == 255
    assert note == "mask: the mask covers the whole scene, so the whole scene is repainted"


# --- fit_size ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size, side, max_side, expected", [
    ((1024, 768), 512, 1024, (512, 384)),
    ((768, 1024), 512, 1024, (384, 512)),
    ((300, 200), 512, 1024, (512, 344)),  # small pictures are scaled up; 341.3 -> 344, the nearest multiple of 8
    ((1000, 563), 512, 1024, (512, 288)),  # 288.3
    ((4000, 100), 512, 1024, (512, 64)),  # never under 64
    ((2000, 1500), 1024, 768, (768, 576)),  # never above max_side
    ((513, 513), 516, 1024, (512, 512)),  # side itself rounded down to a multiple of 8
])
def test_fit_size_multiples_of_8_keeping_aspect(size, side, max_side, expected):
    fitted, note = fit_size(Image.new("RGB", size), side, max_side, label="the scene")
    assert fitted.size == expected
    assert all(length % 8 == 0 for length in fitted.size)
    if min(expected) > 64:
        assert abs(fitted.width / fitted.height - size[0] / size[1]) < 8 / min(expected)
    assert note == f"the scene was resized from {size[0]}×{size[1]} to {expected[0]}×{expected[1]}"


def test_fit_size_leaves_a_fitting_image_alone():
    image = Image.new("RGB", (512, 384))
    fitted, note = fit_size(image, 512, 1024)
    assert fitted is image and note is None


@pytest.mark.parametrize("side, max_side, message", [(32, 1024, "side"), (512, 10_000, "max_side"),
                                                     (512.5, 1024, "side"), (True, 1024, "side")])
def test_fit_size_refuses_bad_sides(side, max_side, message):
    with pytest.raises(ValueError, match=f"^{message} must be a whole number"):
        fit_size(Image.new("RGB", (100, 100)), side, max_side)


# --- canny ------------------------------------------------------------------------------------------------------
def test_canny_outlines_a_filled_square_on_its_border():
    edges = edges_of(grey(square()))  # a 64x64 square from (32, 32) to (95, 95)
    rows, cols = np.nonzero(edges)
    assert 0.9 * 4 * 64 <= edges.sum() <= 1.1 * 4 * 64
    on_border = (np.minimum(np.abs(rows - 31.5), np.abs(rows - 95.5)) <= 1.5) | \
                (np.minimum(np.abs(cols - 31.5), np.abs(cols - 95.5)) <= 1.5)
    assert on_border.all() and rows.min() >= 30 and rows.max() <= 97 and cols.min() >= 30 and cols.max() <= 97
    # closed: filling the outside (4-connected) cannot reach the inside through an 8-connected outline
    filled = Image.fromarray(edges.astype(np.uint8) * 255).copy()  # writable: fromarray shares a read-only buffer
    ImageDraw.floodfill(filled, (0, 0), 128)
    assert filled.getpixel((64, 64)) == 0 and filled.getpixel((127, 127)) == 128


def test_canny_outline_of_a_dim_square_in_colour():
    image = Image.fromarray(np.stack([square(low=20, high=120)] * 3, axis=2))  # contrast 100: still strong
    edges = edges_of(image)
    assert 0.9 * 4 * 64 <= edges.sum() <= 1.1 * 4 * 64


def test_canny_finds_nothing_on_a_flat_image():
    assert not edges_of(Image.new("RGB", (64, 64), (90, 140, 30))).any()


def test_canny_blur_removes_noise_under_the_low_threshold():
    rng = np.random.default_rng(0)
    noisy = grey(128 + rng.integers(-24, 25, (128, 128)))
    assert edges_of(noisy, sigma=0).any()  # unblurred, the noise's gradients pass the low threshold
    assert not edges_of(noisy).any()


def test_canny_hysteresis_keeps_weak_edges_connected_to_strong_ones():
    # one horizontal step along row 48, black above; below, 200 on the left (strong: over 200 on the gradient
    # scale), easing to 60 from x = 60 to 80, then 60 (weak: between 100 and 200)
    joined = np.zeros((96, 160))
    joined[48:] = np.interp(np.arange(160), [0, 60, 80, 159], [200, 200, 60, 60])
    edges = edges_of(grey(joined))
    assert edges[44:53].any(axis=0).all()  # every column keeps its edge, the weak stretch (x >= 80) included
    assert not edges[:44].any() and not edges[53:].any()

    isolated = np.zeros((96, 160))
    isolated[48:] = 60  # the same weak edge, touching no strong one
    assert edges_of(grey(isolated), low=100, high=100)[44:53].any(axis=0).all()  # it is above the low threshold
    assert not edges_of(grey(isolated)).any()  # but dropped: not connected to a strong edge


def test_canny_refuses_inverted_thresholds():
    with pytest.raises(ValueError, match="low <= high"):
        canny_edges(SCENE, low=200, high=100)


def test_control_image_dispatches_by_kind():
    image = grey(square()).convert("RGB")
    assert np.array_equal(np.asarray(control_image(image, "canny")), np.asarray(canny_edges(image)))
    with pytest.raises(ValueError, match="unknown control 'depth'; one of canny"):
        control_image(image, "depth")


# --- prepare ----------------------------------------------------------------------------------------------------
PHOTO = Image.fromarray(np.stack([square(256, box=(64, 192))[:, :] for _ in range(3)], axis=2)).resize((1024, 768))


def test_prepare_start_image():
    inputs = prepare("start_image", image=PHOTO, denoise=0.6, side=512, max_side=1024)
    assert isinstance(inputs, TaskInputs) and inputs.task == "image-to-image" and inputs.mode == "start_image"
    assert set(inputs.pipeline_kwargs) == {"image", "strength"}
    assert inputs.pipeline_kwargs["strength"] == 0.6 and inputs.pipeline_kwargs["image"].size == (512, 384)
    assert inputs.height is None and inputs.width is None  # diffusers takes the size from the image
    assert inputs.settings == {"mode": "start_image", "denoise": 0.6}
    assert inputs.notes == ("the start image was resized from 1024×768 to 512×384",)
    assert inputs.shown is None


def test_prepare_inpaint_from_one_editor_value():
    strokes = transparent_strokes(size=(1024, 768), boxes=((100, 100, 299, 299),))
    editor = {"background": PHOTO, "layers": [strokes], "composite": PHOTO}
    inputs = prepare("inpaint", image=editor, mask=editor, side=512, max_side=1024)
    assert inputs.task == "inpainting" and set(inputs.pipeline_kwargs) == {"image", "mask_image"}
    scene, mask = inputs.pipeline_kwargs["image"], inputs.pipeline_kwargs["mask_image"]
    assert scene.size == mask.size == (512, 384) and (inputs.width, inputs.height) == (512, 384)
    assert np.array_equal(np.asarray(scene), np.asarray(PHOTO.resize((512, 384), Image.LANCZOS)))  # not the strokes
    values = np.asarray(mask)
    assert mask.mode == "L" and set(np.unique(values)) == {0, 255}
    assert values[50:150, 50:150].all() and values.sum() // 255 == 100 * 100  # the stroke, halved with the scene
    assert inputs.settings == {"mode": "inpaint"}
    assert inputs.notes == ("the scene was resized from 1024×768 to 512×384",)  # the mask matched the scene


def test_prepare_inpaint_notes_a_mask_of_another_size():
    mask = np.zeros((100, 100), dtype=np.uint8)
    mask[50:] = 255
    inputs = prepare("inpaint", image=PHOTO, mask=mask, side=512, max_side=1024)
    assert inputs.pipeline_kwargs["mask_image"].size == (512, 384)
    assert inputs.notes[1] == "mask: the mask is 100×100 but the scene is 1024×768; it was resized to the scene"
    assert np.asarray(inputs.pipeline_kwargs["mask_image"])[192:].all()


def test_prepare_inpaint_refuses_a_mask_lost_in_resizing():
    mask = np.zeros((768, 1024), dtype=np.uint8)
    mask[100, 100] = 255  # one pixel: nearest resizing to half size samples the odd pixels only
    with pytest.raises(ValueError, match="^mask: the painted area is too thin"):
        prepare("inpaint", image=PHOTO, mask=mask, side=512, max_side=1024)


def test_prepare_control():
    inputs = prepare("control", image=PHOTO, control="canny", control_scale=0.8, side=512, max_side=1024)
    assert inputs.task == "controlnet" and set(inputs.pipeline_kwargs) == {"image", "controlnet_conditioning_scale"}
    edges = inputs.pipeline_kwargs["image"]
    assert inputs.pipeline_kwargs["controlnet_conditioning_scale"] == 0.8
    assert edges.size == (512, 384) and (inputs.width, inputs.height) == (512, 384)
    assert np.array_equal(np.asarray(edges), np.asarray(canny_edges(PHOTO.resize((512, 384), Image.LANCZOS))))
    assert np.asarray(edges).any() and inputs.shown is edges
    assert inputs.settings == {"mode": "control", "control": "canny", "control_scale": 0.8}


def test_prepare_control_notes_a_picture_without_edges():
    inputs = prepare("control", image=Image.new("RGB", (512, 512), (5, 5, 5)), side=512, max_side=1024)
    assert inputs.settings == {"mode": "control", "control": "canny", "control_scale": 1.0}  # the defaults
    assert inputs.notes == ("control image: no edges were found in the picture, so the control adds no structure",)


def test_prepare_ignores_other_modes_inputs():
    inputs = prepare("inpaint", image=PHOTO, mask=np.full((768, 1024), 255, np.uint8), denoise=5, control="depth",
                     control_scale=-1, side=512, max_side=1024)
    assert set(inputs.pipeline_kwargs) == {"image", "mask_image"}


@pytest.mark.parametrize("denoise", [0, 0.0, -0.1, 1.01, math.nan, math.inf, True, "0.5", [0.5]])
def test_prepare_refuses_bad_denoise_before_reading_the_image(denoise):
    with pytest.raises(ValueError, match=r"^denoise must be a number in \(0, 1\]"):
        prepare("start_image", image=None, denoise=denoise, side=512, max_side=1024)


@pytest.mark.parametrize("denoise", [1, 1.0, 0.01, np.float32(0.25)])
def test_prepare_accepts_denoise_in_range(denoise):
    inputs = prepare("start_image", image=SCENE, denoise=denoise, side=64, max_side=1024)
    assert inputs.pipeline_kwargs["strength"] == float(denoise) and type(inputs.settings["denoise"]) is float


@pytest.mark.parametrize("kwargs, message", [
    ({"control_scale": 2.5}, r"^control_scale must be a number in \[0, 2\]"),
    ({"control_scale": math.nan}, r"^control_scale must be a number in \[0, 2\]"),
    ({"control_scale": False}, r"^control_scale must be a number in \[0, 2\]"),
    ({"control_scale": "1"}, r"^control_scale must be a number in \[0, 2\]"),
    ({"control": "depth"}, "^control must be one of canny, got 'depth'"),
    ({"control": 1}, "^control must be one of canny"),
])
def test_prepare_refuses_bad_control_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        prepare("control", image=SCENE, side=512, max_side=1024, **kwargs)


def test_prepare_refusals_name_the_input():
    with pytest.raises(ValueError, match="^unknown mode 'sketch'; one of start_image, inpaint, control"):
        prepare("sketch", image=SCENE, side=512, max_side=1024)
    with pytest.raises(ValueError, match="^start image: no image given"):
        prepare("start_image", image=None, side=512, max_side=1024)
    with pytest.raises(ValueError, match="^scene: no image given"):
        prepare("inpaint", image=None, mask=SCENE, side=512, max_side=1024)
    with pytest.raises(ValueError, match="^mask: no mask given"):
        prepare("inpaint", image=SCENE, side=512, max_side=1024)
    with pytest.raises(ValueError, match="^control image: expected a PIL image"):
        prepare("control", image=3.5, side=512, max_side=1024)
