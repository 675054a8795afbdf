"""Variant pairs from multi-view folders (MVImageNet, CO3D: one folder per object holding its views), after FlexIP's
deformation data: one view is the reference, another view of the same object the target, captioned as the target.

An object folder is any folder directly holding at least two images; folders of masks and depths (`masks`,
`depths`, `depth_masks`, ...) are not objects. When a sibling folder `masks/` holds a same-name PNG for the
reference view (CO3D's layout: `seq/images/frame01.jpg`, `seq/masks/frame01.png`), the reference is cut out by it.
Views are sorted by name (capture order); the target is drawn at least `min_gap` views away from the reference,
so that the pair shows the object from clearly different sides.
"""
from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from flexip_core.data.pairs import Pair
from flexip_core.generation.images import load_reference_image, open_image
from flexip_core.training.data import mask_array

SOURCE = "multiview"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
NOT_VIEWS = {"masks", "mask", "depths", "depth", "depth_masks", "sparse", "segmentation", "segmentations"}
FOLDER_CAPTION = "caption.txt"  # one caption for every view of an object (else each view's own .txt)


def _views(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def object_folders(root: Path) -> list[Path]:
    """Every folder under `root` (itself included) that directly holds images, masks and depths excepted, sorted."""
    found = []
    for folder in sorted([root, *(p for p in root.rglob("*") if p.is_dir())]):
        if any(part.lower() in NOT_VIEWS for part in folder.relative_to(root).parts):
            continue
        if _views(folder):
            found.append(folder)
    return found


def view_mask(view: Path) -> Path | None:
    """CO3D's mask of a view: ../masks/STEM.png beside the views' folder."""
    candidate = view.parent.parent / "masks" / f"{view.stem}.png"
    return candidate if candidate.is_file() else None


def draw_pairs(count: int, pairs: int, min_gap: int, seed: int, name: str) -> list[tuple[int, int]]:
    """(reference, target) view indices, distinct, at least `min_gap` apart, drawn from (seed, the object's name)."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    options = [(r, t) for r in range(count) for t in range(count) if abs(r - t) >= max(1, min_gap)]
    if not options:
        return []
    chosen = rng.choice(len(options), size=min(pairs, len(options)), replace=False)
    return [options[i] for i in sorted(chosen)]


def multiview_pairs(root: Path, summary, *, pairs_per_object: int = 2, min_gap: int = 1, seed: int = 0,
                    part: tuple[int, int] = (0, 1), caption_file=None) -> Iterator[Pair]:
    """Variant pairs of every object folder under `root` (its `part` k of n); skips go to `summary`."""
    k, n = part
    for folder in object_folders(root)[k::n]:
        name = str(folder.relative_to(root)) if folder != root else root.name
        summary.seen(SOURCE)
        views = _views(folder)
        if len(views) < 2:
            summary.skip(SOURCE, "fewer than 2 views", name)
            continue
        chosen = draw_pairs(len(views), pairs_per_object, min_gap, seed, name)
        if not chosen:
            summary.skip(SOURCE, f"no two views {min_gap} apart", name)
            continue
        shared = _text(folder / FOLDER_CAPTION)
        for r, t in chosen:
            try:
                reference, target = load_reference_image(views[r]), load_reference_image(views[t])
                mask_path = view_mask(views[r])
                mask = None
                if mask_path is not None:
                    mask = mask_array(open_image(mask_path), reference.size, mask_path.name)
            except (OSError, ValueError) as error:
                summary.skip(SOURCE, "unreadable view or mask", f"{name}: {views[r].name}, {views[t].name}", error)
                continue
            caption = (caption_file(views[t]) if caption_file else None) or shared
            yield Pair(SOURCE, f"{name}:{views[r].stem}->{views[t].stem}", "variant", target, reference=reference,
                       mask=mask, caption=caption, meta={"reference_view": views[r].name, "target_view": views[t].name})


def _text(path: Path) -> str | None:
    if not path.is_file():
        return None
    return " ".join(path.read_text(encoding="utf-8", errors="replace").split()) or None
