"""`python -m flexip_core.mini.probe`: how much FlexIP-mini's base listens to each identity word.

For one scene, the caption names a subject; only one identity attribute's word changes across its values. The
base's prediction of the clean latent from pure noise (t = T, the same noise for every caption) moves with the
word by `model` (the mean over latent positions of the standard deviation across the words); the renders' own
latents move by `renders`. A base that draws what the word asks for has model close to renders."""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch

from flexip_core import toyworld as tw
from flexip_core.loading import load_base

from . import base, models, world
from .build import ASSETS

SCENE = tw.Scene("white", "large", "center", "upright", "flat")
SUBJECT = tw.Subject("square", "red", "stripes")


def spread(latents: torch.Tensor) -> float:
    """Mean over latent positions of the standard deviation across the batch."""
    return round(float(latents.std(0).mean()), 4)


@torch.no_grad()
def word_spread(pipe, attribute: str, subject: tw.Subject = SUBJECT, scene: tw.Scene = SCENE) -> dict[str, float]:
    """{'model': ..., 'renders': ...} for the values of one identity attribute (see the module doc)."""
    subjects = [replace(subject, **{attribute: value}) for value in tw.IDENTITY_ATTRIBUTES[attribute]]
    ids = pipe.tokenizer([world.describe(scene, None, s) for s in subjects], padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    text = pipe.text_encoder(ids)[0]
    side = world.NATIVE_SIZE // 2 ** (len(pipe.vae.config.block_out_channels) - 1)  # latent side
    noise = torch.randn((1, pipe.unet.config.in_channels, side, side), generator=torch.Generator().manual_seed(0))
    noise = noise.expand(len(subjects), -1, -1, -1)
    t = torch.full((len(subjects),), models.SCHEDULER["num_train_timesteps"] - 1)
    predicted = -pipe.unet(noise, t, encoder_hidden_states=text).sample  # v = -x0 at zero terminal SNR
    renders = pipe.vae.encode(base.renders([(s, scene) for s in subjects])).latent_dist.mean
    return {"model": spread(predicted), "renders": spread(renders * pipe.vae.config.scaling_factor)}


def load(folder: Path = ASSETS / "base") -> SimpleNamespace:
    """The base's components (unet, vae, text_encoder, tokenizer) as attributes, in float32 (shipped: float16)."""
    return SimpleNamespace(**load_base(str(folder), torch.float32))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flexip_core.mini.probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=ASSETS / "base", help="a mini base folder (default: the shipped one)")
    args = parser.parse_args(argv)
    pipe = load(args.base)
    for attribute in tw.IDENTITY_ATTRIBUTES:
        found = word_spread(pipe, attribute)
        print(f"{attribute:<8} model {found['model']:.3f}  renders {found['renders']:.3f}  "
              f"ratio {found['model'] / max(found['renders'], 1e-9):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
