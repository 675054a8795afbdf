"""Build a training manifest (JSONL, see flexip_core.training.data) from folders of images.

    python -m flexip_core.training.manifest --captioned DIR --multiview DIR --out manifest.jsonl

- `--captioned DIR`: images with a same-name `.txt` caption (`cat.png` + `cat.txt`) -> invariant records,
  reference = target (cut out by `NAME_mask.png` when present; FLEXIP_SPEC "modality-aware training").
- `--multiview DIR`: one sub-folder per subject holding its views or video frames -> variant records whose
  reference is another frame of the same subject. A frame's caption is its own `.txt`, else the folder's
  `caption.txt`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

from flexip_core.cli import output_file
from flexip_core.training.data import MODALITIES

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MASK_SUFFIX = "_mask"  # NAME_mask.png is the subject mask of NAME.png, never an image of its own
FOLDER_CAPTION = "caption.txt"  # caption shared by every frame of a multiview subject folder


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.stem.endswith(MASK_SUFFIX))


def _read_caption(path: Path) -> str | None:
    if not path.is_file():
        return None
    text = " ".join(path.read_text(encoding="utf-8", errors="replace").split())
    return text or None


def _mask_for(image: Path) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        candidate = image.with_name(f"{image.stem}{MASK_SUFFIX}{suffix}")
        if candidate.is_file():
            return candidate
    return None


def captioned_records(folder: Path) -> tuple[list[dict], list[str]]:
    """Invariant records (absolute paths) from a folder of captioned images, and the files skipped."""
    records, skipped = [], []
    for image in _images(folder):
        caption = _read_caption(image.with_suffix(".txt"))
        if caption is None:
            skipped.append(f"{image}: no caption ({image.with_suffix('.txt').name} missing or empty)")
            continue
        record = {"target": str(image), "reference": str(image), "caption": caption, "modality": "invariant"}
        mask = _mask_for(image)
        if mask is not None:
            record["mask"] = str(mask)
        records.append(record)
    return records, skipped


def multiview_records(folder: Path, pairs_per_frame: int = 1, seed: int = 0) -> tuple[list[dict], list[str]]:
    """Variant records (absolute paths): each frame as a target with `pairs_per_frame` other frames as references."""
    if pairs_per_frame < 1:
        raise ValueError(f"pairs_per_frame must be at least 1, got {pairs_per_frame}")
    records, skipped = [], []
    rng = np.random.default_rng(seed)
    for subject in sorted(p for p in folder.iterdir() if p.is_dir()):
        frames = _images(subject)
        if len(frames) < 2:
            skipped.append(f"{subject}: {len(frames)} frame(s); a multiview subject needs at least 2")
            continue
        shared = _read_caption(subject / FOLDER_CAPTION)
        for i, target in enumerate(frames):
            caption = _read_caption(target.with_suffix(".txt")) or shared
            if caption is None:
                skipped.append(f"{target}: no caption ({target.with_suffix('.txt').name} and {FOLDER_CAPTION} missing)")
                continue
            others = [j for j in range(len(frames)) if j != i]
            chosen = rng.choice(others, size=min(pairs_per_frame, len(others)), replace=False)
            for j in sorted(int(c) for c in chosen):
                records.append({"target": str(target), "reference": str(frames[j]), "caption": caption,
                                "modality": "variant"})
    return records, skipped


def write_manifest(records: list[dict], out: str | Path) -> Path:
    """Write records with paths relative to the manifest's folder (so the folder can move as a whole)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    root = out.parent.resolve()
    with out.open("w", encoding="utf-8") as handle:
        for record in records:
            relative = {k: os.path.relpath(Path(v).resolve(), root) if k in ("target", "reference", "mask") else v
                        for k, v in record.items()}
            handle.write(json.dumps(relative) + "\n")
    return out


def build_manifest(out: str | Path, captioned: str | Path | None = None, multiview: str | Path | None = None,
                   pairs_per_frame: int = 1, seed: int = 0) -> tuple[Path, dict[str, int], list[str]]:
    """Records from both kinds of folder written to `out`; returns (path, counts per modality, skipped)."""
    if captioned is None and multiview is None:
        raise ValueError("give --captioned DIR, --multiview DIR or both")
    records, skipped = [], []
    for folder, build in ((captioned, captioned_records),
                          (multiview, lambda f: multiview_records(f, pairs_per_frame, seed))):
        if folder is None:
            continue
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"folder not found: {folder}")
        found, missed = build(folder)
        records += found
        skipped += missed
    for message in skipped:
        logger.warning("skipped %s", message)
    if not records:
        raise ValueError("no record could be made: " + ("; ".join(skipped[:3]) or "the folders hold no images"))
    path = write_manifest(records, out)
    counts = {m: sum(r["modality"] == m for r in records) for m in MODALITIES}
    logger.info("wrote %s: %d invariant, %d variant records (%d skipped)", path, counts["invariant"],
                counts["variant"], len(skipped))
    return path, counts, skipped


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m flexip_core.training.manifest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captioned", help="folder of images with same-name .txt captions (invariant records)")
    parser.add_argument("--multiview", help="folder with one sub-folder of views/frames per subject (variant records)")
    parser.add_argument("--out", type=output_file(".jsonl"), required=True, help="manifest to write (.jsonl)")
    parser.add_argument("--pairs-per-frame", type=int, default=1, help="references drawn per target frame")
    parser.add_argument("--seed", type=int, default=0, help="seed of the reference-frame draw")
    args = parser.parse_args(argv)
    try:
        build_manifest(args.out, args.captioned, args.multiview, args.pairs_per_frame, args.seed)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
