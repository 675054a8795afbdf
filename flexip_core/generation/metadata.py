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
    ("gate_schedule", "FlexIP identity until"),
    ("profile", "Model"),
    ("base", "Base"),
    ("adapter", "Adapter"),
)
INT_FIELDS = {"num_inference_steps", "seed"}
FLOAT_FIELDS = {"guidance_scale", "gate", "strength", "gate_schedule"}


def format_parameters(params: dict) -> str:
    """prompt\nNegative prompt: ...\nSteps: 20, Sampler: ..., Seed: 0, Size: 512x512, FlexIP gate: 0.5, ..."""
    lines = [str(params.get("prompt", ""))]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    values = dict(params)
    if "width" in values and "height" in values:
        values["size"] = f"{values['width']}x{values['height']}"
    parts = []
    for key, label in FIELDS:
        value = values.get(key)
        if value is None:
            continue
        text = str(value).replace(",", " ").replace("\n", " ")
        parts.append(f"{label}: {text}")
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
    labels = {label: key for key, label in FIELDS}
    for part in re.split(r",\s*(?=[A-Za-z][\w ]*: )", settings):
        if ": " not in part:
            continue
        label, value = part.split(": ", 1)
        key = labels.get(label.strip(), label.strip())
        if key == "size":
            width, _, height = value.partition("x")
            params["width"], params["height"] = int(width), int(height)
        elif key in INT_FIELDS:
            params[key] = int(value)
        elif key in FLOAT_FIELDS:
            params[key] = float(value)
        else:
            params[key] = value.strip()
    return params


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
