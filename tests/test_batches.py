"""A batch: several images at one γ with consecutive seeds, in one batched call, each equal to its own single call."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from flexip_core import FlexIPPipeline


@pytest.fixture(scope="module")
def flexip() -> FlexIPPipeline:
    return FlexIPPipeline.from_profile("tiny")


@pytest.fixture(scope="module")
def subject(flexip):
    photo = Image.new("RGB", (64, 64), (230, 230, 230))
    photo.paste((30, 30, 200), (10, 20, 50, 44))
    return flexip.encode_subject([photo])


def test_a_batch_equals_single_calls_with_consecutive_seeds(flexip, subject):
    run = dict(subject=subject, gate=0.6, num_inference_steps=2, output_type="np")
    batch = flexip("a toy", seed=7, num_images=3, **run)
    assert [g.seed for g in batch.generations] == [7, 8, 9] and {g.gate for g in batch.generations} == {0.6}
    assert [p["seed"] for p in batch.parameters] == [7, 8, 9]
    for i, seed in enumerate((7, 8, 9)):
        single = flexip("a toy", seed=seed, **run).arrays[0]
        assert np.abs(batch.arrays[i] - single).max() <= 1e-5
    assert np.abs(batch.arrays[0] - batch.arrays[1]).max() > 1e-3  # other seeds, other images


def test_the_last_seed_wraps_and_a_batch_does_not_mix_with_a_sweep(flexip, subject):
    out = flexip("a toy", subject=subject, seed=2**32 - 1, num_images=2, num_inference_steps=1)
    assert [g.seed for g in out.generations] == [2**32 - 1, 0]
    with pytest.raises(ValueError, match="a γ sweep .* and a batch do not combine"):
        flexip("a toy", subject=subject, gate=[0.0, 1.0], num_images=2, num_inference_steps=1)
    for bad in (0, 17, 2.5):
        with pytest.raises(ValueError, match="num_images must be a whole number from 1 to 16"):
            flexip("a toy", subject=subject, num_images=bad, num_inference_steps=1)
