"""Slider calibration: a gate curve on which equal steps of γ move the identity/prompt trade-off by equal shares.

Scores are measured at points along a path through the branch weights (w_pres, w_pers), from the prompt end to
the identity end; each score's change is turned into a monotone share of its whole change, the slider's progress
is accumulated from them, and the curve is that progress inverted (an inverse-CDF reparametrisation, as in
histogram equalisation), between the ends where the scores saturate. The command is
`python -m flexip_core.calibrate` (flexip_core/calibrate.py); FlexIP-mini's build uses the same inversion.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image

from flexip_core.generation.gate import GateCurve
from flexip_core.generation.settings import MAX_BATCH, Generation

logger = logging.getLogger(__name__)

MIX = 0.02  # share of the path position mixed into the progress, so that it increases strictly and can be inverted


# --- the path and the grid on it -----------------------------------------------------------------
@dataclass(frozen=True)
class WeightPath:
    """A straight path through the branch weights: position 0 at `start` (the prompt end), 1 at `end`."""

    start: tuple[float, float] = (0.0, 1.0)  # (w_pres, w_pers) at position 0
    end: tuple[float, float] = (1.0, 0.0)  # (w_pres, w_pers) at position 1

    def weights(self, position: float) -> tuple[float, float]:
        return tuple(float(a + position * (b - a)) for a, b in zip(self.start, self.end))


def grid(points: int) -> tuple[float, ...]:
    """`points` positions in [0, 1], denser toward both ends (cosine spacing), where a score usually sets in or
    saturates; 0 and 1 included."""
    if points < 3:
        raise ValueError(f"measure at least 3 points along the path, got {points}")
    k = np.arange(points)
    return tuple(round(float(x), 6) for x in (1 - np.cos(np.pi * k / (points - 1))) / 2)


def check_grid(positions) -> tuple[float, ...]:
    """Positions sorted, without repeats, with both ends added; a ValueError when one lies outside [0, 1]."""
    values = sorted({0.0, 1.0, *(float(p) for p in positions)})
    if values[0] < 0.0 or values[-1] > 1.0:
        raise ValueError(f"path positions must lie in [0, 1], got {values[0]:g} .. {values[-1]:g}")
    return tuple(values)


# --- what was measured ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Measurement:
    """Scores per sample (subject, prompt, seed) at every position of the path."""

    positions: tuple[float, ...]  # path positions, increasing from 0 to 1
    path: WeightPath  # where each position lies in the branch weights
    identity: dict[str, np.ndarray]  # identity metric -> (samples, positions), rising toward position 1
    prompt: dict[str, np.ndarray]  # prompt metric -> (samples, positions), falling toward position 1

    def means(self) -> dict[str, np.ndarray]:
        """Metric -> (positions,) mean over the samples (samples without a score skipped)."""
        return {name: np.nanmean(values, axis=0) for name, values in {**self.identity, **self.prompt}.items()}

    def noise(self) -> dict[str, float]:
        """Metric -> the mean standard error of its means (0 with one sample)."""
        out = {}
        for name, values in {**self.identity, **self.prompt}.items():
            counts = np.sum(~np.isnan(values), axis=0)
            spread = np.nanstd(values, axis=0, ddof=1) if values.shape[0] > 1 else np.zeros(values.shape[1])
            out[name] = float(np.nanmean(np.where(counts > 1, spread / np.sqrt(np.maximum(counts, 1)), 0.0)))
        return out

    def rows(self) -> list[dict]:
        """One dict per position: the position, its branch weights, each metric's mean and standard error."""
        means, rows = self.means(), []
        for k, position in enumerate(self.positions):
            w_pres, w_pers = self.path.weights(position)
            row = dict(position=position, w_pres=round(w_pres, 6), w_pers=round(w_pers, 6))
            for name, values in {**self.identity, **self.prompt}.items():
                column = values[:, k][~np.isnan(values[:, k])]
                row[name] = round(float(means[name][k]), 6)
                sem = column.std(ddof=1) / np.sqrt(len(column)) if len(column) > 1 else 0.0
                row[f"{name}_sem"] = round(float(sem), 6)
            rows.append(row)
        return rows


@dataclass(frozen=True)
class Calibration:
    """The calibrated curve and what decided it."""

    curve: GateCurve  # γ -> branch weights
    low: float  # path position at γ = 0: below it no score moves by more than the saturation share of its change
    high: float  # path position at γ = 1: above it no score moves by more than the saturation share of its change
    moved: dict[str, bool]  # metric -> whether it changed by more than its noise (only those that did count)
    predicted: dict[str, float] = field(default_factory=dict)  # metric -> jump ratio the measurement predicts at
    #   evenly spaced γ on the new curve (largest step over mean step; 1 = even)

    def record(self) -> dict:
        return dict(low=self.low, high=self.high, moved=self.moved,
                    predicted_jump_ratio={k: round(v, 3) for k, v in self.predicted.items()})


# --- measuring ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """One subject with one prompt: what a row of the measurement renders (once per seed)."""

    subject: str  # the subject's name (its folder)
    photos: tuple[Image.Image, ...]  # its photos: the first `condition_images` condition the adapters, all are scored
    prompt: str  # the prompt the model gets
    scored_prompt: str  # the prompt its prompt score compares with (DreamBench's unique token left out)


class MetricScores:
    """DreamBench's metrics (flexip_core.evaluation.metrics): CLIP-I and DINO-I for identity, CLIP-T for the prompt."""

    identity = ("clip_i", "dino_i")
    prompt = ("clip_t",)

    def __init__(self, models):
        self.models = models  # a MetricModels

    def references(self, photos):
        return self.models.references(list(photos))

    def score(self, images, references, prompt: str) -> dict[str, list[float]]:
        return self.models.score(images, references, prompt)


class WorldScores:
    """A profile world's own identity and prompt scores (the toy world's oracle: CLIP-T means nothing to a model
    whose CLIP is a random 8 px one). The world module gives `identity_scores(images, references)` and
    `prompt_scores(images, prompts)`; a None score (a photo that is not of the world, a prompt asking nothing it
    can read) is left out of the means."""

    def __init__(self, world):
        self.world = world
        self.identity = (world.IDENTITY_METRIC,)
        self.prompt = (getattr(world, "PROMPT_METRIC", "world_prompt"),)

    def references(self, photos):
        return list(photos)

    def score(self, images, references, prompt: str) -> dict[str, list[float | None]]:
        return {self.identity[0]: self.world.identity_scores(images, references),
                self.prompt[0]: self.world.prompt_scores(images, [prompt] * len(images))}


def measure(pipe, scorer, jobs: list[Job], positions, seeds, generation: Generation, path: WeightPath = WeightPath(),
            condition_images: int = 1, progress=None) -> Measurement:
    """Render every job at every path position and seed (one batched call per job and seed and at most MAX_BATCH
    positions, all from the same noise) and score the images.

    Args:
        pipe: a FlexIPPipeline.
        scorer: MetricScores or WorldScores.
        jobs: the (subject, prompt) rows, grouped by subject (its photos are encoded once).
        positions: path positions, increasing from 0 to 1.
        seeds: generation seeds; every job runs with each.
        generation: the settings of every call (steps, guidance, size, scheduler); its prompt and seed are replaced.
        path: the branch weights at each position.
        condition_images: how many of a subject's photos condition the adapters.
        progress: called with the number of calls done after each call.
    """
    positions = check_grid(positions)
    weights = [path.weights(p) for p in positions]
    chunks = np.array_split(np.arange(len(positions)), -(-len(positions) // MAX_BATCH))  # even batches
    scores = {name: [] for name in (*scorer.identity, *scorer.prompt)}
    encoded, calls = {}, 0
    for job in jobs:
        if job.subject not in encoded:
            encoded = {job.subject: (pipe.encode_subject(list(job.photos[:condition_images])),
                                     scorer.references(job.photos))}
        subject, references = encoded[job.subject]
        for seed in seeds:
            row = {name: [] for name in scores}
            for chunk in chunks:
                out = pipe(subject=subject, generation=replace(generation, prompt=job.prompt, seed=int(seed)),
                           gate=[positions[i] for i in chunk], branch_weights=[weights[i] for i in chunk])
                for name, values in scorer.score(out.images, references, job.scored_prompt).items():
                    row[name] += [np.nan if v is None else float(v) for v in values]
                calls += 1
                if progress is not None:
                    progress(calls)
            for name, values in row.items():
                scores[name].append(values)
    arrays = {name: np.array(values, dtype=float).reshape(-1, len(positions)) for name, values in scores.items()}
    return Measurement(positions, path, {n: arrays[n] for n in scorer.identity}, {n: arrays[n] for n in scorer.prompt})


# --- the inversion -------------------------------------------------------------------------------
def jump_ratio(values) -> float:
    """Largest step between neighbours over the mean step from one end to the other (1: even steps)."""
    values = np.asarray(values, dtype=float)
    mean_step = abs(values[-1] - values[0]) / (len(values) - 1)
    return float(np.abs(np.diff(values)).max() / mean_step) if mean_step > 0 else float("inf")


def share(change: np.ndarray) -> np.ndarray:
    """A score's change from the first position (positive = the expected direction) as a monotone share in [0, 1]
    of its largest change (a running maximum: a step back is noise, not progress)."""
    running = np.maximum.accumulate(np.clip(change, 0.0, None))
    return running / max(running[-1], 1e-12)


def calibrate(measured: Measurement, saturation: float = 0.02, min_change: float = 0.0, noise_sigmas: float = 3.0,
              points: int | None = None, check_points: int = 11) -> Calibration:
    """The gate curve that spends equal γ steps on equal shares of the measured trade-off.

    Args:
        measured: scores along the path (`Measurement`).
        saturation: the share of its whole change below which a score counts as saturated: γ = 0 sits at the last
            position before any score has moved by this share, γ = 1 at the first after which every score moves by
            less than it (0: at the path's own ends).
        min_change: a metric counts only when its mean changes from one end of the path to the other, the expected
            way, by at least this much (in its own units) and by `noise_sigmas` standard errors of that difference;
            when none does, the path itself is the curve.
        points: None: the curve goes through the measured positions; N: it is resampled at N evenly spaced γ.
        check_points: how many evenly spaced γ the predicted jump ratios use (11: γ = 0, 0.1, ..., 1).

    Identity metrics are averaged as shares (CLIP-I and DINO-I count equally whatever their ranges), and so are
    prompt metrics. Between two positions the slider advances by the larger of the identity share's rise and the
    prompt share's fall: each γ step then moves whichever side changes faster by the same share of its whole change,
    which keeps the larger of both sides' steps as small as it can be (their sum would give the side that moves
    alone, where the other is saturated, steps up to twice its mean).
    """
    x = np.asarray(measured.positions, dtype=float)
    if len(x) < 2 or x[0] != 0.0 or x[-1] != 1.0 or np.any(np.diff(x) <= 0):
        raise ValueError("path positions must increase from 0 to 1")
    means, noise = measured.means(), measured.noise()
    moved, sides, every = {}, [], []
    for names, sign in ((measured.identity, 1.0), (measured.prompt, -1.0)):
        shares = []
        for name in names:
            change = sign * (means[name] - means[name][0])
            needed = max(min_change, noise_sigmas * np.sqrt(2) * noise[name])  # a difference of two noisy means
            moved[name] = bool(change[-1] >= needed and change[-1] > 0)
            if moved[name]:
                shares.append(share(np.nan_to_num(change, nan=0.0)))
            else:
                logger.warning("%s moves by %.4f from one end of the path to the other (noise %.4f, at least %.4f "
                               "needed): left out of the calibration", name, change[-1], noise[name], needed)
        if shares:
            sides.append(np.mean(shares, axis=0))
            every += shares
    path = measured.path
    if not sides:
        logger.warning("no score moved beyond its noise along the path: the curve is the path itself")
        curve = GateCurve((0.0, 1.0), *zip(path.weights(0.0), path.weights(1.0)))
        return Calibration(_rounded(curve), 0.0, 1.0, moved, _predicted(curve, path, x, means, check_points))
    progress = np.concatenate([[0.0], np.cumsum(np.max([np.diff(s) for s in sides], axis=0))])
    progress /= progress[-1]
    lo, hi = 0, len(x) - 1
    if saturation > 0:  # every score within `saturation` of its own start below lo, of its own end above hi
        lo = min(int(np.flatnonzero(s <= saturation)[-1]) for s in every)
        hi = max(int(np.flatnonzero(s >= 1.0 - saturation)[0]) for s in every)
    kept = slice(lo, hi + 1)
    span = (progress[kept] - progress[lo]) / (progress[hi] - progress[lo])
    gammas = (1 - MIX) * span + MIX * (x[kept] - x[lo]) / (x[hi] - x[lo])  # strictly increasing, 0 to 1
    positions = x[kept]
    if points is not None:
        even = np.linspace(0.0, 1.0, points)
        positions, gammas = np.interp(even, gammas, positions), even
    weights = [path.weights(p) for p in positions]
    curve = GateCurve(tuple(float(g) for g in gammas), *(tuple(float(w[i]) for w in weights) for i in (0, 1)))
    curve = _rounded(curve)
    result = Calibration(curve, float(x[lo]), float(x[hi]), moved, _predicted(curve, path, x, means, check_points))
    logger.info("calibrated gate: γ 0..1 spans path positions %.3f..%.3f; predicted jump ratios %s", result.low,
                result.high, ", ".join(f"{k} {v:.2f}" for k, v in result.predicted.items()))
    return result


def _rounded(curve: GateCurve) -> GateCurve:
    """The curve with 6 decimals (a readable JSON file); the ends stay exactly 0 and 1."""
    gammas = [round(g, 6) for g in curve.gammas]
    return GateCurve(tuple(gammas), tuple(round(w, 6) for w in curve.pres), tuple(round(w, 6) for w in curve.pers))


def _predicted(curve: GateCurve, path: WeightPath, positions: np.ndarray, means: dict[str, np.ndarray],
               points: int = 11) -> dict[str, float]:
    """Metric -> the jump ratio of its measured mean at `points` evenly spaced γ of `curve`, whose weights lie on
    `path` (each γ's position on the path read back from its weights; the means interpolated linearly)."""
    start, end = np.array(path.start), np.array(path.end)
    direction = end - start
    along = [float(np.dot(np.array(curve.weights(g)) - start, direction) / np.dot(direction, direction))
             for g in np.linspace(0.0, 1.0, points)]
    return {name: jump_ratio(np.interp(along, positions, values)) for name, values in means.items()}
