"""Reference-photo validation and conversion: every bad upload gets a clear error before decoding."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from flexip_core.generation.images import ImageLimits, is_flat, load_reference_image, square_view


def png_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=kwargs.pop("format", "PNG"), **kwargs)
    return buffer.getvalue()


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size; its pixel data is never decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_from_the_header():
    with pytest.raises(ValueError, match="bomb.png: image is 9000x9000; the largest accepted is 8192 px"):
        load_reference_image(png_header_claiming(9000, 9000), name="bomb.png")
    with pytest.raises(ValueError, match="huge.png: .*decompression bomb"):
        load_reference_image(png_header_claiming(30000, 30000), name="huge.png")
    with pytest.raises(ValueError, match="megapixels"):
        load_reference_image(png_bytes(Image.new("RGB", (64, 64))), limits=ImageLimits(max_pixels=1000))


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"hello, not an image at all", "not an image"),
    (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"></svg>', "SVG"),
])
def test_bad_bytes_are_named(data, message):
    with pytest.raises(ValueError, match=f"photo.bin: .*{message}"):
        load_reference_image(data, name="photo.bin")


def test_truncated_and_animated_and_oversized_files():
    jpeg = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)),
                     format="JPEG")
    for cut in (len(jpeg) // 2, 40):  # cut in the pixels, and in the header ("Truncated File Read" from PIL's open)
        with pytest.raises(ValueError, match="cut.jpg: image data is truncated or corrupt"):
            load_reference_image(jpeg[:cut], name="cut.jpg")
    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    gif = png_bytes(frames[0], format="GIF", save_all=True, append_images=frames[1:])
    with pytest.raises(ValueError, match="animated"):
        load_reference_image(gif, name="anim.gif")
    with pytest.raises(ValueError, match="largest accepted is"):
        load_reference_image(jpeg, name="big.jpg", limits=ImageLimits(max_bytes=1000))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="file not found"):
        load_reference_image(tmp_path / "nope.jpg")


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "1", "CMYK", "I;16", "I", "F"])
def test_odd_modes_become_rgb(mode):
    source = Image.new("RGB", (40, 30), (200, 100, 50)).convert(mode) if mode not in ("I;16", "I", "F") \
        else Image.fromarray(np.full((30, 40), 30000, dtype=np.uint16)).convert(mode) if mode != "I;16" \
        else Image.fromarray(np.full((30, 40), 30000, dtype=np.uint16))
    fmt = "TIFF" if mode in ("CMYK", "I;16", "I", "F") else "PNG"
    image = load_reference_image(png_bytes(source, format=fmt), name=f"x.{fmt.lower()}")
    assert image.mode == "RGB" and image.size == (40, 30)


def test_alpha_is_composited_on_white():
    clear = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    assert load_reference_image(png_bytes(clear)).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (60, 20), "white")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    loaded = load_reference_image(png_bytes(image, format="JPEG", exif=exif.tobytes()))
    assert loaded.size == (20, 60)


def test_square_view_crop_and_pad():
    wide = Image.new("RGB", (300, 100), "white")
    wide.paste((255, 0, 0), (0, 0, 50, 100))
    cropped = square_view(wide, 32, "crop")
    padded = square_view(wide, 32, "pad")
    assert cropped.size == padded.size == (32, 32)
    assert cropped.getpixel((0, 16)) == (255, 255, 255)  # the red strip at the far left is cropped away
    assert padded.getpixel((0, 16))[1] < 100  # ...and kept when padding
    with pytest.raises(ValueError, match="aspect"):
        square_view(wide, 32, "stretch")


def test_flat_photos_are_told_apart_from_photos_of_a_subject(dreambench):
    flat = Image.new("RGB", (64, 64), (90, 140, 200))
    assert is_flat(flat)
    assert is_flat(load_reference_image(png_bytes(flat, format="JPEG", quality=70)))  # compression noise: still flat
    assert is_flat(load_reference_image(png_bytes(Image.new("RGBA", (32, 32), (0, 0, 0, 0)))))  # transparent: white
    flat.paste((200, 40, 40), (20, 20, 44, 44))  # a small toy on it
    assert not is_flat(flat)
    assert not is_flat(load_reference_image(dreambench / "dog" / "00.jpg"))
