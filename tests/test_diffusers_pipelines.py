"""FlexIP attached to diffusers' own SD1.5 pipelines equals diffusers' IP-Adapter on the same pipeline class.

Tiny random models saved to disk (text-to-image, image-to-image, inpainting with the 9-channel inpainting UNet and
with a plain 4-channel UNet, ControlNet), synthetic IP-Adapter files in the published layout: the Plus file in the
preservation branch, the plain file in personalization. One branch at weight s against `load_ip_adapter` +
`set_ip_adapter_scale(s)` on a pipeline of the same class loaded from the same folder, same scheduler and seeds.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image

from flexip_core import FlexIPPipeline, GenerationCancelled
from flexip_core.generation.attention import GatedCrossAttnProcessor
from flexip_core.loading.assembly import ensure_built
from flexip_core.loading.tiny import CLIP_VISION, build_tiny_controlnet, write_synthetic_ip_adapter_files
from tests.test_ip_adapter_equivalence import image_embeds

PROMPT = "a photo of sks dog on the beach"
SEED, STEPS, GUIDANCE, SIZE = 4, 3, 7.5, 64
TOLERANCE = 1e-4  # max abs difference on [0, 1] images
VISIBLE = 2e-3  # mean abs difference that counts as another image: 20x the equality tolerance
BRANCH_OF = {"plus": 0, "plain": 1}  # (w_pres, w_pers) index of each IP-Adapter file's branch
# case -> (diffusers class, folder under the tiny build); "inpainting-4ch" is the inpainting pipeline over the base
CASES = {
    "text-to-image": (StableDiffusionPipeline, "base"),
    "image-to-image": (StableDiffusionImg2ImgPipeline, "base"),
    "inpainting": (StableDiffusionInpaintPipeline, "inpainting"),
    "inpainting-4ch": (StableDiffusionInpaintPipeline, "base"),
    "controlnet": (StableDiffusionControlNetPipeline, "base"),
}
WITH_INPUT = [case for case in CASES if case != "text-to-image"]


@pytest.fixture(scope="module")
def tiny() -> Path:
    return ensure_built("tiny")


@pytest.fixture(scope="module")
def ip_files(tiny, tmp_path_factory):
    """{(layout, format): path} for the tiny UNet; the 9-channel UNet has the same cross-attention layers."""
    unet = UNet2DConditionModel.from_pretrained(tiny / "base", subfolder="unet")
    return write_synthetic_ip_adapter_files(
        unet, tmp_path_factory.mktemp("ip-adapter"),
        clip_embed_dim=CLIP_VISION["projection_dim"], clip_hidden_dim=CLIP_VISION["hidden_size"])


@pytest.fixture(scope="module")
def controlnets(tiny, tmp_path_factory) -> list[Path]:
    """Two different tiny ControlNets on disk: the tiny build's and another built with seed 1."""
    folder = tmp_path_factory.mktemp("controlnets")
    unet = UNet2DConditionModel.from_pretrained(tiny / "base", subfolder="unet")
    nets = [ControlNetModel.from_pretrained(tiny / "controlnet"), build_tiny_controlnet(unet, seed=1)]
    paths = []
    for index, net in enumerate(nets):
        paths.append(folder / f"controlnet-{index}")
        net.save_pretrained(paths[-1])
    return paths


def build(case: str, tiny: Path, controlnet=None):
    """The case's diffusers pipeline loaded from the tiny folder as a user loads one (its own scheduler);
    `controlnet`: a ControlNetModel or a list of them, for the ControlNet case."""
    cls, folder = CASES[case]
    extra = {}
    if case == "controlnet":
        extra["controlnet"] = controlnet
    pipe = cls.from_pretrained(tiny / folder, safety_checker=None, feature_extractor=None,
                               requires_safety_checker=False, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def attach(pipe, tiny: Path, ip_files) -> FlexIPPipeline:
    return FlexIPPipeline.attach(pipe, preservation=str(ip_files[("plus", "safetensors")]),
                                 personalization=str(ip_files[("plain", "safetensors")]),
                                 clip_encoder=str(tiny / "image_encoder"))


def with_ip_adapter(pipe, path: Path, scale: float):
    """diffusers' own IP-Adapter support on `pipe` (embeddings passed in, so no image encoder is loaded)."""
    pipe.load_ip_adapter(str(path.parent), subfolder="", weight_name=path.name, image_encoder_folder=None)
    pipe.set_ip_adapter_scale(scale)
    return pipe


def first_controlnet(case: str, controlnets: list[Path]):
    return ControlNetModel.from_pretrained(controlnets[0]) if case == "controlnet" else None


@pytest.fixture(scope="module")
def flexip(tiny, ip_files, controlnets):
    """FlexIP attached to the case's pipeline, one per case, shared by the tests that leave it as it is."""
    cache = {}

    def get(case: str) -> FlexIPPipeline:
        if case not in cache:
            cache[case] = attach(build(case, tiny, first_controlnet(case, controlnets)), tiny, ip_files)
        return cache[case]

    return get


@pytest.fixture(scope="module")
def reference(tiny, ip_files, controlnets):
    """diffusers' pipeline of the case's class with the `layout` IP-Adapter file at `scale`."""
    cache = {}

    def get(case: str, layout: str, scale: float):
        if (case, layout) not in cache:
            pipe = build(case, tiny, first_controlnet(case, controlnets))
            cache[(case, layout)] = with_ip_adapter(pipe, ip_files[(layout, "safetensors")], 1.0)
        pipe = cache[(case, layout)]
        pipe.set_ip_adapter_scale(scale)
        return pipe

    return get


@pytest.fixture(scope="module")
def subject(flexip, photos):
    return flexip("text-to-image").encode_subject([photos["dog"]])


def half_mask(side: str) -> Image.Image:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    if side == "left":
        mask[:, : SIZE // 2] = 255
    else:
        mask[:, SIZE // 2:] = 255
    return Image.fromarray(mask)


@pytest.fixture(scope="module")
def inputs(photos):
    """The task's own inputs, two versions (A, B) that differ in that input only."""
    square = {name: photo.convert("RGB").resize((SIZE, SIZE)) for name, photo in photos.items()}
    mask_a = {"image": square["dog"], "mask_image": half_mask("left")}
    mask_b = {"image": square["dog"], "mask_image": half_mask("right")}
    return {
        "text-to-image": ({}, None),
        "image-to-image": ({"image": square["dog"]}, {"image": square["cat"]}),
        "inpainting": (mask_a, mask_b),
        "inpainting-4ch": (mask_a, mask_b),
        "controlnet": ({"image": square["cat"]}, {"image": square["backpack"]}),
    }


def size_of(flexip_or_pipe) -> dict:
    """height/width for text-to-image; the other tasks take their size from their input image."""
    pipe = flexip_or_pipe.pipe if isinstance(flexip_or_pipe, FlexIPPipeline) else flexip_or_pipe
    return {"height": SIZE, "width": SIZE} if type(pipe) is StableDiffusionPipeline else {}


def ours(flexip: FlexIPPipeline, subject, task_inputs: dict, **kwargs) -> np.ndarray:
    return flexip(PROMPT, subject=subject, num_inference_steps=STEPS, guidance_scale=GUIDANCE, seed=SEED,
                  output_type="np", pipeline_kwargs=task_inputs, **size_of(flexip), **kwargs).arrays


def theirs(pipe, subject, layout: str, task_inputs: dict) -> np.ndarray:
    return pipe(PROMPT, ip_adapter_image_embeds=[image_embeds(subject, layout)], num_inference_steps=STEPS,
                guidance_scale=GUIDANCE, generator=[torch.Generator("cpu").manual_seed(SEED)], output_type="np",
                **size_of(pipe), **task_inputs).images


def one_branch(layout: str, scale: float) -> tuple[float, float]:
    weights = [0.0, 0.0]
    weights[BRANCH_OF[layout]] = scale
    return tuple(weights)


def differ(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


# --- 1. one branch equals diffusers' IP-Adapter, on every task ------------------------------------------------
@pytest.mark.parametrize("layout, scale", [("plus", 0.6), ("plain", 0.8)])
@pytest.mark.parametrize("case", list(CASES))
def test_one_branch_equals_diffusers_ip_adapter(flexip, reference, subject, inputs, case, layout, scale):
    task_inputs = inputs[case][0]
    got = ours(flexip(case), subject, task_inputs, branch_weights=one_branch(layout, scale))
    want = theirs(reference(case, layout, scale), subject, layout, task_inputs)
    assert got.shape == want.shape == (1, SIZE, SIZE, 3)
    assert np.abs(got - want).max() <= TOLERANCE
    off = ours(flexip(case), subject, task_inputs, branch_weights=(0.0, 0.0))
    assert differ(got, off) > VISIBLE  # the branch really acts: the equality above is not vacuous


# --- 2. the task's own input steers FlexIP as it steers diffusers ---------------------------------------------
@pytest.mark.parametrize("case", WITH_INPUT)
def test_the_task_input_steers_flexip_as_it_steers_diffusers(flexip, reference, subject, inputs, case):
    results = []
    for task_inputs in inputs[case]:
        got = ours(flexip(case), subject, task_inputs, branch_weights=one_branch("plus", 0.6))
        want = theirs(reference(case, "plus", 0.6), subject, "plus", task_inputs)
        assert np.abs(got - want).max() <= TOLERANCE
        results.append(got)
    assert differ(*results) > VISIBLE  # start image, mask or control image A vs B


def test_inpainting_a_crop_around_the_mask_equals_diffusers(flexip, reference, subject, inputs):
    """padding_mask_crop: diffusers inpaints a crop around the mask and pastes it back onto the PIL image."""
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[24:40, 20:36] = 255
    start = inputs["inpainting"][0]["image"]
    task_inputs = {"image": start, "mask_image": Image.fromarray(mask), "padding_mask_crop": 4}
    got = ours(flexip("inpainting"), subject, task_inputs, branch_weights=one_branch("plus", 0.6))
    pipe = reference("inpainting", "plus", 0.6)
    want = pipe(PROMPT, ip_adapter_image_embeds=[image_embeds(subject, "plus")], num_inference_steps=STEPS,
                guidance_scale=GUIDANCE, generator=[torch.Generator("cpu").manual_seed(SEED)], output_type="pil",
                **task_inputs).images
    want = np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in want])
    assert got.shape == want.shape == (1, SIZE, SIZE, 3)
    assert np.abs(got - want).max() <= 1 / 255 + 1e-6  # both rounded to 8 bits
    kept = mask == 0
    assert np.array_equal(np.round(got[0][kept] * 255), np.asarray(start)[kept])  # outside the mask: the photo
    off = ours(flexip("inpainting"), subject, task_inputs, branch_weights=(0.0, 0.0))
    assert differ(got, off) > VISIBLE


# --- 3. several ControlNets -----------------------------------------------------------------------------------
def test_several_controlnets_equal_diffusers(tiny, ip_files, controlnets, flexip, subject, inputs):
    nets = lambda: [ControlNetModel.from_pretrained(path) for path in controlnets]  # noqa: E731
    multi = attach(build("controlnet", tiny, controlnet=nets()), tiny, ip_files)
    reference = with_ip_adapter(build("controlnet", tiny, controlnet=nets()), ip_files[("plain", "safetensors")], 0.8)
    task_inputs = {"image": [inputs["controlnet"][0]["image"], inputs["controlnet"][1]["image"]],
                   "controlnet_conditioning_scale": [1.0, 0.7]}

    got = ours(multi, subject, task_inputs, branch_weights=one_branch("plain", 0.8))
    assert np.abs(got - theirs(reference, subject, "plain", task_inputs)).max() <= TOLERANCE
    assert differ(got, ours(multi, subject, task_inputs, branch_weights=(0.0, 0.0))) > VISIBLE
    single = ours(flexip("controlnet"), subject, inputs["controlnet"][0], branch_weights=one_branch("plain", 0.8))
    assert differ(got, single) > VISIBLE  # the second ControlNet acts


# --- 4. a γ sweep in one call equals single calls, both branches on ------------------------------------------
@pytest.mark.parametrize("case", ["text-to-image", "image-to-image", "inpainting", "controlnet"])
def test_gate_sweep_in_one_call_equals_single_calls(flexip, subject, inputs, case):
    task_inputs, gates = inputs[case][0], [0.0, 0.5, 1.0]
    swept = ours(flexip(case), subject, task_inputs, gate=gates)
    assert swept.shape == (3, SIZE, SIZE, 3)
    for image, gate in zip(swept, gates):
        assert np.abs(image - ours(flexip(case), subject, task_inputs, gate=gate)[0]).max() <= TOLERANCE
    assert differ(swept[0], swept[1]) > VISIBLE and differ(swept[1], swept[2]) > VISIBLE


# --- 5. the user's scheduler is kept ----------------------------------------------------------------------------
@pytest.mark.parametrize("when", ["before attach", "after attach"])
def test_the_users_scheduler_is_kept(tiny, ip_files, reference, subject, when):
    pipe = build("text-to-image", tiny)
    users = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    if when == "before attach":
        pipe.scheduler = users
    flexip = attach(pipe, tiny, ip_files)
    if when == "after attach":
        flexip.pipe.scheduler = users
    weights = one_branch("plus", 0.6)

    got = ours(flexip, subject, {}, branch_weights=weights)
    assert flexip.pipe.scheduler is users
    diffusers_pipe = reference("text-to-image", "plus", 0.6)  # shared: its own scheduler is put back below
    base_scheduler = diffusers_pipe.scheduler
    try:
        diffusers_pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(users.config)
        assert np.abs(got - theirs(diffusers_pipe, subject, "plus", {})).max() <= TOLERANCE
        diffusers_pipe.scheduler = DDIMScheduler.from_config(users.config)
        ddim_reference = theirs(diffusers_pipe, subject, "plus", {})
    finally:
        diffusers_pipe.scheduler = base_scheduler
    assert differ(got, theirs(diffusers_pipe, subject, "plus", {})) > VISIBLE  # the base's PNDM: another image

    ddim = ours(flexip, subject, {}, branch_weights=weights, scheduler="ddim")  # for this call only
    assert np.abs(ddim - ddim_reference).max() <= TOLERANCE
    assert flexip.pipe.scheduler is users
    assert np.array_equal(ours(flexip, subject, {}, branch_weights=weights), got)


# --- 6. detach -------------------------------------------------------------------------------------------------
def test_detach_gives_the_pipeline_back_its_own_processors(tiny, ip_files, subject):
    pipe = build("text-to-image", tiny)
    pipe.unet.set_attn_processor(pipe.unet.attn_processors)  # one processor object per layer, as diffusers keeps
    own = dict(pipe.unet.attn_processors)
    flexip = attach(pipe, tiny, ip_files)
    assert any(isinstance(p, GatedCrossAttnProcessor) for p in pipe.unet.attn_processors.values())
    ours(flexip, subject, {}, gate=[0.3, 0.7])

    assert flexip.detach() is pipe
    restored = pipe.unet.attn_processors
    assert restored.keys() == own.keys() and all(restored[name] is own[name] for name in own)
    run = dict(num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="np")
    after = pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(SEED), **run).images
    fresh = build("text-to-image", tiny)(PROMPT, generator=torch.Generator("cpu").manual_seed(SEED), **run).images
    assert np.array_equal(after, fresh)


# --- 7. previews and cancellation through diffusers' callback ---------------------------------------------------
@pytest.mark.parametrize("case", ["text-to-image", "inpainting"])
def test_callback_previews_every_step_and_cancels(flexip, subject, inputs, case):
    pipe, task_inputs, gates = flexip(case), inputs[case][0], [0.2, 0.8]
    seen = []

    def record(step, total, previews):
        seen.append((step, total, [preview.size for preview in previews]))

    before = ours(pipe, subject, task_inputs, gate=gates, callback=record)
    total = seen[0][1]
    assert total == len(pipe.pipe.scheduler.timesteps) >= STEPS
    assert seen == [(step, total, [(SIZE // 8, SIZE // 8)] * len(gates)) for step in range(1, total + 1)]

    stop, steps = GenerationCancelled("stop"), []

    def cancel(step, total, previews):
        steps.append(step)
        raise stop

    with pytest.raises(GenerationCancelled) as raised:
        ours(pipe, subject, task_inputs, gate=gates, callback=cancel)
    assert raised.value is stop and steps == [1]
    assert np.array_equal(ours(pipe, subject, task_inputs, gate=gates), before)  # the same object still works


# --- 8. errors --------------------------------------------------------------------------------------------------
def test_attach_refuses_other_pipelines(tiny, ip_files):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unconditional = DDPMPipeline(unet=UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D")),
        scheduler=DDPMScheduler())
    supported = ("StableDiffusionPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, "
                 "StableDiffusionControlNetPipeline")
    for pipe, name in ((object(), "object"), (unconditional, "DDPMPipeline")):
        with pytest.raises(ValueError, match=name) as raised:
            attach(pipe, tiny, ip_files)
        assert supported in str(raised.value)


@pytest.mark.parametrize("key", ["prompt_embeds", "generator"])
def test_pipeline_kwargs_may_not_set_flexips_own_arguments(flexip, subject, key):
    value = {"prompt_embeds": torch.zeros(1, 77, 32), "generator": torch.Generator("cpu").manual_seed(1)}[key]
    with pytest.raises(ValueError, match=f"may not set {key}"):
        ours(flexip("text-to-image"), subject, {key: value})


def test_pipeline_kwargs_the_pipeline_does_not_take_are_refused(flexip, subject, inputs):
    with pytest.raises(ValueError, match="StableDiffusionPipeline takes no mask_image"):
        ours(flexip("text-to-image"), subject, {"mask_image": inputs["inpainting"][0]["mask_image"]})


@pytest.mark.parametrize("size", [{"height": SIZE}, {"width": SIZE}])
def test_image_to_image_refuses_a_size(flexip, subject, inputs, size):
    pipe = flexip("image-to-image")
    with pytest.raises(ValueError, match="takes its size from its input image"):
        pipe(PROMPT, subject=subject, num_inference_steps=STEPS, pipeline_kwargs=inputs["image-to-image"][0], **size)


@pytest.mark.parametrize("profile, parts, inputs", [
    ("sd15-inpaint", dict(base="inpainting"), ("image", "mask_image")),
    ("sd15-canny", dict(base="base", controlnet="controlnet"), ("image",)),
])
def test_a_task_is_a_profile(profile, parts, inputs, tiny, ip_files, photos):
    """The task profiles name their diffusers pipeline class; with their parts swapped for tiny ones they build that
    class, attach to it and run the task through pipeline_kwargs."""
    from flexip_core.loading.profiles import load_profile

    flexip = FlexIPPipeline.from_profile(
        profile, device="cpu", clip_encoder=str(tiny / "image_encoder"), dino_encoder=str(tiny / "dino"),
        preservation=str(ip_files[("plus", "safetensors")]), personalization=str(ip_files[("plain", "safetensors")]),
        **{part: str(tiny / folder) for part, folder in parts.items()})
    assert type(flexip.pipe).__name__ == load_profile(profile).pipeline
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    given = {"image": photos["cat"].resize((64, 64)), "mask_image": mask}
    out = flexip("a photo", subject=flexip.encode_subject([photos["dog"]]), gate=[0.2, 0.8], num_inference_steps=2,
                 pipeline_kwargs={name: given[name] for name in inputs})
    assert [image.size for image in out.images] == [(64, 64)] * 2
    assert {p["task"] for p in out.parameters} == {flexip.task} != {"text-to-image"}
