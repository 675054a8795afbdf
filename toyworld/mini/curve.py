"""`python -m toyworld.mini.curve --out docs/mini_curve.png`: the FlexIP-mini slider measured by the oracle.

Held-out subjects and held-out prompt scenes, several seeds; identity and prompt scores at 11 gate values,
written as a plot (PNG) and a CSV beside it.
"""
from __future__ import annotations

import argparse
import csv
import logging
from pathlib import Path

import numpy as np
import torch

from flexip_core.cli import comma_ints, output_file, whole_number
from flexip_core.generation.devices import pick_device

from . import slider, world
from .build import ASSETS, PROFILE_PATH

logger = logging.getLogger(__name__)


def load_mini(assets: Path = ASSETS, device: str = "cpu", dtype: str | None = None, profile: Path = PROFILE_PATH):
    """The mini profile's pipeline (its settings and gate curve from `profile`) with its weights taken from `assets`
    (any working directory); `dtype` None keeps the profile's float32."""
    from flexip_core.generation.pipeline import FlexIPPipeline

    return FlexIPPipeline.from_profile(str(profile), device=device, dtype=dtype, base=str(assets / "base"),
                                       clip_encoder=str(assets / "image_encoder"), dino_encoder=str(assets / "dino"),
                                       adapter=str(assets / "flexip_adapter.safetensors"))


def plot(curve: slider.Curve, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(curve.identity_all)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, mean, samples, colour in (("identity score", curve.identity, curve.identity_all, "tab:blue"),
                                        ("prompt score", curve.prompt, curve.prompt_all, "tab:orange")):
        err = samples.std(0) / np.sqrt(n)
        ax.plot(curve.gammas, mean, "o-", color=colour, label=name)
        ax.fill_between(curve.gammas, mean - err, mean + err, color=colour, alpha=0.2)
    ax.set_xlabel("gate gamma (0 = follow the prompt, 1 = keep identity)")
    ax.set_ylabel("oracle score")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m toyworld.mini.curve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=output_file(".png"), default="docs/mini_curve.png",
                        help="plot path (.png); the scores go beside it as .csv")
    parser.add_argument("--cases", type=whole_number(1), default=16, help="held-out (subject, reference, prompt) cases")
    parser.add_argument("--seeds", type=comma_ints, default=(0, 1, 2), help="comma-separated generation seeds")
    parser.add_argument("--prompts", choices=("scene", "recolour"), default="scene",
                        help="'scene': each prompt asks for another scene (the acceptance curve); 'recolour': for "
                             "another scene and a body colour other than the subject's, an edit that costs identity")
    parser.add_argument("--case-seed", type=int, default=1, help="seed drawing the cases")
    parser.add_argument("--assets", type=Path, default=ASSETS, help="the weights (default: the shipped ones)")
    parser.add_argument("--profile", type=Path, default=PROFILE_PATH,
                        help="the profile giving the settings and gate curve (default: the shipped mini profile)")
    parser.add_argument("--threads", type=whole_number(1), default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="torch device: cpu (default) or cuda, which gives the same "
                                                        "curve in the profile's float32")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="default: the profile's float32")
    args = parser.parse_args(argv)
    try:
        pick_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    if not (args.assets / "flexip_adapter.safetensors").is_file():
        parser.error(f"no FlexIP-mini weights in {args.assets}; build them with `python -m toyworld.mini.build`")
    if not args.profile.is_file():
        parser.error(f"no profile at {args.profile}")
    torch.set_num_threads(args.threads)
    pipe = load_mini(args.assets, args.device, args.dtype, args.profile)
    cases = world.sample_cases(args.cases, args.case_seed, split="heldout", recolour=args.prompts == "recolour")
    curve = slider.measure(pipe, cases, seeds=args.seeds)
    problems = slider.check_slider(curve)
    kind = "recolouring prompts" if args.prompts == "recolour" else "prompts"
    title = (f"FlexIP-mini: {args.cases} held-out subjects x {kind}, seeds {','.join(map(str, args.seeds))} "
             f"({len(curve.identity_all)} images per gamma)")
    plot(curve, args.out, title)
    with args.out.with_suffix(".csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["gamma", "identity", "prompt", *curve.attributes])
        writer.writeheader()
        writer.writerows(curve.rows())
    for row in curve.rows():
        shares = "  ".join(f"{name} {row[name]:.2f}" for name in curve.attributes)
        print(f"gamma {row['gamma']:.1f}  identity {row['identity']:.3f} ({shares})  prompt {row['prompt']:.3f}")
    print("acceptance:", "all pass" if not problems else "; ".join(problems))
    logger.info("wrote %s and %s", args.out, args.out.with_suffix(".csv"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
