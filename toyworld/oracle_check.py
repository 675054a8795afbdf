"""Per-attribute oracle accuracy on degraded renders of held-out subjects: `python -m toyworld.oracle_check`."""

from __future__ import annotations

import argparse
import logging

import numpy as np
from PIL import Image, ImageFilter

from toyworld import world as tw
from toyworld.oracle import read_attributes

logger = logging.getLogger(__name__)

REQUIRED_ACCURACY = 0.95  # every attribute must be read at least this often on held-out subjects
MAX_BLUR = 0.8  # default largest Gaussian blur radius, px at the native size
MAX_NOISE = 8.0  # default largest Gaussian noise standard deviation, on the 0-255 scale


def degrade(image: Image.Image, rng: np.random.Generator, max_blur: float, max_noise: float) -> Image.Image:
    """Mild random blur then Gaussian noise, standing in for a tiny diffusion model's imperfect samples."""
    blur = rng.uniform(0.0, max_blur) * image.width / tw.NATIVE_SIZE
    if blur > 0:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    noise = rng.normal(0.0, rng.uniform(0.0, max_noise), (image.height, image.width, 3))
    return Image.fromarray(np.clip(np.asarray(image, np.float64) + noise, 0, 255).round().astype(np.uint8))


def heldout_accuracy(
    n: int = 1000, seed: int = 0, size: int = tw.NATIVE_SIZE, max_blur: float = MAX_BLUR, max_noise: float = MAX_NOISE
) -> dict[str, float]:
    """Fraction of n degraded held-out renders in random scenes whose attribute the oracle reads right."""
    rng = np.random.default_rng((seed, 3))
    hits = {name: 0 for name in (*tw.IDENTITY_ATTRIBUTES, *tw.EDITABLE_ATTRIBUTES)}
    for subject in tw.sample_subjects(n, seed, "heldout"):
        scene = tw.sample_scene(rng)
        found = read_attributes(degrade(tw.render(subject, scene, size), rng, max_blur, max_noise))
        for name in hits:
            truth = getattr(subject, name) if name in tw.IDENTITY_ATTRIBUTES else getattr(scene, name)
            hits[name] += found[name] == truth
            if found[name] != truth:
                logger.debug("%s: read %s, was %s (%s, %s)", name, found[name], truth, subject, scene)
    return {name: count / n for name, count in hits.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1000, help="number of held-out renders")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=tw.NATIVE_SIZE, help="image side, px")
    parser.add_argument("--max-blur", type=float, default=MAX_BLUR, help="largest blur radius at the native size")
    parser.add_argument("--max-noise", type=float, default=MAX_NOISE, help="largest noise std (0-255)")
    parser.add_argument("--verbose", action="store_true", help="log every misread attribute")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s")
    accuracy = heldout_accuracy(args.n, args.seed, args.size, args.max_blur, args.max_noise)
    print(f"held-out oracle accuracy: n={args.n} size={args.size} blur<={args.max_blur} noise<={args.max_noise}")
    for name, value in accuracy.items():
        print(f"  {name:<10} {value:.3f}{'' if value >= REQUIRED_ACCURACY else '  BELOW ' + str(REQUIRED_ACCURACY)}")
    return 0 if min(accuracy.values()) >= REQUIRED_ACCURACY else 1


if __name__ == "__main__":
    raise SystemExit(main())
