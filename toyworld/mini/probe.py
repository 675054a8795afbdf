"""`python -m toyworld.mini.probe`: how much FlexIP-mini's base listens to each identity word.

For one scene, the caption names a subject; only one identity attribute's word changes across its values. The
base's prediction of the clean latent from pure noise (t = T, the same noise for every caption) moves with the
word by `model` (the mean over latent positions of the standard deviation across the words); the renders' own
latents move by `renders`. A base that draws what the word asks for has model close to renders.

Then what the base draws when the caption names the whole subject (both adapter branches off, so the reference plays
no part): the share of each identity attribute the oracle finds, for training and for held-out subjects. A base that
composes attributes draws held-out subjects as well as training ones."""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from flexip_core.loading.sources import load_base
from toyworld import world as tw
from toyworld.oracle import identity_matches, read_attributes

from . import base, models, world
from .build import ASSETS
from .curve import load_mini

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


@torch.no_grad()
def drawn_from_caption(pipe, split: str, n: int = 16, seeds=(0, 1)) -> dict[str, float]:
    """Share of each identity attribute found in what a FlexIP pipeline draws with both branches at 0 for captions
    naming the subject, over n subjects of `split` (each in a training scene) and `seeds`."""
    rng = np.random.default_rng((n, 51))
    scenes = world.scenes_in("train")
    hits = []
    for subject in tw.sample_subjects(n, seed=5, split=split):
        scene = scenes[rng.integers(len(scenes))]
        reference = pipe.encode_subject([tw.render(subject, scene, world.NATIVE_SIZE)])  # required; weighted 0
        for seed in seeds:
            image = pipe(world.describe(scene, None, subject), reference, branch_weights=[(0.0, 0.0)],
                         seed=int(seed)).images[0]
            hits.append(list(identity_matches(read_attributes(image), subject).values()))
    return {name: round(float(share), 2) for name, share in zip(tw.IDENTITY_ATTRIBUTES, np.mean(hits, 0))}


def load(folder: Path = ASSETS / "base") -> SimpleNamespace:
    """The base's components (unet, vae, text_encoder, tokenizer) as attributes, in float32 (shipped: float16)."""
    return SimpleNamespace(**load_base(str(folder), torch.float32).components)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toyworld.mini.probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", type=Path, default=ASSETS,
                        help="a FlexIP-mini build folder (default: the shipped one, assets/mini)")
    args = parser.parse_args(argv)
    if not (args.assets / "flexip_adapter.safetensors").is_file():
        parser.error(f"no FlexIP-mini weights in {args.assets}; build them with `python -m toyworld.mini.build`")
    base_parts = load(args.assets / "base")
    for attribute in tw.IDENTITY_ATTRIBUTES:
        found = word_spread(base_parts, attribute)
        print(f"{attribute:<8} model {found['model']:.3f}  renders {found['renders']:.3f}  "
              f"ratio {found['model'] / max(found['renders'], 1e-9):.2f}")
    pipe = load_mini(args.assets)
    for split in ("train", "heldout"):
        found = drawn_from_caption(pipe, split)
        print(f"drawn from the caption alone, {split} subjects: " + ", ".join(f"{k} {v:.2f}" for k, v in found.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
