"""COCO run-length encoded masks (the format of SA-1B's and COCO's instance masks), in numpy.

A mask of height H and width W is read column by column (Fortran order); `counts` alternate runs of 0s and 1s,
starting with 0s. The compressed form is the string of pycocotools' maskApi.c (rleToString / rleFrString): each
count, after the third stored as the difference from the count two before it, in 5-bit groups, least significant
first, 0x20 marking that more groups follow, each group plus 48 as one ASCII character.

Not pycocotools: its C decoder writes as many pixels as the counts say, past the mask for counts that cover more
than H x W (a damaged annotation file); here such counts are refused. The tests check the encoding against it.
"""
from __future__ import annotations

import numpy as np


def decode_counts(text: str | bytes) -> list[int]:
    """Run lengths of a compressed RLE string (rleFrString)."""
    data = text.encode("ascii") if isinstance(text, str) else bytes(text)
    counts, p = [], 0
    while p < len(data):
        x, k, more = 0, 0, True
        while more:
            if p >= len(data):
                raise ValueError("RLE string ends inside a count")
            c = data[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)  # sign extension
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def encode_counts(counts: list[int]) -> str:
    """The compressed RLE string of run lengths (rleToString)."""
    out = bytearray()
    for i, count in enumerate(counts):
        x = int(count) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            out.append(c + 48)
    return out.decode("ascii")


def decode(rle: dict) -> np.ndarray:
    """(H, W) boolean mask from {"size": [H, W], "counts": str or list of ints}."""
    try:
        height, width = (int(v) for v in rle["size"])
        counts = rle["counts"]
    except (KeyError, TypeError, ValueError):
        raise ValueError("an RLE mask needs 'size': [height, width] and 'counts'") from None
    runs = decode_counts(counts) if isinstance(counts, (str, bytes)) else [int(c) for c in counts]
    if any(r < 0 for r in runs) or sum(runs) != height * width:
        raise ValueError(f"RLE counts cover {sum(runs)} pixels, not {height}x{width} = {height * width}")
    values = np.zeros(len(runs), dtype=bool)
    values[1::2] = True  # runs alternate 0s, 1s, starting with 0s
    flat = np.repeat(values, runs)  # (H * W,) column by column
    return flat.reshape(width, height).T  # (H, W)


def encode(mask: np.ndarray) -> dict:
    """{"size": [H, W], "counts": compressed string} of an (H, W) boolean mask."""
    mask = np.asarray(mask, dtype=bool)
    flat = mask.T.reshape(-1)  # (H * W,) column by column
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0] + runs  # the first run counts 0s
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": encode_counts(runs)}


def area(rle: dict) -> int:
    """Pixels in the mask, from its counts alone."""
    counts = rle["counts"]
    runs = decode_counts(counts) if isinstance(counts, (str, bytes)) else list(counts)
    return int(sum(runs[1::2]))
