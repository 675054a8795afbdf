"""Command line: `python -m flexip_core generate ...` (and the other subcommands)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

MODEL_FLAGS = ("base", "clip_encoder", "dino_encoder", "preservation", "personalization", "adapter", "lora")


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """--profile plus one flag per profile part; shared by every command that loads a pipeline."""
    parser.add_argument("--profile", default=None, help="profile name or .json path (default: best available)")
    for name in MODEL_FLAGS:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None,
                            help=f"override the profile's {name.replace('_', ' ')} (Hub id[:path], folder or file)")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    parser.add_argument("--dtype", default=None, help="float16, bfloat16 or float32 (default: fp16 on GPU)")
    parser.add_argument("--attention", default=None, choices=["auto", "sdpa", "xformers"], help="attention backend")


def pipeline_from_args(args):
    from .pipeline import FlexIPPipeline
    from .profiles import default_profile

    overrides = {name: getattr(args, name) for name in MODEL_FLAGS if getattr(args, name, None)}
    return FlexIPPipeline.from_profile(args.profile or default_profile(), device=args.device, dtype=args.dtype,
                                       attention=args.attention, **overrides)


def _generate(args) -> int:
    from .images import load_reference_image
    from .metadata import save_png

    images = [load_reference_image(path) for path in args.image]
    weights = args.weight or None
    pipe = pipeline_from_args(args)
    subject = pipe.encode_subject(images, weights)
    out = pipe(args.prompt, subject=subject, gate=args.gate or [0.5], strength=args.strength,
               negative_prompt=args.negative_prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
               height=args.size or args.height, width=args.size or args.width, seed=args.seed,
               scheduler=args.scheduler, gate_schedule=args.identity_until)
    target = Path(args.out)
    for i, (image, params) in enumerate(zip(out.images, out.parameters)):
        path = target if len(out.images) == 1 else target.with_name(f"{target.stem}_{i:02d}{target.suffix or '.png'}")
        save_png(image, path, params)
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flexip_core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate images of a subject at one or more gate values")
    add_model_flags(gen)
    gen.add_argument("--image", action="append", required=True, help="subject photo (repeat for several)")
    gen.add_argument("--weight", action="append", type=float, help="weight of each --image, in order")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--gate", action="append", type=float, help="gamma in [0, 1]; repeat for a same-seed sweep")
    gen.add_argument("--strength", type=float, default=1.0)
    gen.add_argument("--identity-until", type=float, default=None,
                     help="identity branch only for this fraction of the steps (0-1]")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", type=int, default=None)
    gen.add_argument("--guidance", type=float, default=None)
    gen.add_argument("--size", type=int, default=None, help="square size in pixels (multiple of 8)")
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--scheduler", default="profile", help="dpmpp_2m, euler, euler_a, ddim, pndm, unipc, lcm")
    gen.add_argument("--out", default="out.png")
    gen.set_defaults(func=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
