"""Training data: the JSONL manifest of (target, reference, caption, modality) pairs, its dataset and batching.

One record per line, paths relative to the manifest's folder (absolute paths are accepted):

    {"target": "images/0001.png", "reference": "images/0001.png", "caption": "a red star on sand",
     "modality": "invariant", "mask": "masks/0001.png"}

`mask` (optional) cuts the subject out of the reference: white outside the mask, cropped to the mask's box
(FLEXIP_SPEC "invariant ... reference = the target image, or its masked crop"). Other keys are ignored, so
the toy world's manifests (which add "subject" and "scene") read as they are.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flexip_core.generation.images import load_reference_image, square_view

logger = logging.getLogger(__name__)

MODALITIES = ("invariant", "variant")  # index in this tuple = the modality id a batch carries
REQUIRED_KEYS = ("target", "reference", "caption", "modality")
MASK_THRESHOLD = 128  # mask pixels at or above this (0-255) belong to the subject


@dataclass(frozen=True)
class Record:
    """One training pair, its paths resolved."""

    line: int  # 1-based line number in the manifest (for error messages)
    target: Path  # image to generate
    reference: Path  # image the adapters see (the target itself for most invariant pairs)
    caption: str  # text describing the target
    modality: str  # "invariant" or "variant"
    mask: Path | None = None  # optional subject mask over the reference (white = subject)

    @property
    def modality_id(self) -> int:
        return MODALITIES.index(self.modality)


@dataclass(frozen=True)
class Problem:
    """A manifest line that was skipped, and why."""

    line: int  # 1-based line number
    message: str  # what was wrong with it

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


def _resolve(root: Path, value) -> Path:
    path = Path(value)
    return path if path.is_absolute() else root / path


def _parse_line(text: str, line: int, root: Path) -> Record:
    """A Record from one JSON line; ValueError says what is wrong."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise ValueError(f"missing key(s) {', '.join(missing)}; each record needs {', '.join(REQUIRED_KEYS)}")
    for key in ("target", "reference"):
        if not isinstance(data[key], str) or not data[key].strip():
            raise ValueError(f"{key} must be a non-empty path string, got {data[key]!r}")
    caption = data["caption"]
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError("empty caption; every record needs text describing its target")
    if data["modality"] not in MODALITIES:
        raise ValueError(f"modality {data['modality']!r} unknown; use one of {', '.join(MODALITIES)}")
    mask = data.get("mask")
    if mask is not None and (not isinstance(mask, str) or not mask.strip()):
        raise ValueError(f"mask must be a path string or absent, got {mask!r}")
    return Record(line, _resolve(root, data["target"]), _resolve(root, data["reference"]), caption.strip(),
                  data["modality"], _resolve(root, mask) if mask else None)


def load_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    """(H, W) boolean subject mask; it must match the reference's size and cover something."""
    if not path.is_file():
        raise ValueError(f"mask {path} not found")
    try:
        with Image.open(path) as image:
            image.load()
            return mask_array(image, size, path.name)
    except (OSError, SyntaxError) as error:
        raise ValueError(f"mask {path.name} is not a readable image ({error})") from None


def mask_array(image: Image.Image, size: tuple[int, int], name: str) -> np.ndarray:
    """(H, W) boolean subject mask of a decoded mask image, checked against its reference's (width, height)."""
    mask = image.convert("L")
    if mask.size != size:
        raise ValueError(f"mask {name} is {mask.size[0]}x{mask.size[1]} but its reference is {size[0]}x{size[1]}")
    array = np.asarray(mask) >= MASK_THRESHOLD  # (H, W)
    if not array.any():
        raise ValueError(f"mask {name} is empty (no pixel >= {MASK_THRESHOLD})")
    return array


def cut_out(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """The subject on white, cropped to the mask's bounding box."""
    pixels = np.asarray(image).copy()  # (H, W, 3)
    pixels[~mask] = 255
    rows, cols = np.nonzero(mask)
    box = (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)
    return Image.fromarray(pixels).crop(box)


def load_reference(record: Record) -> Image.Image:
    """The reference as the adapters see it: the photo, or its masked cut-out."""
    image = load_reference_image(record.reference)
    if record.mask is None:
        return image
    return cut_out(image, load_mask(record.mask, image.size))


def _check_images(record: Record, seen: dict[Path, tuple[str | None, tuple[int, int] | None]]) -> None:
    """Decode every image of a record once (results shared across records); ValueError on the first bad one."""
    for label, path in (("target", record.target), ("reference", record.reference)):
        if path not in seen:
            try:
                seen[path] = (None, load_reference_image(path).size)
            except ValueError as error:
                seen[path] = (str(error), None)
        error, _ = seen[path]
        if error is not None:
            raise ValueError(f"{label} unreadable: {error}")
    if record.mask is not None:
        load_mask(record.mask, seen[record.reference][1])


def read_manifest(path: str | Path, verify_images: bool = True,
                  report: bool = True) -> tuple[list[Record], list[Problem]]:
    """Parse a manifest; bad records are logged with their line number and skipped, never fatal.

    With `verify_images`, every image is decoded once so that unreadable files are caught here rather
    than mid-run. `report=False` returns the problems without logging them (other processes of a
    distributed run). Raises ValueError only when the manifest itself is missing or no record is usable.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"manifest not found: {path}; build one with `python -m flexip_core.training.manifest`")
    root = path.parent
    records, problems, seen = [], [], {}
    with path.open(encoding="utf-8") as handle:
        for line, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                record = _parse_line(text, line, root)
                for label, file in (("target", record.target), ("reference", record.reference), ("mask", record.mask)):
                    if file is not None and not file.is_file():
                        raise ValueError(f"{label} file not found: {file}")
                if verify_images:
                    _check_images(record, seen)
            except ValueError as error:
                problem = Problem(line, str(error))
                if report:
                    logger.warning("%s %s; skipped", path.name, problem)
                problems.append(problem)
                continue
            records.append(record)
    if not records:
        raise ValueError(f"{path}: no usable record ({len(problems)} skipped); first problem: "
                         f"{problems[0] if problems else 'the file is empty'}")
    counts = {m: sum(r.modality == m for r in records) for m in MODALITIES}
    (logger.info if report else logger.debug)("%s: %d records (%d invariant, %d variant), %d skipped", path.name,
                                              len(records), counts["invariant"], counts["variant"], len(problems))
    return records, problems


def target_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """(3, R, R) in [-1, 1]: short side resized to R, centre-cropped (the VAE's input range)."""
    array = np.asarray(square_view(image, resolution, "crop"), dtype=np.float32) / 127.5 - 1.0  # (R, R, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()  # (3, R, R)


def crop_top_left(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(top, left) of target_tensor's centre crop in the resized image: square_view's arithmetic (SDXL's
    crops_coords_top_left micro-conditioning)."""
    scale = resolution / min(width, height)
    resized_w, resized_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    return (resized_h - resolution) // 2, (resized_w - resolution) // 2


class PairPixels:
    """A pair's training item: target pixels, the reference as each image encoder takes it, caption (and its token
    ids) and target geometry. Picklable, so DataLoader workers can decode in parallel. `tokenizer` None: the caption
    is passed as text only (SDXL's encode_prompt tokenizes it)."""

    def __init__(self, resolution: int, clip_preprocess, dino_preprocess, tokenizer=None):
        self.resolution = resolution
        self.clip_preprocess, self.dino_preprocess = clip_preprocess, dino_preprocess
        self.tokenizer = tokenizer

    def __call__(self, image: Image.Image, reference: Image.Image, caption: str, modality_id: int) -> dict:
        item = {"target": target_tensor(image, self.resolution),  # (3, R, R)
                "clip": self.clip_preprocess([reference])[0],  # (3, S, S)
                "caption": caption, "modality": modality_id,
                "original_size": torch.tensor([image.height, image.width]),  # (2,) before resizing
                "crop_top_left": torch.tensor(crop_top_left(*image.size, self.resolution))}  # (2,) (top, left)
        if self.tokenizer is not None:
            item["input_ids"] = self.tokenizer(caption, padding="max_length", truncation=True,
                                               max_length=self.tokenizer.model_max_length,
                                               return_tensors="pt").input_ids[0]  # (77,)
        if self.dino_preprocess is not None:
            item["dino"] = self.dino_preprocess([reference])[0]  # (3, S', S')
        return item


class PairDataset(torch.utils.data.Dataset):
    """The manifest's records as training items (PairPixels), by record index; picklable for DataLoader workers."""

    def __init__(self, records: list[Record], resolution: int, clip_preprocess, dino_preprocess, tokenizer=None):
        if not records:
            raise ValueError("no training records")
        self.records = records
        self.pixels = PairPixels(resolution, clip_preprocess, dino_preprocess, tokenizer)

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, index: int) -> dict:
        record = self.records[index]
        item = self.pixels(load_reference_image(record.target), load_reference(record), record.caption,
                           record.modality_id)
        return {"index": index, **item}

    def __getitem__(self, index: int) -> dict:
        # A file that broke after the manifest was checked must not stop (or desynchronise) a distributed
        # run: the next readable record stands in, and the substitution is logged with its line number.
        for offset in range(len(self.records)):
            candidate = (index + offset) % len(self.records)
            try:
                return self._load(candidate)
            except ValueError as error:
                logger.warning("manifest line %d: %s; using the next record instead",
                               self.records[candidate].line, error)
        raise ValueError("no record of the manifest is readable any more")


def stream_indices(position: int, count: int, num_records: int, seed: int) -> list[int]:
    """`count` record indices from `position` in an endless stream of seeded per-epoch permutations.

    The stream depends only on (seed, num_records), so any process can start reading it anywhere: this is
    what makes data order identical across resumes and independent of DataLoader state.
    """
    out, cache = [], {}
    for p in range(position, position + count):
        epoch, offset = divmod(p, num_records)
        if epoch not in cache:
            cache[epoch] = np.random.default_rng((seed, epoch)).permutation(num_records)
        out.append(int(cache[epoch][offset]))
    return out


class StepBatchSampler(torch.utils.data.Sampler):
    """This process's record indices for each micro-step, starting at `start` (a batch sampler)."""

    def __init__(self, num_records: int, batch_size: int, rank: int, world_size: int, seed: int,
                 start: int, stop: int):
        self.num_records, self.batch_size = num_records, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.start, self.stop = start, stop  # micro-steps [start, stop)

    def batch(self, micro_step: int) -> list[int]:
        global_batch = self.batch_size * self.world_size
        position = micro_step * global_batch + self.rank * self.batch_size
        return stream_indices(position, self.batch_size, self.num_records, self.seed)

    def __iter__(self):
        for micro_step in range(self.start, self.stop):
            yield self.batch(micro_step)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)
