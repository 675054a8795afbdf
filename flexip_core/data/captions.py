"""Captions of training pairs: from the dataset's caption files where it has them, else from an image-to-text
model the user names (a transformers model such as BLIP, BLIP-2 or GIT), batched, on the GPU when there is one.

Caption files: a same-name `.txt` beside an image or video (`sa_1.txt`, `clip.txt`), or a caption table, a CSV
with a `caption` column and a column naming the file (`video`, `image`, `file`, `path` or `name`: OpenVid-1M's
layout), matched by file name.
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path

import torch
from PIL import Image

logger = logging.getLogger(__name__)

NAME_COLUMNS = ("video", "image", "file", "path", "name", "filename")  # a caption table's file column, by preference


def _clean(text) -> str | None:
    """Whitespace collapsed; None for no text."""
    if text is None:
        return None
    return " ".join(str(text).split()) or None


class CaptionFiles:
    """Caption files of a dataset: `path`.txt beside each file, then a caption table (CSV) by file name."""

    def __init__(self, table: str | Path | None = None):
        self.table: dict[str, str] = {}
        if table is not None:
            self.table = read_caption_table(Path(table))

    def __call__(self, path: Path) -> str | None:
        """The caption of an image or video file, or None when the dataset has none for it."""
        text = path.with_suffix(".txt")
        if text.is_file():
            caption = _clean(text.read_text(encoding="utf-8", errors="replace"))
            if caption:
                return caption
        return self.table.get(path.name)


def read_caption_table(path: Path) -> dict[str, str]:
    """{file name: caption} from a CSV with a `caption` column and a file column (NAME_COLUMNS)."""
    if not path.is_file():
        raise ValueError(f"caption table not found: {path}")
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        columns = {c.lower(): c for c in reader.fieldnames or []}
        name_column = next((columns[c] for c in NAME_COLUMNS if c in columns), None)
        if "caption" not in columns or name_column is None:
            raise ValueError(f"caption table {path.name}: needs a 'caption' column and one of {', '.join(NAME_COLUMNS)}"
                             f"; it has {', '.join(reader.fieldnames or []) or 'none'}")
        table = {}
        for row in reader:
            caption = _clean(row[columns["caption"]])
            if caption and row[name_column]:
                table[Path(row[name_column]).name] = caption
    logger.info("caption table %s: %d captions", path.name, len(table))
    return table


class Captioner:
    """A transformers image-to-text model that captions batches of images.

    Args:
        model: the model's Hugging Face id or local folder (AutoProcessor + AutoModelForImageTextToText load it),
            e.g. "Salesforce/blip-image-captioning-large".
        device: where it runs; default CUDA when available, else the CPU.
        dtype: its weights' dtype; default float16 on CUDA, float32 on the CPU.
        prompt: optional text the captions start from (BLIP's conditional captioning: "a photograph of").
        max_new_tokens: longest caption, in tokens.
        batch_size: images per generate call.
    """

    def __init__(self, model: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 prompt: str | None = None, max_new_tokens: int = 40, batch_size: int = 16):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.name, self.prompt = model, prompt
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        try:
            self.processor = AutoProcessor.from_pretrained(model)
            self.model = AutoModelForImageTextToText.from_pretrained(model, dtype=self.dtype)
        except (OSError, ValueError) as error:
            raise ValueError(f"captioner {model!r} could not be loaded as an image-to-text model ({error})") from None
        self.model.to(self.device).eval()
        logger.info("captioner %s on %s (%s)", model, self.device, self.dtype)

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> list[str]:
        """One caption per image (an empty string where the model wrote nothing)."""
        captions = []
        for start in range(0, len(images), self.batch_size):
            chunk = [image.convert("RGB") for image in images[start:start + self.batch_size]]
            kwargs = {"images": chunk, "return_tensors": "pt"}
            if self.prompt:
                kwargs["text"] = [self.prompt] * len(chunk)
            inputs = self.processor(**kwargs).to(self.device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            tokens = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
            captions += [_clean(text) or "" for text in self.processor.batch_decode(tokens, skip_special_tokens=True)]
        return captions
