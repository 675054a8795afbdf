"""Measuring the slider on the toy world: identity and prompt scores (toyworld.oracle) across gate values,
and the calibrated gate curve that spaces them evenly."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from flexip_core.generation.gate import GateCurve
from flexip_core.generation.settings import MAX_BATCH
from toyworld import world as tw
from toyworld.oracle import identity_matches, prompt_fraction, read_attributes

from .world import Case

logger = logging.getLogger(__name__)

GAMMAS = tuple(np.round(np.linspace(0.0, 1.0, 11), 2))  # the 11 gate values of the acceptance curve


@dataclass(frozen=True)
class Curve:
    """Oracle scores per gate value, averaged over cases and seeds (and kept per sample)."""

    gammas: tuple[float, ...]  # gate values, increasing
    identity: np.ndarray  # (G,) mean identity score
    prompt: np.ndarray  # (G,) mean prompt score
    identity_all: np.ndarray  # (samples, G)
    prompt_all: np.ndarray  # (samples, G)
    attributes: dict[str, np.ndarray] = field(default_factory=dict)  # identity attribute -> (G,) share found

    def rows(self) -> list[dict]:
        """One dict per gate value: gamma, identity, prompt and the share of each identity attribute found."""
        return [dict(gamma=float(g), identity=float(self.identity[k]), prompt=float(self.prompt[k]),
                     **{name: float(share[k]) for name, share in self.attributes.items()})
                for k, g in enumerate(self.gammas)]


def measure(pipe, cases: list[Case], seeds=(0, 1), gammas=GAMMAS, num_inference_steps: int | None = None,
            guidance_scale: float | None = None, curve: GateCurve | None = None, gate_schedule=None) -> Curve:
    """Generate every case at every gate value (batched calls per case and seed) and score with the oracle.

    `curve` replaces the profile's gate curve for this measurement (used while calibrating); `gate_schedule` is
    passed to every call (see flexip_core.generation.gate.as_schedule)."""
    gammas = tuple(float(g) for g in gammas)
    branch_weights = [curve.weights(g) for g in gammas] if curve is not None else None
    hits, prompt = [], []  # per sample: (G, identity attributes) matches; (G,) prompt scores
    for case in cases:
        subject = pipe.encode_subject([case.reference_image()])
        requested = tw.parse_prompt(case.prompt)
        for seed in seeds:
            images = []
            for start in range(0, len(gammas), MAX_BATCH):  # every row starts from the same seeded noise
                chunk = slice(start, start + MAX_BATCH)
                images += pipe(case.prompt, subject, gate=list(gammas[chunk]), seed=int(seed),
                               branch_weights=branch_weights[chunk] if branch_weights else None,
                               num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                               gate_schedule=gate_schedule).images
            found = [read_attributes(im) for im in images]  # the oracle reads each image once
            hits.append([list(identity_matches(f, case.subject).values()) for f in found])
            prompt.append([prompt_fraction(f, requested) for f in found])
    hits_all = np.array(hits, float)  # (samples, G, A), A in tw.IDENTITY_ATTRIBUTES order
    identity_all, prompt_all = hits_all.mean(-1), np.array(prompt)  # (samples, G): identity_score per image
    attributes = dict(zip(tw.IDENTITY_ATTRIBUTES, hits_all.mean(0).T))
    return Curve(gammas, identity_all.mean(0), prompt_all.mean(0), identity_all, prompt_all, attributes)


# Linear-gate values at which the build measures before calibrating: dense near 0, where a little preservation
# already brings colour and shape in, so that the inverse below does not interpolate across a steep rise.
CALIBRATION_GAMMAS = (0.0, 0.02, 0.04, 0.06, 0.08, 0.1, 0.13, 0.16, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6,
                      0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)


def jump_ratio(values) -> float:
    """Largest step between neighbours over the mean step from one end to the other (1: even steps)."""
    values = np.asarray(values, dtype=float)
    mean_step = abs(values[-1] - values[0]) / (len(values) - 1)
    return float(np.abs(np.diff(values)).max() / mean_step) if mean_step > 0 else float("inf")


def calibrated_curve(measured: Curve, points: int = 11, min_change: float = 0.05) -> GateCurve:
    """A gate curve whose equal steps of gamma move identity and prompt scores as evenly as the measurement allows.

    `measured` was taken with the linear curve (w_pres = g, w_pers = 1 - g). Each score's progress is its normalised
    identity rise or prompt fall, made monotone; the slider advances, between two measured g, by the larger of the
    two progresses there, so that each slider step moves whichever score changes faster by the same share of its
    whole change (the largest jump of both at once as small as it can be: the issue's "no jump larger than twice
    the mean step"). The new curve maps evenly
    spaced gamma to the linear-curve g where that progress is reached (inverse-CDF reparametrisation). Without a
    measurable trade-off (either score moving by less than `min_change`) the linear curve is kept."""
    g = np.array(measured.gammas)
    if min(measured.identity[-1] - measured.identity[0], measured.prompt[0] - measured.prompt[-1]) < min_change:
        logger.warning("no trade-off measured (identity %.3f -> %.3f, prompt %.3f -> %.3f): keeping the linear gate",
                       measured.identity[0], measured.identity[-1], measured.prompt[0], measured.prompt[-1])
        return GateCurve()
    rise = _progress(measured.identity - measured.identity[0])
    fall = _progress(measured.prompt[0] - measured.prompt)
    progress = np.concatenate([[0.0], np.cumsum(np.maximum(np.diff(rise), np.diff(fall)))])
    progress = progress / progress[-1]
    progress = 0.98 * progress + 0.02 * g  # strictly increasing, so that it can be inverted
    u = np.linspace(0.0, 1.0, points)
    source = np.interp(u, progress, g)  # (points,) linear-curve g at which each share of the slider is reached
    source[0], source[-1] = 0.0, 1.0
    logger.info("calibrated gate: jump ratios the measurement predicts, identity %.2f, prompt %.2f",
                jump_ratio(np.interp(source, g, measured.identity)), jump_ratio(np.interp(source, g, measured.prompt)))
    return GateCurve(tuple(float(x) for x in u), tuple(round(float(x), 4) for x in source),
                     tuple(round(float(1 - x), 4) for x in source))


def _progress(change: np.ndarray) -> np.ndarray:
    """A score's change from the first gate value as a monotone share in [0, 1] of its largest change."""
    running = np.maximum.accumulate(np.clip(change, 0.0, None))
    return running / max(running[-1], 1e-6)


def check_slider(curve: Curve, min_end: float = 0.8, min_change: float = 0.2, max_jump_ratio: float = 2.0,
                 noise: float = 0.05) -> list[str]:
    """The acceptance criteria of the slider; returns what fails (empty: all pass)."""
    problems = []
    if curve.identity[-1] < min_end:
        problems.append(f"identity at gamma=1 is {curve.identity[-1]:.3f} < {min_end}")
    if curve.prompt[0] < min_end:
        problems.append(f"prompt score at gamma=0 is {curve.prompt[0]:.3f} < {min_end}")
    for name, values, sign in (("identity", curve.identity, 1), ("prompt", curve.prompt, -1)):
        change = sign * (values[-1] - values[0])
        if change < min_change:
            problems.append(f"{name} changes by {change:.3f} from gamma 0 to 1 (< {min_change})")
        steps = sign * np.diff(values)
        if steps.min() < -noise:
            problems.append(f"{name} is not monotone: a step of {-steps.min():.3f} the wrong way (noise {noise})")
        ratio = jump_ratio(values)
        if np.isfinite(ratio) and ratio > max_jump_ratio:
            problems.append(f"{name} jumps by {np.abs(np.diff(values)).max():.3f} between neighbours "
                            f"({ratio:.2f} x the mean step, > {max_jump_ratio})")
    return problems
