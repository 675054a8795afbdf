"""One loaded model, every task: FlexIPPipeline.for_task (diffusers' from_pipe), the profile's inpainting base and
ControlNets through load_task, what a profile cannot run, missing task weights said with their download; and a
batch of consecutive seeds in one call."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from flexip_core import FlexIPPipeline
from flexip_core.generation.task_inputs import prepare
from flexip_core.loading.assembly import load_task, task_unavailable
from flexip_core.loading.profiles import load_profile
from flexip_core.loading.sources import WeightsNotFound


@pytest.fixture(scope="module")
def flexip() -> FlexIPPipeline:
    return FlexIPPipeline.from_profile("tiny")


@pytest.fixture(scope="module")
def subject(flexip):
    photo = Image.new("RGB", (64, 64), (230, 230, 230))
    photo.paste((200, 30, 30), (16, 16, 48, 48))
    return flexip.encode_subject([photo])


@pytest.fixture(scope="module")
def scene() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8"))


def test_for_task_shares_the_loaded_models_and_keeps_the_pipelines_own_processors(flexip, subject, scene):
    own = dict(flexip._own_processors)
    img2img = flexip.for_task("image-to-image")
    assert img2img.pipe.unet is flexip.pipe.unet and img2img.encoder is flexip.encoder  # nothing loaded again
    assert img2img.adapter is flexip.adapter and img2img.task == "image-to-image"
    assert flexip.for_task("text-to-image") is flexip
    out = img2img("a toy", subject=subject, gate=0.5, seed=1, num_inference_steps=2,
                  pipeline_kwargs={"image": scene, "strength": 0.5})
    assert out.generations[0].task == "image-to-image" and out.images[0].size == (64, 64)
    assert img2img._own_processors == own  # detaching a derived pipeline gives the UNet its own processors back
    with pytest.raises(ValueError, match="unknown task 'sketch'"):
        flexip.for_task("sketch")


def test_load_task_uses_the_profiles_inpainting_base_and_controlnet(flexip, subject, scene):
    inpaint = load_task(flexip, "inpainting")
    assert inpaint.pipe.unet.config.in_channels == 9 and inpaint.pipe.unet is not flexip.pipe.unet
    assert inpaint.encoder is flexip.encoder and inpaint.adapter is flexip.adapter
    inputs = prepare("inpaint", image=scene, mask=Image.new("L", (64, 64), 255), side=64, max_side=512)
    out = inpaint("a toy", subject=subject, gate=[0.0, 1.0], seed=2, num_inference_steps=2, height=inputs.height,
                  width=inputs.width, pipeline_kwargs=inputs.pipeline_kwargs)
    assert len(out.images) == 2 and out.generations[1].task == "inpainting"
    control = load_task(flexip, "controlnet", "canny")
    assert control.pipe.unet is flexip.pipe.unet and control.pipe.controlnet is not None
    inputs = prepare("control", image=scene, control_scale=0.5, side=64, max_side=512)
    first = control("a toy", subject=subject, gate=0.5, seed=3, num_inference_steps=2, height=64, width=64,
                    pipeline_kwargs=inputs.pipeline_kwargs, output_type="np").arrays
    off = control("a toy", subject=subject, gate=0.5, seed=3, num_inference_steps=2, height=64, width=64,
                  pipeline_kwargs={**inputs.pipeline_kwargs, "controlnet_conditioning_scale": 0.0},
                  output_type="np").arrays
    assert np.abs(first - off).max() > 1e-4  # the edge map steers the image
    with pytest.raises(ValueError, match="unknown control kind 'depth'; profile 'tiny' has: canny"):
        load_task(flexip, "controlnet", "depth")


def test_what_a_profile_cannot_run_is_said_before_loading():
    mini = load_profile("mini")
    assert "names no ControlNet" in task_unavailable(mini, "controlnet")
    assert "32-channel latent space" in task_unavailable(mini, "inpainting")
    assert task_unavailable(mini, "image-to-image") is None
    assert task_unavailable(load_profile("sd15"), "inpainting") is None  # it names an inpainting base


@pytest.mark.parametrize("field, task, control", [("inpaint_base", "inpainting", None),
                                                   ("control", "controlnet", "canny")])
def test_task_weights_missing_offline_name_the_download(monkeypatch, field, task, control):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = "flexip-tests/not-in-any-cache"
    value = {"canny": missing} if field == "control" else missing
    flexip = FlexIPPipeline.from_profile("tiny", **{field: value})
    with pytest.raises(WeightsNotFound, match=f"hf download {missing}"):
        load_task(flexip, task, control)
    assert flexip("a toy", subject=flexip.encode_subject([Image.new("RGB", (64, 64), "red")]), gate=0.5,
                  num_inference_steps=1).images


# --- a batch: several images at one γ with consecutive seeds, in one batched call ---------------------------
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
