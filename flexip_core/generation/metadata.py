"""The `parameters` PNG text chunk, in the format other Stable Diffusion tools (A1111, Fooocus) write."""
from __future__ import annotations

import re
from pathlib import Path

from PIL import Image, PngImagePlugin

# Order and labels of the fields after the prompt lines.
FIELDS = (
    ("num_inference_steps", "Steps"),
    ("scheduler", "Sampler"),
    ("guidance_scale", "CFG scale"),
    ("seed", "Seed"),
    ("size", "Size"),
    ("gate", "FlexIP gate"),
    ("strength", "FlexIP strength"),
    ("pres_window", "FlexIP identity window"),
    ("pers_window", "FlexIP prompt window"),
    ("task", "FlexIP task"),
    ("num_frames", "Frames"),
    ("fps", "FPS"),
    ("profile", "Model"),
    ("base", "Base"),
    ("adapter", "Adapter"),
)
INT_FIELDS = {"num_inference_steps", "seed", "num_frames", "fps"}
FLOAT_FIELDS = {"guidance_scale", "gate", "strength"}
TASK_INPUT = "FlexIP input "  # label prefix of a task input ("FlexIP input strength: 0.6")
LEGACY = {"FlexIP identity until": "pres_until"}  # labels of files written by earlier versions


def format_parameters(params: dict) -> str:
    """prompt\nNegative prompt: ...\nSteps: 20, Sampler: ..., Seed: 0, Size: 512x512, FlexIP gate: 0.5, ..."""
    lines = [str(params.get("prompt", ""))]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    values = dict(params)
    if values.get("width") is not None and values.get("height") is not None:
        values["size"] = f"{values['width']}x{values['height']}"
    for branch, start, end in (("pres", "pres_from", "pres_until"), ("pers", "pers_from", "pers_until")):
        if (values.get(start), values.get(end)) not in ((None, None), (0.0, 1.0)):
            values[f"{branch}_window"] = f"{values.get(start) or 0:g}-{values.get(end, 1.0):g}"
    if values.get("task") == "text-to-image":
        values.pop("task")
    if values.get("scheduler") is None and "scheduler" in values:
        values["scheduler"] = "default"
    parts = []
    for key, label in FIELDS:
        value = values.get(key)
        if value is None:
            continue
        text = str(value).replace(",", " ").replace("\n", " ")
        parts.append(f"{label}: {text}")
    for name, value in sorted((params.get("task_inputs") or {}).items()):
        parts.append(f"{TASK_INPUT}{name}: {str(value).replace(',', ' ')}")
    lines.append(", ".join(parts))
    return "\n".join(lines)


def parse_parameters(text: str) -> dict:
    """Inverse of format_parameters; unknown fields are kept under their label."""
    lines = text.strip("\n").split("\n")
    params: dict = {}
    settings = lines.pop() if lines and re.match(r"^[A-Za-z][\w ]*: ", lines[-1]) and "Steps:" in lines[-1] else ""
    negative = [line for line in lines if line.startswith("Negative prompt: ")]
    prompt = [line for line in lines if not line.startswith("Negative prompt: ")]
    params["prompt"] = "\n".join(prompt)
    if negative:
        params["negative_prompt"] = negative[0][len("Negative prompt: "):]
    labels = {label: key for key, label in FIELDS} | LEGACY
    for part in re.split(r",\s*(?=[A-Za-z][\w ]*: )", settings):
        if ": " not in part:
            continue
        label, value = part.split(": ", 1)
        key = labels.get(label.strip(), label.strip())
        if key == "size":
            width, _, height = value.partition("x")
            params["width"], params["height"] = int(width), int(height)
        elif key in ("pres_window", "pers_window"):
            start, _, end = value.partition("-")
            branch = key.split("_")[0]
            params[f"{branch}_from"], params[f"{branch}_until"] = float(start), float(end)
        elif key == "pres_until":
            params[key] = float(value)
        elif label.startswith(TASK_INPUT):
            text = value.strip()
            params.setdefault("task_inputs", {})[label[len(TASK_INPUT):]] = _number_or_text(text)
        elif key in INT_FIELDS:
            params[key] = int(value)
        elif key in FLOAT_FIELDS:
            params[key] = float(value)
        else:
            params[key] = value.strip()
    return params


def _number_or_text(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def read_generation(image: Image.Image):
    """The Generation (and the whole parameters dict) an opened PNG was made with, or None when it carries no
    FlexIP settings; ValueError when its settings cannot be read. The one reader of PNG `parameters`."""
    from flexip_core.generation.settings import Generation

    params = read_png_parameters(image)
    if params is None:
        return None
    return Generation.from_parameters(params), params


def save_png(image: Image.Image, path: str | Path, params: dict) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", format_parameters(params))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", pnginfo=info)
    return path


def read_png_parameters(image: Image.Image) -> dict | None:
    """Settings from an opened PNG's header text chunk (no pixel decoding), or None."""
    text = image.info.get("parameters")
    return parse_parameters(text) if isinstance(text, str) and text else None
