"""FlexIP on diffusers' SDXL pipelines (issue 32, item 1), on the tiny SDXL built from config dicts.

One branch at weight s, and both at once, equal StableDiffusionXLPipeline + load_ip_adapter + set_ip_adapter_scale
(synthetic IP-Adapter files in the published SDXL ViT-H layout, plain and Plus); a γ sweep equals single calls;
branch windows act; the tiny-sdxl profile renders every task; attach/detach on a user's SDXL pipeline; SD1.5 files
and single files of the other family are refused naming what to use; convert-ip-adapter and single-file SDXL
checkpoints round-trip.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from PIL import Image

from flexip_core import FlexIPPipeline
from flexip_core.generation.attention import GatedCrossAttnProcessor
from flexip_core.generation.gate import GateSchedule
from flexip_core.loading.assembly import ensure_built, load_task
from flexip_core.loading.sources import WeightsNotFound
from flexip_core.loading.tiny import CLIP_VISION, write_single_file_checkpoint, write_synthetic_ip_adapter_files
from tests.test_ip_adapter_equivalence import image_embeds

PROMPT = "a photo of sks dog on the beach"
RUN = dict(num_inference_steps=2, height=64, width=64, seed=4, output_type="np")
TOLERANCE = 1e-4  # max abs difference on [0, 1] images
VISIBLE = 2e-3  # mean abs difference that counts as another image
CLIP_SIZES = dict(clip_embed_dim=CLIP_VISION["projection_dim"], clip_hidden_dim=CLIP_VISION["hidden_size"])


@pytest.fixture(scope="module")
def tiny() -> Path:
    return ensure_built("tiny")


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A fixed photo-like image (smooth colours plus noise); no DreamBench needed."""
    rng = np.random.RandomState(0)
    ramp = np.linspace(0, 1, 64)[None, :, None] * np.array([0.9, 0.4, 0.1]) + 0.05
    pixels = np.clip(ramp + 0.15 * rng.rand(64, 64, 3), 0, 1)
    return Image.fromarray((pixels * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def xl_files(tiny, tmp_path_factory) -> dict:
    """{layout: path}: ip-adapter_sdxl_vit-h / ip-adapter-plus_sdxl_vit-h.safetensors for the tiny SDXL UNet."""
    unet = UNet2DConditionModel.from_pretrained(tiny / "sdxl" / "base", subfolder="unet")
    paths = write_synthetic_ip_adapter_files(unet, tmp_path_factory.mktemp("ip-sdxl"), family="sdxl",
                                             formats=("safetensors",), **CLIP_SIZES)
    return {layout: path for (layout, _), path in paths.items()}


@pytest.fixture(scope="module")
def ours(xl_files) -> FlexIPPipeline:
    """tiny-sdxl with the Plus file in preservation and the plain file in personalization."""
    return FlexIPPipeline.from_profile("tiny-sdxl", preservation=str(xl_files["plus"]),
                                       personalization=str(xl_files["plain"]))


@pytest.fixture(scope="module")
def native() -> FlexIPPipeline:
    """tiny-sdxl as shipped: its native FlexIP adapter."""
    return FlexIPPipeline.from_profile("tiny-sdxl")


@pytest.fixture(scope="module")
def subject(ours, photo):
    return ours.encode_subject([photo])


@pytest.fixture(scope="module")
def off(ours, subject) -> np.ndarray:
    """Both branches off: the base model alone."""
    return ours(PROMPT, subject=subject, branch_weights=(0.0, 0.0), scheduler=None, **RUN).arrays


def reference(ours: FlexIPPipeline, subject, layouts_scales: list[tuple[str, float]], xl_files) -> np.ndarray:
    """diffusers' StableDiffusionXLPipeline with its own IP-Adapters (one per (layout, scale), embeddings from our
    subject passed in) sampling with a copy of our scheduler: its image for PROMPT at RUN's seed and size."""
    paths = [xl_files[layout] for layout, _ in layouts_scales]
    pipe = StableDiffusionXLPipeline.from_pretrained(ours.profile.base)
    pipe.scheduler = type(ours.pipe.scheduler).from_config(ours.pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter([str(p.parent) for p in paths], subfolder=[""] * len(paths),
                         weight_name=[p.name for p in paths], image_encoder_folder=None)
    pipe.set_ip_adapter_scale([scale for _, scale in layouts_scales])
    return pipe(PROMPT, ip_adapter_image_embeds=[image_embeds(subject, layout) for layout, _ in layouts_scales],
                num_inference_steps=RUN["num_inference_steps"], height=RUN["height"], width=RUN["width"],
                guidance_scale=ours.defaults.guidance_scale, output_type="np",
                generator=torch.Generator("cpu").manual_seed(RUN["seed"])).images


@pytest.mark.parametrize("layout, scale", [("plus", 0.6), ("plain", 0.8)])
def test_one_branch_equals_diffusers_sdxl_ip_adapter(ours, subject, off, xl_files, layout, scale):
    weights = (scale, 0.0) if layout == "plus" else (0.0, scale)  # Plus feeds preservation, plain personalization
    got = ours(PROMPT, subject=subject, branch_weights=weights, scheduler=None, **RUN).arrays
    want = reference(ours, subject, [(layout, scale)], xl_files)
    assert np.abs(got - want).max() <= TOLERANCE
    assert np.abs(got - off).mean() > VISIBLE  # the branch really acts: the equality above is not vacuous


def test_both_branches_equal_two_diffusers_ip_adapters(ours, subject, xl_files):
    got = ours(PROMPT, subject=subject, branch_weights=(0.6, 0.8), scheduler=None, **RUN).arrays
    want = reference(ours, subject, [("plus", 0.6), ("plain", 0.8)], xl_files)
    assert np.abs(got - want).max() <= TOLERANCE


def test_gate_sweep_in_one_call_equals_single_calls(native, photo):
    subject = native.encode_subject([photo])
    sweep = native(PROMPT, subject=subject, gate=[0.1, 0.9], **RUN)
    singles = [native(PROMPT, subject=subject, gate=g, **RUN).arrays[0] for g in (0.1, 0.9)]
    assert np.abs(sweep.arrays - np.stack(singles)).max() <= TOLERANCE
    assert np.abs(sweep.arrays[0] - sweep.arrays[1]).mean() > VISIBLE  # γ moves the SDXL image
    assert [p["gate"] for p in sweep.parameters] == [0.1, 0.9] and sweep.parameters[0]["profile"] == "tiny-sdxl"


def test_branch_windows_act_on_sdxl(native, photo):
    """2 steps (progress 0 and 0.5): identity from 0.6 on never acts, identity until 0.4 acts on the first only."""
    subject = native.encode_subject([photo])
    run = dict(RUN, subject=subject)
    never = native(PROMPT, branch_weights=(0.8, 0.5), gate_schedule=GateSchedule(pres_from=0.6), **run).arrays
    without = native(PROMPT, branch_weights=(0.0, 0.5), **run).arrays
    first = native(PROMPT, branch_weights=(0.8, 0.5), gate_schedule=GateSchedule(pres_until=0.4), **run).arrays
    assert np.array_equal(never, without)
    assert np.abs(first - without).mean() > VISIBLE


def test_profile_renders_with_previews_and_notes(native, photo):
    steps = []
    long_prompt = " ".join(["a photo of a red dog on the beach"] * 12)  # about 100 tokens for both tokenizers
    out = native(long_prompt, subject=native.encode_subject([photo]), gate=0.5, callback=lambda i, n, p: steps.append(
        (i, n, [image.size for image in p])), **RUN)
    assert type(native.pipe).__name__ == "StableDiffusionXLPipeline" and native.family == "sdxl"
    assert out.arrays.shape == (1, 64, 64, 3) and np.isfinite(out.arrays).all()
    assert steps == [(1, 2, [(8, 8)]), (2, 2, [(8, 8)])]  # 8x8 latents at 64 px: SDXL's previews
    assert any("so the end was cut off" in w for w in out.warnings)
    assert any("tiny-sdxl profile has random weights" in w for w in out.warnings)
    assert native.vae_decoder.upcast  # SDXL's VAE config says force_upcast: decoded in fp32 as diffusers does


@pytest.mark.parametrize("task", ["image-to-image", "inpainting", "controlnet"])
def test_every_task_renders_on_sdxl(native, photo, task):
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    inputs = {"image-to-image": {"image": photo, "strength": 0.7},
              "inpainting": {"image": photo, "mask_image": mask},
              "controlnet": {"image": photo.convert("L").convert("RGB")}}[task]
    flexip = load_task(native, task, control="canny")
    classes = {"image-to-image": "StableDiffusionXLImg2ImgPipeline", "inpainting": "StableDiffusionXLInpaintPipeline",
               "controlnet": "StableDiffusionXLControlNetPipeline"}
    assert type(flexip.pipe).__name__ == classes[task] and flexip.family == "sdxl"
    if task == "inpainting":
        assert flexip.pipe.unet.config.in_channels == 9  # the profile's inpainting base, not the base itself
    run = {k: v for k, v in RUN.items() if task != "image-to-image" or k not in ("height", "width")}
    out = flexip(PROMPT, subject=flexip.encode_subject([photo]), gate=0.5, pipeline_kwargs=inputs, **run)
    assert out.arrays.shape == (1, 64, 64, 3) and np.isfinite(out.arrays).all()
    assert out.generations[0].task == task


def test_attach_and_detach_on_a_users_sdxl_pipeline(tiny):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny / "sdxl" / "base")
    own = {name: type(p) for name, p in pipe.unet.attn_processors.items()}
    flexip = FlexIPPipeline.attach(pipe, adapter=str(tiny / "sdxl" / "flexip_adapter.safetensors"),
                                   clip_encoder=str(tiny / "image_encoder"), dino_encoder=str(tiny / "dino"))
    gated = [n for n, p in pipe.unet.attn_processors.items() if isinstance(p, GatedCrossAttnProcessor)]
    assert flexip.family == "sdxl" and len(gated) == len(flexip.adapter.config.layers) == 8
    assert (flexip.defaults.height, flexip.defaults.guidance_scale) == (64, 5.0)  # diffusers' SDXL: the UNet's size
    inpaint = flexip.for_task("inpainting")  # diffusers' other SDXL pipelines have no default_sample_size
    assert inpaint.defaults.height == 64 and inpaint.pipe.unet is pipe.unet
    assert flexip.detach() is pipe
    assert {name: type(p) for name, p in pipe.unet.attn_processors.items()} == own


def test_sdxl_own_arguments_are_refused_in_pipeline_kwargs(native, photo):
    subject = native.encode_subject([photo])
    with pytest.raises(ValueError, match="may not set prompt_2.*second text encoder gets FlexIP's prompt"):
        native(PROMPT, subject=subject, pipeline_kwargs={"prompt_2": "another"}, **RUN)
    with pytest.raises(ValueError, match="may not set pooled_prompt_embeds"):
        native(PROMPT, subject=subject, pipeline_kwargs={"pooled_prompt_embeds": torch.zeros(1, 32)}, **RUN)


def test_decoding_upcasts_watermarks_and_keeps_sd15_as_it_was(native, tiny_pipe, monkeypatch):
    """SDXL: an fp16 VAE with force_upcast is decoded by an fp32 copy (the fp16 one never runs), and the pipeline's
    watermarker, when it has one, marks what FlexIP decodes itself; SD1.5 keeps neither."""
    from flexip_core.generation.devices import SafeVaeDecoder

    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    half = type(native.vae).from_config(native.vae.config)
    half.load_state_dict(native.vae.state_dict())
    half = half.to(torch.float16)
    monkeypatch.setattr(half, "decode", lambda *a, **k: pytest.fail("the fp16 VAE ran despite force_upcast"))
    with torch.no_grad():
        decoded = SafeVaeDecoder(half, "cpu", upcast=True)(latents)
    assert decoded.dtype == torch.float32 and torch.isfinite(decoded).all()

    class Marker:
        def apply_watermark(self, images):
            return images * 0 + 1  # white

    monkeypatch.setattr(native.pipe, "watermark", Marker(), raising=False)
    with torch.no_grad():
        assert np.all(native._decode(latents) == 1.0)
    assert not tiny_pipe.vae_decoder.upcast and getattr(tiny_pipe.pipe, "watermark", None) is None


def test_ip_adapter_files_of_the_other_family_are_refused(tiny, tiny_pipe, xl_files, tmp_path):
    sd15 = write_synthetic_ip_adapter_files(tiny_pipe.unet, tmp_path, formats=("safetensors",), **CLIP_SIZES)
    with pytest.raises(ValueError) as caught:
        FlexIPPipeline.from_profile("tiny-sdxl", preservation=str(sd15[("plus", "safetensors")]),
                                    personalization=str(sd15[("plain", "safetensors")]))
    message = str(caught.value)
    assert "ip-adapter-plus_sd15.safetensors does not fit this UNet (an SDXL UNet: 8 cross-attention layers" in message
    assert "made for SDXL" in message and "sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors" in message
    with pytest.raises(ValueError, match=r"ip-adapter_sdxl_vit-h.safetensors does not fit this UNet \(an SD1.5 "
                                         r"UNet.*made for SD1.5.*models/ip-adapter_sd15.safetensors"):
        FlexIPPipeline.from_profile("tiny", preservation=str(xl_files["plain"]),
                                    personalization=str(xl_files["plain"]))


@pytest.fixture(scope="module")
def xl_checkpoint(tiny, tmp_path_factory) -> Path:
    return write_single_file_checkpoint(tiny / "sdxl" / "base", tmp_path_factory.mktemp("xl") / "xl-model.safetensors")


def test_single_file_sdxl_checkpoint_loads_offline_with_a_local_config(native, photo, tiny, xl_checkpoint,
                                                                       monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = FlexIPPipeline.from_profile("tiny-sdxl", base=str(xl_checkpoint), base_config=str(tiny / "sdxl" / "base"))
    assert type(pipe.pipe).__name__ == "StableDiffusionXLPipeline"
    subject = native.encode_subject([photo])  # same encoder and adapter: same subject
    want = native(PROMPT, subject=subject, gate=[0.3, 0.9], **RUN).arrays
    got = pipe(PROMPT, subject=subject, gate=[0.3, 0.9], **RUN).arrays
    assert np.abs(got - want).max() <= 1e-6


def test_single_files_of_the_other_family_are_refused(tiny, xl_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="xl-model.safetensors is an SDXL checkpoint, and this profile runs Stable "
                                         "Diffusion 1.5: use it with an SDXL profile \\(--profile sdxl"):
        FlexIPPipeline.from_profile("tiny", base=str(xl_checkpoint))
    sd15 = write_single_file_checkpoint(tiny / "base", tmp_path / "sd15-model.safetensors")
    with pytest.raises(ValueError, match="sd15-model.safetensors is a Stable Diffusion 1.5 checkpoint, and this "
                                         "profile runs SDXL: use it with an SD1.5 profile \\(--profile sd15"):
        FlexIPPipeline.from_profile("tiny-sdxl", base=str(sd15))


def test_sdxl_weights_missing_offline_say_what_to_download(xl_checkpoint, monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    base = "stabilityai/stable-diffusion-xl-base-1.0"
    with pytest.raises(WeightsNotFound, match=rf"base '{base}' is not in the local Hugging Face cache.*hf download "
                                              rf"{base} --include '\*\.json'.*'text_encoder\*/model.safetensors'"):
        FlexIPPipeline.from_profile("sdxl", device="cpu")
    with pytest.raises(WeightsNotFound, match=r"hf download stabilityai/stable-diffusion-xl-base-1.0 --include "
                                              r"'\*\.json' --include '\*\.txt'.*an SDXL model with --base-config PATH"):
        FlexIPPipeline.from_profile("tiny-sdxl", base=str(xl_checkpoint))


def test_convert_ip_adapter_round_trip_for_sdxl(ours, xl_files, tmp_path):
    from flexip_core.cli import main

    out = tmp_path / "converted-sdxl.safetensors"
    code = main(["convert-ip-adapter", "--profile", "tiny-sdxl", "--preservation", str(xl_files["plus"]),
                 "--personalization", str(xl_files["plain"]), "--out", str(out)])
    assert code == 0 and out.is_file()
    converted = FlexIPPipeline.from_profile("tiny-sdxl", adapter=str(out)).adapter
    assert converted.config == ours.adapter.config
    theirs, mine = converted.state_dict(), ours.adapter.state_dict()
    assert theirs.keys() == mine.keys() and all(torch.equal(theirs[k], mine[k]) for k in mine)
    assert main(["convert-ip-adapter", "--profile", "tiny-sdxl", "--family", "sd15", "--preservation",
                 str(xl_files["plus"]), "--personalization", str(xl_files["plain"]), "--out", str(out)]) == 2


def test_the_sdxl_layout_converts_without_weights():
    """--family sdxl: the published SDXL UNet's 70 cross-attention layers (keys 1, 3, ..., 139), 2048-wide tokens."""
    from flexip_core.loading.ip_adapter import processor_index
    from flexip_core.loading.sources import unet_layout

    layers, width = unet_layout(None, family="sdxl")
    assert width == 2048 and len(layers) == 70 and processor_index(69) == 139
    assert [w for _, w in layers] == [640] * 4 + [1280] * 20 + [1280] * 30 + [640] * 6 + [1280] * 10
    assert layers[0][0] == "down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"
    assert layers[-1][0].startswith("mid_block")
