"""Helpers for the UI tests: a fake engine (no model), photo files, and a real `app.py` server process."""
from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from benchmarks.app_process import AppServer  # noqa: F401  (the tests' app server)
from flexip_core.generation.settings import Generation
from flexip_core.loading.profiles import Defaults
from ui.engine import SCHEDULERS, Rendered

REPO = Path(__file__).resolve().parent.parent
DREAMBENCH = REPO.parent / "shared" / "dreambench"


@dataclass(frozen=True)
class Call:
    """One FakeEngine.render call, as the engine received it."""

    references: tuple  # PIL images
    weights: tuple[float, ...]
    generation: Generation
    gates: tuple[float, ...]
    task: object = None  # the mode's TaskInputs, None for text-to-image
    decode: str = "full"  # "fast": the tiny autoencoder (renders while dragging)


class FakeEngine:
    """Renders flat colours that encode γ and the seed, calling on_step like the core; checks inputs as the
    core does (Generation.check: ValueError naming the setting). `step_delay` slows each step so cancellation can
    be tested."""

    profile = "fake"
    schedulers = SCHEDULERS
    world = None  # no world of its own: any prompt word goes

    def __init__(self, step_delay: float = 0.0):
        self.step_delay = step_delay
        self.calls: list[Call] = []
        self.loads = 0
        self.cancelled = threading.Event()  # set when a render stopped because on_step raised
        self.load_error: str | None = None  # when set, loading fails with this message
        self.control_missing: str | None = None  # when set, the Control mode is refused with this reason
        self._loaded = False
        self._failure: str | None = None

    def defaults(self) -> Defaults:
        return Defaults(height=64, width=64, num_inference_steps=4, guidance_scale=7.5, scheduler="dpmpp_2m",
                        max_side=512)

    def ready(self) -> bool:
        return self._loaded

    def description(self) -> str:
        return "Flat colours that encode γ and the seed (a test engine)."

    def load(self) -> None:
        if not self._loaded:
            self.loads += 1
            self._failure = self.load_error
            if self.load_error:
                raise ValueError(self.load_error)
            self._loaded = True

    def failure(self) -> str | None:
        return self._failure

    def modes(self) -> dict:
        return {"start_image": None, "inpaint": None, "control": self.control_missing, "animate": None}

    def render(self, references, weights, generation: Generation, gates, on_step=None, task=None,
               images: int = 1, decode: str = "full") -> list[Rendered]:
        for gate in gates:
            if not 0.0 <= gate <= 1.0:
                raise ValueError(f"gate (γ) must be a number in [0, 1], got {gate}")
        generation.check(self.defaults().max_side)
        self.load()
        self.calls.append(Call(tuple(references), tuple(weights), generation, tuple(gates), task, decode))
        steps = generation.num_inference_steps
        for step in range(1, steps + 1):
            time.sleep(self.step_delay)
            if on_step is not None:
                try:
                    on_step(step, steps, [Image.new("RGB", (8, 8), _colour(g, step)) for g in gates])
                except Exception:
                    self.cancelled.set()
                    raise
        made = [replace(generation.at(gate), seed=generation.seed + i) for gate in gates for i in range(images)]
        size = task.pipeline_kwargs["image"].size if task is not None and task.height is None else None
        return [
            Rendered(image=Image.new("RGB", size or (g.width, g.height), _colour(g.gate, g.seed)), generation=g,
                     parameters={**g.to_parameters(), "identity_metric": "clip", "profile": "fake"},
                     identity=0.5 + 0.4 * g.gate, warnings=_cut_off(g.prompt), frames=_frames(g))
            for g in made
        ]


def _frames(generation: Generation) -> tuple | None:
    """A clip of the animate task: frames whose blue channel counts them (None for a still)."""
    if generation.num_frames is None:
        return None
    red, green, _ = _colour(generation.gate, generation.seed)
    size = (generation.width, generation.height)
    return tuple(Image.new("RGB", size, (red, green, 8 * i)) for i in range(generation.num_frames))


def _cut_off(prompt: str, limit: int = 77) -> tuple[str, ...]:
    """The note the core adds when a prompt is longer than its text encoder takes (words stand in for tokens)."""
    words = len(prompt.split())
    if words <= limit:
        return ()
    return (f"prompt is {words} tokens; the text encoder takes {limit}, so the end was cut off",)


def _colour(gate: float, salt: int) -> tuple[int, int, int]:
    return round(255 * gate), salt % 256, 128


def png_bytes(size=(96, 64), mode="RGB", colour=(200, 30, 30)) -> bytes:
    """A PNG of a `colour` toy (a block) on a light ground: a subject, not one flat colour."""
    image = Image.new("RGB", size, (235, 235, 235))
    image.paste(colour, (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4))
    buffer = io.BytesIO()
    (image if mode == "RGB" else image.convert(mode)).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_with_size(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height (a decompression bomb stand-in): pixels never decode."""
    import struct
    import zlib

    data = bytearray(png_bytes((8, 8)))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


def _animated_gif() -> bytes:
    buffer = io.BytesIO()
    frames = [Image.new("RGB", (32, 32), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def bad_uploads(folder: Path) -> dict[str, tuple[Path, str]]:
    """Files each upload check must refuse: name -> (path, words the error must contain)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "not_an_image.png": (b"this is plain text, not a picture\n" * 4, "not an image"),
        "empty.jpg": (b"", "empty"),
        "vector.svg": (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
                       "SVG"),
        "truncated.png": (png_bytes((256, 256), colour=(1, 2, 3))[:120], "truncated"),
        "animated.gif": (_animated_gif(), "animated"),
        "bomb.png": (_png_with_size(30000, 30000), "decompression bomb"),
        "huge.png": (_png_with_size(8000, 6000), "8000x6000"),
    }
    result = {}
    for name, (payload, reason) in files.items():
        path = folder / name
        path.write_bytes(payload)
        result[name] = (path, reason)
    return result


def odd_mode_uploads(folder: Path) -> dict[str, tuple[Path, tuple[int, int]]]:
    """Files that must be accepted and converted: name -> (path, expected RGB size after EXIF rotation)."""
    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    cmyk = folder / "cmyk.jpg"
    Image.new("CMYK", (40, 30), (0, 200, 200, 0)).save(cmyk)
    made["cmyk.jpg"] = (cmyk, (40, 30))
    deep = folder / "sixteen_bit.png"
    Image.new("I;16", (40, 30), 40000).save(deep)
    made["sixteen_bit.png"] = (deep, (40, 30))
    palette = folder / "palette_alpha.png"
    image = Image.new("P", (40, 30), 3)
    image.info["transparency"] = 3
    image.save(palette, transparency=3)
    made["palette_alpha.png"] = (palette, (40, 30))
    rgba = folder / "alpha.png"
    Image.new("RGBA", (40, 30), (255, 0, 0, 90)).save(rgba)
    made["alpha.png"] = (rgba, (40, 30))
    rotated = folder / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    Image.new("RGB", (40, 30), (0, 120, 0)).save(rotated, exif=exif.tobytes())
    made["rotated.jpg"] = (rotated, (30, 40))
    return made


def ui_form(max_photos: int = 4, **values) -> list:
    """Positional inputs of the UI's undocumented endpoints (/ui_generate after lock_seed and before the images per
    click, /ui_release):
    the generation controls in layout order (ui.handlers.CONTROLS), one weight per photo slot, then the mode panel's
    inputs (ui.handlers.MODE_INPUTS; text-to-image)."""
    from ui.handlers import CONTROLS, MODE_INPUTS, TEXT_MODE

    defaults = dict(prompt="a photo of the subject", negative_prompt="", gate=0.5, strength=1.0, seed=1,
                    num_inference_steps=4, guidance_scale=7.5, width=64, height=64, scheduler="dpmpp_2m",
                    pres_from=0.0, pres_until=1.0, pers_from=0.0, pers_until=1.0, **TEXT_MODE)
    defaults.update(values)
    return [defaults[name] for name in CONTROLS] + [1.0] * max_photos + [defaults[name] for name in MODE_INPUTS]
