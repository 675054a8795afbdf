"""Invariant pairs from images with instance masks in the SAM layout (SA-1B: `sa_N.jpg` + `sa_N.json`), after
FlexIP's identity-locking data: the subject's cut-out is the reference, the whole image the target.

`sa_N.json` holds {"image": {"width", "height", ...}, "annotations": [{"id", "segmentation": {"size": [H, W],
"counts": COCO RLE}, "bbox": [x, y, w, h], "area", ...}]}. Subjects are chosen among the instances by these rules
(SubjectRules), largest first:
- area between `min_area` and `max_area` of the image: big enough to carry an identity, not the background (sky,
  floor, a wall);
- well framed: its box at least `border` of the image's side away from every edge (a subject cut off by the frame
  is not a whole subject);
- compact: the mask fills at least `min_fill` of its box (scattered fragments are not one subject);
- not part of a subject already chosen: at most `max_overlap` of its area inside one (SAM annotates wholes and
  their parts);
- at most `max_subjects` per image.
Area and box come from the annotation when present (`area`, `bbox`), so only the candidates' masks are decoded.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flexip_core.data import rle
from flexip_core.data.pairs import Pair
from flexip_core.generation.images import load_reference_image

logger = logging.getLogger(__name__)

SOURCE = "sam"


@dataclass(frozen=True)
class SubjectRules:
    """Which instances of an image are subjects (documented in the module docstring)."""

    min_area: float = 0.05  # smallest subject, as a share of the image's pixels
    max_area: float = 0.7  # largest subject share; larger masks are mostly background
    border: float = 0.01  # the subject's box must keep this share of the image's width/height from each edge
    min_fill: float = 0.3  # the mask must cover at least this share of its box
    max_overlap: float = 0.5  # an instance with more of its area inside a chosen subject is a part of it
    max_subjects: int = 1  # subjects (pairs) per image, largest first

    def __post_init__(self):
        if not 0.0 <= self.min_area < self.max_area <= 1.0:
            raise ValueError(f"need 0 <= min_area < max_area <= 1, got {self.min_area}, {self.max_area}")
        if not 0.0 <= self.border < 0.5 or not 0.0 <= self.min_fill <= 1.0 or not 0.0 <= self.max_overlap <= 1.0:
            raise ValueError("border must be in [0, 0.5), min_fill and max_overlap in [0, 1]")
        if self.max_subjects < 1:
            raise ValueError(f"max_subjects must be at least 1, got {self.max_subjects}")


def sam_images(folder: Path) -> list[Path]:
    """Every `*.jpg` under `folder` that has a same-name `.json` beside it, sorted."""
    return sorted(p for p in folder.rglob("*")
                  if p.suffix.lower() in (".jpg", ".jpeg") and p.with_suffix(".json").is_file())


def _box_and_area(annotation: dict, mask: np.ndarray | None) -> tuple[tuple[float, float, float, float], float]:
    """((x, y, w, h), pixels) of an instance: the annotation's own, else measured on its mask."""
    if mask is None and "bbox" in annotation and "area" in annotation:
        x, y, w, h = (float(v) for v in annotation["bbox"])
        return (x, y, w, h), float(annotation["area"])
    rows, cols = np.nonzero(mask)
    if not len(rows):
        return (0.0, 0.0, 0.0, 0.0), 0.0
    return (float(cols.min()), float(rows.min()), float(cols.max() - cols.min() + 1),
            float(rows.max() - rows.min() + 1)), float(len(rows))


def choose_subjects(annotations: list[dict], width: int, height: int,
                    rules: SubjectRules) -> tuple[list[tuple[dict, np.ndarray]], Counter]:
    """The subjects of one image (annotation, (H, W) mask), largest first, and a count of why the others were not."""
    rejected = Counter()
    candidates = []
    for annotation in annotations:
        segmentation = annotation.get("segmentation")
        if not isinstance(segmentation, dict) or "counts" not in segmentation:
            rejected["not an RLE mask (polygons are not read)"] += 1
            continue
        if [int(v) for v in segmentation.get("size", [])] != [height, width]:
            rejected["mask size differs from the image's"] += 1
            continue
        needs_mask = not ("bbox" in annotation and "area" in annotation)
        mask = rle.decode(segmentation) if needs_mask else None
        (x, y, w, h), pixels = _box_and_area(annotation, mask)
        share = pixels / (width * height)
        if share < rules.min_area:
            rejected["too small"] += 1
        elif share > rules.max_area:
            rejected["too large (background)"] += 1
        elif (x < rules.border * width or y < rules.border * height or x + w > (1 - rules.border) * width
              or y + h > (1 - rules.border) * height):
            rejected["touches the border"] += 1
        elif w * h <= 0 or pixels / (w * h) < rules.min_fill:
            rejected["not compact (fills too little of its box)"] += 1
        else:
            candidates.append((pixels, annotation, mask))
    chosen = []
    for pixels, annotation, mask in sorted(candidates, key=lambda c: -c[0]):
        if len(chosen) == rules.max_subjects:
            rejected["beyond max_subjects"] += 1
            continue
        mask = rle.decode(annotation["segmentation"]) if mask is None else mask  # (H, W)
        if any((mask & other).sum() > rules.max_overlap * mask.sum() for _, other in chosen):
            rejected["part of a chosen subject"] += 1
            continue
        chosen.append((annotation, mask))
    return chosen, rejected


def sam_pairs(folder: Path, rules: SubjectRules, summary, part: tuple[int, int] = (0, 1),
              caption_file=None) -> Iterator[Pair]:
    """Invariant pairs of every SAM-layout image under `folder` (its `part` k of n); what is skipped goes to
    `summary` (flexip_core.data.build.Summary). `caption_file(image_path)` gives a caption file's text or None."""
    k, n = part
    for path in sam_images(folder)[k::n]:
        name = str(path.relative_to(folder))
        summary.seen(SOURCE)
        try:
            data = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
            annotations = data["annotations"]
            image = load_reference_image(path)
        except (OSError, ValueError, KeyError, TypeError) as error:
            summary.skip(SOURCE, "unreadable image or annotations", name, error)
            continue
        try:
            chosen, rejected = choose_subjects(annotations, image.width, image.height, rules)
        except ValueError as error:
            summary.skip(SOURCE, "broken mask", name, error)
            continue
        summary.count_instances(SOURCE, rejected)
        if not chosen:
            summary.skip(SOURCE, "no instance fits the subject rules", name)
            continue
        caption = caption_file(path) if caption_file else None
        for annotation, mask in chosen:
            share = float(mask.mean())
            yield Pair(SOURCE, f"{name}#{annotation.get('id', '?')}", "invariant", image, mask=mask, caption=caption,
                       meta={"instance": annotation.get("id"), "area": round(share, 4)})
