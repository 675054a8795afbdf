"""A training pair in memory and its shard writer: the sample layout flexip_core.training.shards reads
(KEY.jpg, KEY.ref.jpg, KEY.mask.png, KEY.json), shards written whole (a half-written shard is never left under its
final name), split every `samples_per_shard` samples (webdataset's ShardWriter)."""
from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from flexip_core.training.shards import MASK, META, REFERENCE, TARGET

SHARD_NAME = "{prefix}-%06d.tar"  # shard file names; %06d counts from 0


@dataclass
class Pair:
    """One training pair before it is written."""

    source: str  # the recipe that made it: "sam", "multiview" or "video"
    name: str  # where it came from, for the sample key, the JSON and the log ("sa_1.jpg#7", "clip.mp4@1.0-2.0s")
    modality: str  # "invariant" (reference = the target or its cut-out) or "variant" (another view or frame)
    target: Image.Image  # the image the model learns to draw (RGB)
    reference: Image.Image | None = None  # the image the adapters see; None: the target itself
    mask: np.ndarray | None = None  # (H, W) bool subject mask over the reference (the target when reference is None)
    caption: str | None = None  # describes the target; None: the captioner writes one
    meta: dict = field(default_factory=dict)  # more to keep in KEY.json (instance id, area, frame times, ...)


def _resized(image: Image.Image, max_side: int, resample=Image.LANCZOS) -> Image.Image:
    if max_side <= 0 or max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, resample)


def _encoded(image: Image.Image, fmt: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format=fmt)
    return buffer.getvalue()


def sample_of(pair: Pair, key: str, max_side: int = 0, quality: int = 95) -> dict:
    """The shard sample of a captioned pair: images resized to at most `max_side` px (0: as they are)."""
    if not pair.caption:
        raise ValueError(f"{pair.name}: a pair is written with its caption")
    target = _resized(pair.target, max_side)
    sample = {"__key__": key, TARGET: _encoded(target, "JPEG", quality)}
    reference = target
    if pair.reference is not None:
        reference = _resized(pair.reference, max_side)
        sample[REFERENCE] = _encoded(reference, "JPEG", quality)
    if pair.mask is not None:
        mask = Image.fromarray(np.asarray(pair.mask, dtype=np.uint8) * 255)  # (H, W) 0 or 255
        if mask.size != reference.size:  # resized with its image
            mask = mask.resize(reference.size, Image.NEAREST)
        sample[MASK] = _encoded(mask, "PNG", quality)
    meta = {"caption": pair.caption, "modality": pair.modality, "source": pair.source, "origin": pair.name,
            **pair.meta}
    sample[META] = json.dumps(meta).encode("utf-8")
    return sample


def sample_key(index: int, pair: Pair) -> str:
    """A unique key without dots (the part of a tar member's name before the first dot is its sample's key)."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", pair.name).strip("_")[:80]
    return f"{index:09d}_{pair.source}_{name}"


class ShardSink:
    """Writes samples into `folder`/PREFIX-000000.tar, ... `samples_per_shard` each; each shard is written as
    NAME.part and renamed when complete."""

    def __init__(self, folder: str | Path, prefix: str, samples_per_shard: int):
        self.folder = Path(folder)
        self.pattern = str(self.folder / SHARD_NAME.format(prefix=prefix))
        self.samples_per_shard = samples_per_shard
        self.written: list[Path] = []  # complete shards
        self._writer = None
        self._file = None

    def _open(self, name: str):
        self._file = open(name + ".part", "wb")
        return self._file

    def _done(self, name: str) -> None:
        self._file.close()
        os.replace(name + ".part", name)
        self.written.append(Path(name))

    def write(self, sample: dict) -> None:
        if self._writer is None:  # opened at the first sample: no empty shard
            import webdataset as wds

            self.folder.mkdir(parents=True, exist_ok=True)
            self._writer = wds.ShardWriter(self.pattern, maxcount=self.samples_per_shard, verbose=0,
                                           opener=self._open, post=self._done, encoder=False, mtime=0.0)
        self._writer.write(sample)

    def close(self) -> list[Path]:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return self.written
