"""Measuring the slider on the toy world: identity and prompt scores (toyworld.oracle) across gate values,
and the calibrated gate curve that spaces them evenly.

`python -m toyworld.mini.slider DIR` writes the cases the build calibrates on as a subjects folder and prompts file
for `python -m flexip_core.calibrate` (docs/calibration.md).
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flexip_core.evaluation.calibration import Measurement, WeightPath, calibrate, jump_ratio
from flexip_core.generation.gate import GateCurve
from flexip_core.generation.settings import MAX_BATCH
from toyworld import world as tw
from toyworld.oracle import identity_matches, prompt_fraction, read_attributes

from .world import Case, noun, sample_cases

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


def calibrated_curve(measured: Curve, points: int = 11, min_change: float = 0.05) -> GateCurve:
    """A gate curve whose equal steps of gamma move identity and prompt scores as evenly as the measurement allows.

    `measured` was taken with the linear curve (w_pres = g, w_pers = 1 - g). The inversion is the shared one,
    flexip_core.evaluation.calibration.calibrate: each score's progress is its normalised identity rise or prompt
    fall, made monotone; the slider advances, between two measured g, by the larger of the two, so that each slider
    step moves whichever score changes faster by the same share of its whole change (the largest jump of both at
    once as small as it can be: the issue's "no jump larger than twice the mean step"). Here the curve spans the
    whole linear gate (no saturation ends) and is resampled at `points` evenly spaced gamma. A score moving by less
    than `min_change` is left out; when neither moves, the linear curve is kept."""
    as_measured = Measurement(tuple(float(g) for g in measured.gammas), WeightPath(),
                              {"identity": np.asarray(measured.identity, float)[None]},
                              {"prompt": np.asarray(measured.prompt, float)[None]})
    return calibrate(as_measured, saturation=0.0, min_change=min_change, points=points).curve


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


def write_cases(cases: list[Case], folder: str | Path) -> tuple[Path, Path]:
    """The cases as `python -m flexip_core.calibrate` reads them: FOLDER/subjects/ with one sub-folder per case
    holding its reference render, and FOLDER/prompts.txt with case i's prompt on line i (so that
    `--prompts-per-subject 1` gives each subject its own case's prompt, as the build's calibration measures)."""
    folder = Path(folder)
    subjects = folder / "subjects"
    for i, case in enumerate(cases):
        sub = subjects / f"{i:02d}-{noun(case.subject).replace(' ', '-')}"
        sub.mkdir(parents=True, exist_ok=True)
        case.reference_image().save(sub / "reference.png")
    prompts = folder / "prompts.txt"
    prompts.write_text("".join(f"{case.prompt}\n" for case in cases))
    return subjects, prompts


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m toyworld.mini.slider", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="where to write subjects/ and prompts.txt")
    parser.add_argument("--cases", type=int, default=16, help="cases (default 16, as the build calibrates on)")
    parser.add_argument("--split", choices=("train", "heldout"), default="train", help="subjects and prompt scenes")
    parser.add_argument("--case-seed", type=int, default=100, help="seed drawing the cases (the build's: 100)")
    args = parser.parse_args(argv)
    subjects, prompts = write_cases(sample_cases(args.cases, args.case_seed, split=args.split), args.folder)
    print(f"--subjects {subjects} --prompts {prompts} --prompts-per-subject 1")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
