"""Variant pairs from videos (OpenVid-1M, CelebV-HQ, VFHQ, Pexels clips: one subject per clip), decoded with PyAV,
after FlexIP's deformation data: a frame is the reference, a frame `gap` seconds later the target.

Each video gives `pairs_per_video` pairs spread over its length. Two checks on a 32x32 grey thumbnail of each
pair (FrameRules) stand in for "the same subject, moved": a mean absolute change below `min_change` means the two
frames are the same picture (nothing to learn about deformation), above `max_change` most likely a cut to
another shot (not the same subject).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from flexip_core.data.pairs import Pair

SOURCE = "video"
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v")


@dataclass(frozen=True)
class FrameRules:
    """Which frames of a video make a pair (documented in the module docstring)."""

    gap: float = 1.0  # seconds from the reference frame to the target frame
    pairs_per_video: int = 1  # pairs per video, spread over its length
    min_change: float = 0.02  # thumbnails closer than this (mean absolute difference, 0-1): the same picture
    max_change: float = 0.3  # thumbnails further apart than this: a cut to another shot

    def __post_init__(self):
        if self.gap <= 0 or self.pairs_per_video < 1 or not 0.0 <= self.min_change < self.max_change <= 1.0:
            raise ValueError("need gap > 0, pairs_per_video >= 1 and 0 <= min_change < max_change <= 1, got "
                             f"{self.gap}, {self.pairs_per_video}, {self.min_change}, {self.max_change}")


def video_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)


def frame_times(duration: float, rules: FrameRules) -> list[tuple[float, float]]:
    """(reference, target) times in seconds, the references spread evenly over [0, duration - gap]."""
    span = duration - rules.gap
    if span < 0:
        return []
    count = rules.pairs_per_video
    return [(round(span * (k + 0.5) / count, 3), round(span * (k + 0.5) / count + rules.gap, 3)) for k in range(count)]


def pair_frames(path: Path, rules: FrameRules) -> tuple[float | None, list[tuple[float, float]], dict]:
    """(duration in seconds or None when the video does not say, frame_times, {time: the first frame at or after
    it}), from one pass of decoding that stops at the last frame wanted."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        duration = None
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        times = frame_times(duration, rules) if duration is not None else []
        wanted, found = sorted({t for pair in times for t in pair}), {}
        if wanted:
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                while wanted and frame.time >= wanted[0] - 1e-6:
                    found[wanted.pop(0)] = frame.to_image()  # RGB
                if not wanted:
                    break
    return duration, times, found


def change(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute difference of 32x32 grey thumbnails, 0 (same) to 1."""
    def thumb(image):
        return np.asarray(image.convert("L").resize((32, 32), Image.BILINEAR), dtype=np.float32) / 255.0

    return float(np.abs(thumb(a) - thumb(b)).mean())


def video_pairs(root: Path, rules: FrameRules, summary, part: tuple[int, int] = (0, 1),
                caption_file=None) -> Iterator[Pair]:
    """Variant pairs of every video under `root` (its `part` k of n); skips go to `summary`."""
    import av

    k, n = part
    for path in video_files(root)[k::n]:
        name = str(path.relative_to(root))
        summary.seen(SOURCE)
        try:
            duration, times, frames = pair_frames(path, rules)
        except (av.FFmpegError, OSError, ValueError) as error:
            summary.skip(SOURCE, "unreadable video", name, error)
            continue
        if duration is None:
            summary.skip(SOURCE, "duration unknown", name)
            continue
        if not times:
            summary.skip(SOURCE, "shorter than the frame gap", name, f"{duration:.2f} s < {rules.gap} s")
            continue
        caption = caption_file(path) if caption_file else None
        for t_ref, t_target in times:
            if t_ref not in frames or t_target not in frames:
                summary.skip(SOURCE, "frame past the last decoded one", f"{name}@{t_ref}-{t_target}s")
                continue
            reference, target = frames[t_ref], frames[t_target]
            moved = change(reference, target)
            if moved < rules.min_change:
                summary.skip(SOURCE, "frames nearly identical (no motion)", f"{name}@{t_ref}-{t_target}s")
                continue
            if moved > rules.max_change:
                summary.skip(SOURCE, "frames too different (a cut?)", f"{name}@{t_ref}-{t_target}s")
                continue
            yield Pair(SOURCE, f"{name}@{t_ref}-{t_target}s", "variant", target, reference=reference,
                       caption=caption, meta={"reference_time": t_ref, "target_time": t_target,
                                              "change": round(moved, 4)})
