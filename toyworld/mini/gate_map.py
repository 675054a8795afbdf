"""`python -m toyworld.mini.gate_map`: FlexIP-mini's identity and prompt scores over both branch weights.

The slider walks one path through (w_pres, w_pers); this measures the oracle's scores on a grid of the two weights
(optionally with preservation active only in the first part of the denoising steps), on training cases as the
build's calibration does. It shows which trade-offs any gate path can reach: a point is `dominated` when another
keeps at least as much identity and as much of the prompt, and more of one."""
from __future__ import annotations

import argparse
import itertools

import numpy as np
import torch

from flexip_core.cli import comma_ints, comma_numbers, whole_number
from flexip_core.generation.gate import GateCurve
from toyworld import world as tw

from . import slider, world


def measure_grid(pipe, cases: list[world.Case], seeds=(0, 1), pres=(0.0, 0.5, 1.0), pers=(0.0, 0.5, 1.0),
                 gate_schedule=None, num_inference_steps: int | None = None) -> list[dict]:
    """One row per (w_pres, w_pers): the weights, identity, prompt, each identity attribute's share, dominated."""
    points = list(itertools.product(pres, pers))
    gammas = tuple(float(g) for g in np.linspace(0.0, 1.0, len(points)))  # a gate curve through the grid points
    through = GateCurve(gammas, tuple(float(p) for p, _ in points), tuple(float(q) for _, q in points))
    measured = slider.measure(pipe, cases, seeds=seeds, gammas=gammas, curve=through, gate_schedule=gate_schedule,
                              num_inference_steps=num_inference_steps)
    rows = [dict(pres=float(p), pers=float(q), **{k: v for k, v in row.items() if k != "gamma"})
            for (p, q), row in zip(points, measured.rows())]
    for row, dominated in zip(rows, dominated_points([(r["identity"], r["prompt"]) for r in rows])):
        row["dominated"] = dominated
    return rows


def dominated_points(scores: list[tuple[float, float]]) -> list[bool]:
    """For each (identity, prompt): whether another point is at least as good in both and better in one."""
    return [any(a >= i and b >= p and (a > i or b > p) for a, b in scores) for i, p in scores]


def _weights(text: str) -> tuple[float, ...]:
    values = comma_numbers(text)
    if any(not 0.0 <= v <= 2.0 for v in values):
        raise argparse.ArgumentTypeError(f"branch weights must lie in [0, 2]; got {text}")
    return values


def main(argv: list[str] | None = None) -> int:
    from .curve import load_mini

    parser = argparse.ArgumentParser(prog="python -m toyworld.mini.gate_map", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pres", type=_weights, default=(0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0), help="w_pres values")
    parser.add_argument("--pers", type=_weights, default=(0.0, 0.25, 0.5, 0.75, 1.0), help="w_pers values")
    parser.add_argument("--pres-until", type=float, default=None,
                        help="preservation only in this first fraction of the denoising steps (default: all)")
    parser.add_argument("--cases", type=whole_number(1), default=16, help="(subject, reference, prompt) cases")
    parser.add_argument("--seeds", type=comma_ints, default=(0, 1), help="comma-separated generation seeds")
    parser.add_argument("--split", choices=("train", "heldout"), default="train",
                        help="training cases (as the calibration) or held-out ones (as the acceptance curve)")
    parser.add_argument("--threads", type=whole_number(1), default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.pres_until is not None and not 0.0 < args.pres_until <= 1.0:
        parser.error(f"--pres-until must lie in (0, 1]; got {args.pres_until}")
    if args.threads:
        torch.set_num_threads(args.threads)
    # the cases the build calibrates on (build.calibrate, seed 0 + 100) or those of the curve (its --case-seed 1)
    cases = world.sample_cases(args.cases, 100 if args.split == "train" else 1, split=args.split)
    rows = measure_grid(load_mini(), cases, args.seeds, args.pres, args.pers, gate_schedule=args.pres_until)
    names = list(tw.IDENTITY_ATTRIBUTES)
    print("w_pres  w_pers  identity  prompt  " + "  ".join(names))
    for row in rows:
        shares = "  ".join(f"{row[name]:.2f}".rjust(len(name)) for name in names)
        print(f"{row['pres']:6.2f}  {row['pers']:6.2f}  {row['identity']:8.3f}  {row['prompt']:6.3f}  {shares}"
              + ("  dominated" if row["dominated"] else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
