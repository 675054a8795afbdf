"""Files the studio hands out: each result as a PNG carrying its `parameters` chunk, and sweeps as a zip."""
from __future__ import annotations

import logging
import time
import uuid
import zipfile
from pathlib import Path

from PIL import Image

from flexip_core.generation.metadata import save_png

logger = logging.getLogger(__name__)


def save_result(image: Image.Image, parameters: dict, folder: Path, stem: str = "flexip") -> str:
    """Write `image` as a PNG with the A1111-style parameters chunk; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    gate = parameters.get("gate")
    seed = parameters.get("seed")
    label = f"-g{float(gate):.2f}" if isinstance(gate, (int, float)) else ""
    label += f"-s{seed}" if seed is not None else ""
    path = folder / f"{stem}{label}-{uuid.uuid4().hex[:8]}.png"
    save_png(image, path, parameters)
    return str(path)


def prune(folder: Path, max_age_s: float) -> int:
    """Delete files under `folder` older than `max_age_s` seconds (Gradio's cache forgets its copies as fast)."""
    cutoff = time.time() - max_age_s
    removed = 0
    for path in folder.rglob("*"):
        if path.is_file() and path.stat().st_mtime < cutoff:
            path.unlink(missing_ok=True)
            removed += 1
    if removed:
        logger.info("removed %d files older than %.0f h from %s", removed, max_age_s / 3600, folder)
    return removed


def zip_results(paths: list[str], folder: Path, stem: str = "flexip-sweep") -> str:
    """Bundle result PNGs (chunks intact) into one zip; returns its path."""
    if not paths:
        raise ValueError("nothing to download yet; run a sweep or a grid first")
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{stem}-{uuid.uuid4().hex[:8]}.zip"
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED) as archive:  # PNGs are compressed already
        for index, path in enumerate(paths):
            archive.write(path, arcname=f"{index:02d}-{Path(path).name}")
    return str(target)
