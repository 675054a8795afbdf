"""Procedural toy world for FlexIP-mini: subjects (identity) rendered in scenes (prompt edits), numpy + PIL only."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

NATIVE_SIZE = 32  # default side of a rendered image, px
SUPERSAMPLE = 4  # sub-pixels per pixel side; renders are box-filtered down, which anti-aliases edges

# Identity attributes: carried by the reference image, never changed by the prompt.
SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {"red": (220, 40, 40), "yellow": (235, 200, 30), "green": (30, 175, 55), "blue": (40, 80, 220)}
PATTERNS = ("plain", "stripes", "dots", "checker")
# Editable attributes: what a prompt asks for. Backgrounds are pale or grey so bodies always stand out.
BACKGROUNDS = {"white": (245, 245, 245), "gray": (128, 128, 128), "sand": (222, 200, 150), "sky": (160, 200, 235)}
SCALES = {"small": 0.20, "large": 0.28}  # body radius (circle radius), fraction of the image side
POSITIONS = {"left": 0.375, "center": 0.5, "right": 0.625}  # body centre x, fraction of the image side
POSES = {"upright": 1.0, "squashed": 1.2, "stretched": 1 / 1.2}  # horizontal stretch; vertical is its inverse
STYLES = ("flat", "outlined", "shadowed")

IDENTITY_ATTRIBUTES = {"shape": SHAPES, "colour": tuple(COLOURS), "pattern": PATTERNS}
EDITABLE_ATTRIBUTES = {
    "background": tuple(BACKGROUNDS),
    "scale": tuple(SCALES),
    "position": tuple(POSITIONS),
    "pose": tuple(POSES),
    "style": STYLES,
}
# What a prompt may ask for: the editable attributes and, to recolour the subject, its colour.
REQUESTABLE_ATTRIBUTES = {**EDITABLE_ATTRIBUTES, "colour": tuple(COLOURS)}
SPLITS = ("train", "heldout", "all")
NEUTRAL_BACKGROUND = "white"  # background of an invariant pair's cut-out reference

PATTERN_SHADE = 0.45  # pattern colour = body colour times this (same hue, darker)
INK = (20, 20, 20)  # outline and drop-shadow colour
OUTLINE_WIDTH = 0.08  # outline thickness, fraction of the image side
SHADOW_OFFSET = 0.08  # drop-shadow offset down and right, fraction of the image side
STAR_INNER = 0.5  # inner / outer radius of the five-pointed star
SHAPE_REACH = {"circle": 1.0, "square": 1.2, "triangle": 1.25, "star": 1.15}  # circumradius / body radius
PATTERN_TILES = 8  # patterns repeat on a grid of this many tiles per image side, fixed to the image (not the body)
DOT_RADIUS = 0.3  # dot radius, in tiles (one dot per tile)

_POSITION_PHRASES = {"left": "on the left", "center": "in the center", "right": "on the right"}
_PATTERN_WORDS = {"plain": "plain", "stripes": "striped", "dots": "dotted", "checker": "checkered"}
_SYNONYMS = {
    "big": ("scale", "large"), "tiny": ("scale", "small"), "centre": ("position", "center"),
    "middle": ("position", "center"), "grey": ("background", "gray"), "beige": ("background", "sand"),
    "outline": ("style", "outlined"), "shadow": ("style", "shadowed"), "wide": ("pose", "squashed"),
    "tall": ("pose", "stretched"),
}


def _check(kind: str, name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{kind} {name}={value!r} is unknown; choose one of {', '.join(allowed)}")


@dataclass(frozen=True)
class Subject:
    shape: str  # body outline, one of SHAPES
    colour: str  # body colour name, a key of COLOURS
    pattern: str  # darker texture on the body, one of PATTERNS

    def __post_init__(self):
        for name, allowed in IDENTITY_ATTRIBUTES.items():
            _check("subject", name, getattr(self, name), allowed)

    @property
    def id(self) -> str:
        """Stable identifier, e.g. 'star-red-stripes'."""
        return f"{self.shape}-{self.colour}-{self.pattern}"


@dataclass(frozen=True)
class Scene:
    background: str  # uniform backdrop colour name, a key of BACKGROUNDS
    scale: str  # body size, a key of SCALES
    position: str  # horizontal placement, a key of POSITIONS
    pose: str  # squash-and-stretch deformation, a key of POSES
    style: str  # rendering style, one of STYLES

    def __post_init__(self):
        for name, allowed in EDITABLE_ATTRIBUTES.items():
            _check("scene", name, getattr(self, name), allowed)


@dataclass(frozen=True)
class Pair:
    subject: Subject  # who both images show
    target: Scene  # scene of the image to generate; the caption describes it
    reference: Scene  # scene of the reference image
    modality: str  # "invariant" (reference = target or its cut-out) or "variant" (another scene)


def _is_heldout(subject: Subject) -> bool:
    """Held out: a quarter of identity combinations; every pair of their values still occurs in training."""
    index = sum(values.index(getattr(subject, name)) for name, values in IDENTITY_ATTRIBUTES.items())
    return index % 4 == 0


def subjects_in(split: str) -> list[Subject]:
    """All subjects of a split, in a fixed order."""
    _check("split", "split", split, SPLITS)
    every = [Subject(s, c, p) for s in SHAPES for c in COLOURS for p in PATTERNS]
    if split == "all":
        return every
    return [s for s in every if _is_heldout(s) == (split == "heldout")]


def sample_subjects(n: int, seed: int, split: str = "train") -> list[Subject]:
    """n subjects of a split: a seeded permutation, repeated when n exceeds the split's size."""
    pool = subjects_in(split)
    rng = np.random.default_rng((seed, 1))
    order = np.concatenate([rng.permutation(len(pool)) for _ in range(-(-n // len(pool)))]) if n > 0 else []
    return [pool[i] for i in order[:n]]


def sample_scene(rng: np.random.Generator) -> Scene:
    """A uniformly random scene."""
    return Scene(**{name: values[rng.integers(len(values))] for name, values in EDITABLE_ATTRIBUTES.items()})


def cutout_scene(scene: Scene) -> Scene:
    """The subject alone, in place, on the neutral background (an invariant pair's masked reference)."""
    return Scene(NEUTRAL_BACKGROUND, scene.scale, scene.position, scene.pose, "flat")


def sample_pairs(
    n: int, seed: int, split: str = "train", invariant_fraction: float = 0.5, cutout_fraction: float = 0.5
) -> list[Pair]:
    """Training pairs; invariant ones use the target itself or, with cutout_fraction, its cut-out."""
    rng = np.random.default_rng((seed, 2))
    pairs = []
    for subject in sample_subjects(n, seed, split):
        target = sample_scene(rng)
        if rng.random() < invariant_fraction:
            reference = cutout_scene(target) if rng.random() < cutout_fraction else target
            pairs.append(Pair(subject, target, reference, "invariant"))
            continue
        reference = sample_scene(rng)
        while reference == target:
            reference = sample_scene(rng)
        pairs.append(Pair(subject, target, reference, "variant"))
    return pairs


def layout(scene: Scene, size: int) -> tuple[tuple[float, float], float, tuple[float, float]]:
    """Body centre (x, y) and radius in px, and (x, y) stretch, for a scene at this image size."""
    stretch = POSES[scene.pose]
    return (POSITIONS[scene.position] * size, size / 2), SCALES[scene.scale] * size, (stretch, 1 / stretch)


def _vertices(shape: str) -> np.ndarray:
    """Polygon vertices (k, 2) at body radius 1, y up: square axis-aligned, triangle and star pointing up."""
    if shape == "star":
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, STAR_INNER)
    else:
        n, start = {"square": (4, np.pi / 4), "triangle": (3, np.pi / 2)}[shape]
        angles, radii = start + np.arange(n) * 2 * np.pi / n, np.ones(n)
    return SHAPE_REACH[shape] * np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def shape_area(shape: str) -> float:
    """Area of a shape at body radius 1 (shoelace formula for polygons)."""
    if shape == "circle":
        return float(np.pi)
    x, y = _vertices(shape).T
    return float(0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of local points (u, v) inside the shape (even-odd crossing test for polygons)."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    inside = np.zeros(u.shape, bool)
    verts = _vertices(shape)
    for (x0, y0), (x1, y1) in zip(verts, np.roll(verts, 1, axis=0)):
        if y0 == y1:
            continue
        crosses = (y0 > v) != (y1 > v)
        inside ^= crosses & (u < x0 + (v - y0) * (x1 - x0) / (y1 - y0))
    return inside


def _pattern(pattern: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Boolean mask of the darker pattern at image coordinates (a, b) in tiles: every tile holds the same motif."""
    if pattern == "stripes":  # a horizontal band across the upper half of each tile
        return np.mod(b, 1.0) < 0.5
    if pattern == "checker":  # four squares per tile
        return (np.floor(2 * a) + np.floor(2 * b)) % 2 == 0
    if pattern == "dots":  # one dot in the middle of each tile
        return (np.mod(a, 1.0) - 0.5) ** 2 + (np.mod(b, 1.0) - 0.5) ** 2 <= DOT_RADIUS**2
    return np.zeros(a.shape, bool)


def _local(size: int, centre, radius: float, stretch, supersample: int) -> tuple[np.ndarray, np.ndarray]:
    """Local body coordinates (u, v), y up, in body radii, of every sub-pixel centre."""
    c = (np.arange(size * supersample) + 0.5) / supersample
    x, y = np.meshgrid(c, c)  # (n, n) in px
    return (x - centre[0]) / (radius * stretch[0]), (centre[1] - y) / (radius * stretch[1])


def shape_coverage(shape: str, size: int, centre, radius: float, stretch=(1.0, 1.0)) -> np.ndarray:
    """Fraction (size, size) of each pixel covered by the body; the oracle's template."""
    inside = _inside(shape, *_local(size, centre, radius, stretch, SUPERSAMPLE))
    return inside.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of a 2-D mask by a disk of integer radius (row-wise sliding windows)."""
    if radius <= 0:
        return mask.copy()
    h, w = mask.shape
    padded = np.pad(mask, radius).astype(np.int32)
    csum = np.concatenate([np.zeros((h + 2 * radius, 1), np.int32), padded.cumsum(axis=1)], axis=1)
    cols = np.arange(w) + radius
    out = np.zeros_like(mask, dtype=bool)
    for dy in range(-radius, radius + 1):
        half = int(np.sqrt(radius * radius - dy * dy))
        rows = csum[radius + dy : radius + dy + h]
        out |= rows[:, cols + half + 1] - rows[:, cols - half] > 0
    return out


def render(subject: Subject, scene: Scene, size: int = NATIVE_SIZE) -> Image.Image:
    """Draw a subject in a scene as a size x size RGB image (deterministic, anti-aliased)."""
    if size < 16:
        raise ValueError(f"image size {size} is too small to show the attributes; use 16 px or more")
    centre, radius, stretch = layout(scene, size)
    u, v = _local(size, centre, radius, stretch, SUPERSAMPLE)
    body = _inside(subject.shape, u, v)  # (n, n) sub-pixels
    canvas = np.empty(body.shape + (3,), np.float32)
    canvas[:] = BACKGROUNDS[scene.background]
    if scene.style == "outlined":
        canvas[dilate(body, round(OUTLINE_WIDTH * size * SUPERSAMPLE))] = INK
    elif scene.style == "shadowed":
        k = round(SHADOW_OFFSET * size * SUPERSAMPLE)
        shadow = np.zeros_like(body)
        shadow[k:, k:] = body[:-k, :-k]
        canvas[shadow] = INK
    colour = np.array(COLOURS[subject.colour], np.float32)
    canvas[body] = colour
    tiles = (np.arange(size * SUPERSAMPLE) + 0.5) / (SUPERSAMPLE * size / PATTERN_TILES)
    a, b = np.meshgrid(tiles, tiles)
    canvas[body & _pattern(subject.pattern, a, b)] = colour * PATTERN_SHADE
    pixels = canvas.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return Image.fromarray(np.round(pixels).astype(np.uint8), "RGB")


def _describe(scene: Scene, noun: str) -> str:
    return (
        f"a {scene.scale}, {scene.pose} {noun} {_POSITION_PHRASES[scene.position]}, "
        f"on a {scene.background} background, {scene.style} style"
    )


def prompt_for(scene: Scene, colour: str | None = None) -> str:
    """Prompt asking for a scene, e.g. 'a small, squashed toy on the left, on a sand background, flat style'; with
    `colour` it also asks to recolour the subject ('... squashed blue toy ...'), an edit that costs identity."""
    if colour is not None:
        _check("prompt", "colour", colour, tuple(COLOURS))
    return _describe(scene, f"{colour} toy" if colour else "toy")


def caption(subject: Subject, scene: Scene, with_identity: bool = False) -> str:
    """Caption of a render; it names the identity ('red striped star') only when with_identity is set."""
    if not with_identity:
        return prompt_for(scene)
    return _describe(scene, f"{subject.colour} {_PATTERN_WORDS[subject.pattern]} {subject.shape}")


_VOCABULARY = {value: (name, value) for name, values in REQUESTABLE_ATTRIBUTES.items() for value in values} | _SYNONYMS
# Every word the captions use: all that a text encoder trained on them (FlexIP-mini's) has learnt.
CAPTION_WORDS = frozenset({"a", "toy", "on", "the", "in", "background", "style", *SHAPES, *COLOURS,
                           *_PATTERN_WORDS.values(), *(w for values in EDITABLE_ATTRIBUTES.values() for w in values)})


def parse_prompt(text: str) -> dict[str, str]:
    """Attributes a prompt requests (first mention wins): the editable ones it names and, when it names a colour,
    the subject's colour (a recolouring edit); attributes it does not name are absent."""
    requested: dict[str, str] = {}
    for word in re.findall(r"[a-z]+", text.lower()):
        if word in _VOCABULARY:
            name, value = _VOCABULARY[word]
            requested.setdefault(name, value)
    return requested


def unknown_words_note(text: str, what: str = "prompt") -> str | None:
    """None when every word of `text` is one the captions use; else a note naming the others (a model trained on
    the world has never seen them), with the caption's word for a synonym ('grey' -> gray), and the words it knows."""
    unknown = dict.fromkeys(w for w in re.findall(r"[a-z]+", text.lower()) if w not in CAPTION_WORDS)
    if not unknown:
        return None
    named = ", ".join(f"{w} (say {_SYNONYMS[w][1]})" if w in _SYNONYMS else w for w in unknown)
    knows = "; ".join(f"{name} {', '.join(values)}" for name, values in REQUESTABLE_ATTRIBUTES.items())
    return f"left out of the {what}, as the toy-world model has never seen them: {named}. Its words: {knows}"


def known_words(text: str) -> str:
    """`text` with the words the captions never use left out, and the commas the captions have kept between the
    rest: 'a toy in a snowy forest, on a sky background' -> 'a toy in a, on a sky background'."""
    kept: list[str] = []
    for token in re.findall(r"[a-z]+|,", text.lower()):
        if token in CAPTION_WORDS or (token == "," and kept and kept[-1] != ","):
            kept.append(token)
    while kept and kept[-1] == ",":
        kept.pop()
    return " ".join(kept).replace(" ,", ",")


def write_dataset(
    out_dir: str | Path, n_pairs: int, seed: int, split: str = "train", size: int = NATIVE_SIZE
) -> Path:
    """Render pairs to PNGs under out_dir/images and write out_dir/manifest.jsonl; returns the manifest path.

    One record per pair: target, reference (paths relative to out_dir), caption, modality, subject (with id),
    scene (of the target) and reference_scene.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    manifest = out_dir / "manifest.jsonl"
    with manifest.open("w") as f:
        for i, pair in enumerate(sample_pairs(n_pairs, seed, split)):
            target = f"images/{i:06d}_target.png"
            render(pair.subject, pair.target, size).save(out_dir / target)
            reference = target  # an invariant pair whose reference is the target itself shares the file
            if pair.reference != pair.target:
                reference = f"images/{i:06d}_reference.png"
                render(pair.subject, pair.reference, size).save(out_dir / reference)
            record = {
                "target": target,
                "reference": reference,
                "caption": caption(pair.subject, pair.target),
                "modality": pair.modality,
                "subject": {"id": pair.subject.id, **asdict(pair.subject)},
                "scene": asdict(pair.target),
                "reference_scene": asdict(pair.reference),
            }
            f.write(json.dumps(record) + "\n")
    logger.info("wrote %d %s pairs of %d px to %s", n_pairs, split, size, manifest)
    return manifest
