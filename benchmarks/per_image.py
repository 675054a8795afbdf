"""`python -m benchmarks.per_image [--profile tiny] [--steps 10] [--size 64] [--images 9] [--device cpu]`: median
seconds per image.

The subject is encoded once, as in the studio; each timed image is the whole call (text encoding, the loop with
CFG, decoding). Prints the median and the spread; a profile's native size and steps are the defaults of the
issue targets (tiny: 64x64, 10 steps, target < 1 s; mini: 64x64 at its own steps, target < 1 s)."""
from __future__ import annotations

import argparse
import time

from flexip_core.cli import whole_number

from .common import describe_machine, machine, median, synthetic_photo

PROMPT = "a small toy on the left, on a sand background"  # in the words of the mini's toy world too


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.per_image", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--steps", type=whole_number(1), default=None, help="denoising steps (default: the profile's)")
    parser.add_argument("--size", type=whole_number(64), default=64, help="image side in pixels")
    parser.add_argument("--images", type=whole_number(1), default=9, help="timed images (after one warm-up)")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, mps)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="default: the profile's")
    args = parser.parse_args(argv)
    import torch

    from flexip_core import FlexIPPipeline
    from flexip_core.generation.devices import pick_device
    from flexip_core.loading.profiles import load_profile

    try:
        load_profile(args.profile)
        device = pick_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    pipe = FlexIPPipeline.from_profile(args.profile, device=device, dtype=args.dtype)
    subject = pipe.encode_subject([synthetic_photo(0)])
    steps = args.steps or pipe.profile.defaults.num_inference_steps
    times = []
    for seed in range(args.images + 1):
        started = time.perf_counter()
        pipe(PROMPT, subject, gate=0.5, seed=seed, num_inference_steps=steps, height=args.size, width=args.size)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    times = sorted(times[1:])
    print(f"machine: {describe_machine(machine())}")
    print(f"profile {args.profile} on {device} ({pipe.dtype}), {args.size}x{args.size}, {steps} steps, CFG: "
          f"median {median(times):.3f} s per image (min {times[0]:.3f}, max {times[-1]:.3f}; {args.images} images)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
