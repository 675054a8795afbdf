"""FlexIP on diffusers' AnimateDiffPipeline (the animate task): equal to diffusers' own IP-Adapter on the same pipeline,
γ sweeps as one batch of clips, previews and cancellation, for_task / load_task / profiles, clip files, memory check.

Tiny random models saved to disk and loaded back (the tiny build's base and its MotionAdapter), synthetic IP-Adapter
files in the published layout: the Plus file in the preservation branch, the plain file in personalization.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AnimateDiffPipeline, MotionAdapter, UNet2DConditionModel
from PIL import Image

from flexip_core import FlexIPPipeline, GenerationCancelled
from flexip_core.generation.devices import NotEnoughMemory
from flexip_core.generation.video import (
    VIDEO_FORMATS,
    check_clip_memory,
    estimate_clip_memory,
    mp4_available,
    read_frames,
    read_video,
    write_video,
)
from flexip_core.loading.assembly import ensure_built, load_task, task_unavailable
from flexip_core.loading.profiles import load_profile
from flexip_core.loading.sources import WeightsNotFound
from flexip_core.loading.tiny import CLIP_VISION, write_lora, write_synthetic_ip_adapter_files
from tests.conftest import REPO
from tests.test_ip_adapter_equivalence import image_embeds

PROMPT = "a photo of sks dog running on the beach"
SEED, STEPS, GUIDANCE, SIZE, FRAMES = 4, 2, 7.5, 64, 6
TOLERANCE = 1e-4  # max abs difference on [0, 1] frames
VISIBLE = 2e-3  # mean abs difference that counts as another clip: 20x the equality tolerance
RUN = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE, seed=SEED, height=SIZE, width=SIZE,
           num_frames=FRAMES, output_type="np")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models are bound by per-op overhead: on shared cores a second thread only waits (a tiny clip took 7x
    the CPU time with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny() -> Path:
    return ensure_built("tiny")


@pytest.fixture(scope="module")
def ip_files(tiny, tmp_path_factory):
    """{(layout, format): path} for the tiny UNet (the motion UNet has the same cross-attention layers)."""
    unet = UNet2DConditionModel.from_pretrained(tiny / "base", subfolder="unet")
    return write_synthetic_ip_adapter_files(
        unet, tmp_path_factory.mktemp("ip-adapter"), clip_embed_dim=CLIP_VISION["projection_dim"],
        clip_hidden_dim=CLIP_VISION["hidden_size"], formats=("safetensors",))


def animatediff(tiny: Path) -> AnimateDiffPipeline:
    """diffusers' AnimateDiffPipeline loaded as a user loads one: the base folder and a saved MotionAdapter."""
    pipe = AnimateDiffPipeline.from_pretrained(tiny / "base",
                                               motion_adapter=MotionAdapter.from_pretrained(tiny / "motion_adapter"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def flexip(tiny, ip_files) -> FlexIPPipeline:
    return FlexIPPipeline.attach(animatediff(tiny), preservation=str(ip_files[("plus", "safetensors")]),
                                 personalization=str(ip_files[("plain", "safetensors")]),
                                 clip_encoder=str(tiny / "image_encoder"))


@pytest.fixture(scope="module")
def subject(flexip):
    photo = Image.new("RGB", (64, 64), (235, 230, 220))
    photo.paste((190, 40, 30), (14, 18, 50, 46))
    photo.paste((30, 60, 170), (24, 26, 40, 38))
    return flexip.encode_subject([photo])


@pytest.fixture(scope="module")
def off(flexip, subject) -> np.ndarray:
    """Both branches off: AnimateDiff alone."""
    return flexip(PROMPT, subject=subject, branch_weights=(0.0, 0.0), **RUN).arrays


def reference(tiny, ip_files, subject, layouts_scales: list[tuple[str, float]]) -> np.ndarray:
    """diffusers' AnimateDiffPipeline with its own IP-Adapters (one per (layout, scale); embeddings from our subject
    passed in, so no image encoder is loaded): the clip's frames, (1, F, H, W, 3)."""
    pipe = animatediff(tiny)
    paths = [ip_files[(layout, "safetensors")] for layout, _ in layouts_scales]
    pipe.load_ip_adapter([str(p.parent) for p in paths], subfolder=[""] * len(paths),
                         weight_name=[p.name for p in paths], image_encoder_folder=None)
    pipe.set_ip_adapter_scale([scale for _, scale in layouts_scales])
    return pipe(PROMPT, ip_adapter_image_embeds=[image_embeds(subject, layout) for layout, _ in layouts_scales],
                num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE, width=SIZE,
                generator=torch.Generator("cpu").manual_seed(SEED), output_type="np").frames


def differ(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


# --- 1. equal to diffusers' IP-Adapter on AnimateDiff --------------------------------------------------------
@pytest.mark.parametrize("layout, weights", [("plus", (0.6, 0.0)), ("plain", (0.0, 0.8))])
def test_one_branch_equals_diffusers_animatediff_ip_adapter(flexip, tiny, ip_files, subject, off, layout, weights):
    got = flexip(PROMPT, subject=subject, branch_weights=weights, **RUN).arrays
    want = reference(tiny, ip_files, subject, [(layout, max(weights))])
    assert got.shape == want.shape == (1, FRAMES, SIZE, SIZE, 3)
    assert np.abs(got - want).max() <= TOLERANCE  # every frame
    assert differ(got, off) > VISIBLE  # the branch really acts: the equality above is not vacuous


def test_both_branches_equal_two_diffusers_ip_adapters(flexip, tiny, ip_files, subject):
    got = flexip(PROMPT, subject=subject, branch_weights=(0.6, 0.8), **RUN).arrays
    want = reference(tiny, ip_files, subject, [("plus", 0.6), ("plain", 0.8)])
    assert np.abs(got - want).max() <= TOLERANCE


def test_only_the_spatial_cross_attention_is_gated(flexip):
    from flexip_core.generation.attention import GatedCrossAttnProcessor

    gated = {name for name, p in flexip.pipe.unet.attn_processors.items() if isinstance(p, GatedCrossAttnProcessor)}
    assert gated == {name for name, _ in flexip.adapter.config.layers} and len(gated) == 4  # the tiny UNet's four
    assert not any("motion_modules" in name for name in gated)


# --- 2. a γ sweep is one batch of clips with the same noise --------------------------------------------------
def test_gate_sweep_in_one_call_equals_single_calls(flexip, subject):
    gates = [0.0, 0.5, 1.0]
    sweep = flexip(PROMPT, subject=subject, gate=gates, **RUN)
    assert sweep.arrays.shape == (3, FRAMES, SIZE, SIZE, 3)
    for clip, gate in zip(sweep.arrays, gates):
        assert np.abs(clip - flexip(PROMPT, subject=subject, gate=gate, **RUN).arrays[0]).max() <= TOLERANCE
    assert differ(sweep.arrays[0], sweep.arrays[2]) > VISIBLE  # γ moves the clip
    assert differ(sweep.arrays[0, 0], sweep.arrays[0, 1]) > VISIBLE  # and the frames differ from each other


def test_the_output_holds_frames_per_clip_and_their_settings(flexip, subject):
    out = flexip(PROMPT, subject=subject, gate=[0.2, 0.8], num_inference_steps=1, num_frames=4, fps=12, seed=3,
                 height=SIZE, width=SIZE)
    assert len(out.frames) == 2 and [len(clip) for clip in out.frames] == [4, 4]
    assert all(out.images[i] is out.frames[i][0] for i in range(2)) and out.images[0].size == (SIZE, SIZE)
    assert [p["num_frames"] for p in out.parameters] == [4, 4] and {p["fps"] for p in out.parameters} == {12}
    assert {p["task"] for p in out.parameters} == {"animate"} and [g.gate for g in out.generations] == [0.2, 0.8]
    assert out.arrays is None
    fast = flexip(PROMPT, subject=subject, gate=0.5, num_inference_steps=1, num_frames=4, seed=3, height=SIZE,
                  width=SIZE, decode="fast")  # the fast decoder, through AnimateDiff's video processor
    assert [len(clip) for clip in fast.frames] == [4] and fast.images[0].size == (SIZE, SIZE)
    latents = torch.randn(2, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0))
    assert [image.size for image in flexip.decode_fast(latents)] == [(SIZE, SIZE)] * 2


# --- 3. previews and cancellation ------------------------------------------------------------------------------
def test_callback_previews_each_clips_first_frame_every_step_and_cancels(flexip, subject):
    seen = []
    run = dict(RUN, gate=[0.2, 0.8])
    before = flexip(PROMPT, subject=subject, callback=lambda i, n, p: seen.append((i, n, [x.size for x in p])), **run)
    total = seen[0][1]
    assert seen == [(step, total, [(SIZE // 8, SIZE // 8)] * 2) for step in range(1, total + 1)]  # one per clip

    stop, steps = GenerationCancelled("stop"), []

    def cancel(step, total, previews):
        steps.append(step)
        raise stop

    with pytest.raises(GenerationCancelled) as raised:
        flexip(PROMPT, subject=subject, callback=cancel, **run)
    assert raised.value is stop and steps == [1]
    assert np.array_equal(flexip(PROMPT, subject=subject, **run).arrays, before.arrays)  # it still works


# --- 4. from a loaded text-to-image pipeline, and from profiles ----------------------------------------------
def test_for_task_and_load_task_animate_the_loaded_models(tiny_pipe):
    base = tiny_pipe
    clip = load_task(base, "animate")  # the profile's motion adapter, the base's components
    assert clip.task == "animate" and type(clip.pipe.unet).__name__ == "UNetMotionModel"
    assert clip.pipe.vae is base.pipe.vae and clip.encoder is base.encoder and clip.adapter is base.adapter
    assert clip.pipe.scheduler.config.beta_schedule == "linear"  # the motion modules' training betas
    assert base.pipe.scheduler.config.beta_schedule == "scaled_linear"  # the image pipeline keeps its own
    subject = base.encode_subject([Image.new("RGB", (64, 64), "red")])
    out = clip("a toy", subject=subject, gate=0.5, num_inference_steps=2, num_frames=4)
    assert len(out.frames[0]) == 4 and out.parameters[0]["profile"] == "tiny"
    assert base("a toy", subject=subject, num_inference_steps=1).images  # the image pipeline still renders
    assert load_task(clip, "animate") is clip
    with pytest.raises(ValueError, match="motion modules; for the other tasks"):
        clip.for_task("text-to-image")
    with pytest.raises(ValueError, match="needs an AnimateDiff motion adapter"):
        base.for_task("animate")


def test_for_task_keeps_the_dtype_of_the_shared_models(tiny):
    """diffusers' from_pipe casts every component to float32 unless told otherwise, shared ones included."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny / "base", dtype=torch.bfloat16, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    base = FlexIPPipeline.attach(pipe, adapter=str(tiny / "flexip_adapter.safetensors"),
                                 clip_encoder=str(tiny / "image_encoder"), dino_encoder=str(tiny / "dino"))
    motion = MotionAdapter.from_pretrained(tiny / "motion_adapter")
    clip = base.for_task("animate", motion_adapter=motion)
    assert pipe.unet.dtype == pipe.vae.dtype == clip.pipe.unet.dtype == torch.bfloat16


@pytest.mark.parametrize("profile, scheduler", [("sd15-animate", "DDIMScheduler"),
                                                ("sd15-animate-fast", "LCMScheduler")])
def test_the_animate_profiles_build_their_pipeline(profile, scheduler, tiny, ip_files, tmp_path):
    """The profiles name AnimateDiffPipeline and a motion adapter (the fast one a LoRA too); with their parts swapped
    for tiny ones they build it, with linear betas, and render clips."""
    parts = dict(base=str(tiny / "base"), motion=str(tiny / "motion_adapter"), clip_encoder=str(tiny / "image_encoder"),
                 preservation=str(ip_files[("plus", "safetensors")]),
                 personalization=str(ip_files[("plain", "safetensors")]))
    if load_profile(profile).lora:
        parts["lora"] = str(write_lora(UNet2DConditionModel.from_pretrained(tiny / "base", subfolder="unet"),
                                       tmp_path / "lora.safetensors"))
    flexip = FlexIPPipeline.from_profile(profile, device="cpu", **parts)
    assert type(flexip.pipe).__name__ == "AnimateDiffPipeline" and flexip.task == "animate"
    assert type(flexip.pipe.scheduler).__name__ == scheduler and flexip.pipe.scheduler.config.beta_schedule == "linear"
    out = flexip("a toy", subject=flexip.encode_subject([Image.new("RGB", (64, 64), "red")]), gate=[0.3, 0.7],
                 num_inference_steps=2, height=64, width=64, num_frames=4)
    assert [len(clip) for clip in out.frames] == [4, 4] and out.parameters[0]["num_frames"] == 4
    assert out.parameters[0]["fps"] == load_profile(profile).defaults.fps == 8


def test_what_cannot_animate_is_said_before_loading():
    assert "needs real weights" in task_unavailable(load_profile("mini"), "animate")
    assert "not Stable Diffusion 1.5" in task_unavailable(load_profile("sdxl"), "animate")
    assert task_unavailable(load_profile("sd15"), "animate") is None  # it names AnimateDiff's motion adapter
    assert task_unavailable(load_profile("sd15-fast"), "animate") is not None


def test_a_missing_motion_adapter_offline_names_the_download(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    flexip = FlexIPPipeline.from_profile("tiny", motion="flexip-tests/no-such-motion-adapter")
    command = ("hf download flexip-tests/no-such-motion-adapter --include 'config.json' "
               "--include 'diffusion_pytorch_model.safetensors'")
    with pytest.raises(WeightsNotFound, match="--motion PATH") as raised:
        load_task(flexip, "animate")
    assert command in str(raised.value)


# --- 5. refusals -------------------------------------------------------------------------------------------------
def test_frames_the_motion_adapter_cannot_place_are_refused(flexip, subject):
    with pytest.raises(ValueError, match="num_frames is 33; this motion adapter's positional embeddings cover 32"):
        flexip(PROMPT, subject=subject, num_frames=33, num_inference_steps=1)
    with pytest.raises(ValueError, match="num_frames must be a whole number from 1"):
        flexip(PROMPT, subject=subject, num_frames=0, num_inference_steps=1)
    with pytest.raises(ValueError, match="may not set num_frames"):
        flexip(PROMPT, subject=subject, pipeline_kwargs={"num_frames": 4})


def test_frames_are_refused_on_image_pipelines(tiny_pipe):
    photo = tiny_pipe.encode_subject([Image.new("RGB", (64, 64), "red")])
    for frames in ({"num_frames": 8}, {"fps": 8}):
        with pytest.raises(ValueError, match="num_frames and fps make a clip"):
            tiny_pipe("a toy", subject=photo, num_inference_steps=1, **frames)


# --- 6. clip files -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip(flexip, subject):
    out = flexip(PROMPT + ", ünïcode γ; #1 = \\ ok", subject=subject, gate=0.7, num_inference_steps=2, num_frames=6,
                 fps=12, negative_prompt="blurry; low = quality", height=72, width=64)
    return out.frames[0], out.parameters[0], out.generations[0]


@pytest.mark.parametrize("fmt", VIDEO_FORMATS)
def test_a_clip_file_gives_its_frames_and_settings_back(clip, fmt, tmp_path):
    if fmt == "mp4" and not mp4_available():
        pytest.skip("imageio-ffmpeg is not installed")
    frames, parameters, generation = clip
    path = write_video(frames, tmp_path / "clip", parameters, format=fmt)
    assert path.suffix == f".{fmt}" and path.is_file()
    info = read_video(path)
    assert info.format == fmt and info.frames == 6 and info.size == (64, 72)
    assert info.fps == pytest.approx(12, rel=0.05)  # GIF keeps 1/100 s per frame: 8 cs -> 12.5 fps
    assert info.generation == generation and info.parameters["prompt"] == parameters["prompt"]
    pixels = read_frames(path)
    assert pixels.shape == (6, 72, 64, 3)
    if fmt == "mp4":
        import imageio_ffmpeg

        meta = next(imageio_ffmpeg.read_frames(str(path)))
        assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p")


def test_without_the_encoder_mp4_falls_back_to_webp(clip, tmp_path, monkeypatch, caplog):
    import flexip_core.generation.video as video

    monkeypatch.setattr(video, "mp4_available", lambda: False)
    frames, parameters, generation = clip
    assert video.video_formats() == ("webp", "gif")
    path = write_video(frames, tmp_path / "clip.mp4", parameters)
    assert path == tmp_path / "clip.webp" and "pip install imageio imageio-ffmpeg" in caplog.text
    assert read_video(path).generation == generation
    still = np.zeros((3, 16, 24, 3), dtype=np.uint8)
    still[2] = 255  # two identical frames, which Pillow stores as one lasting twice as long, then another
    for fmt in ("gif", "webp"):
        info = read_video(write_video(still, tmp_path / f"no-settings.{fmt}", fps=5))
        assert info.parameters is None and info.generation is None and info.size == (24, 16)
        assert info.frames == 3 and info.fps == pytest.approx(5)


# --- 7. the memory check -----------------------------------------------------------------------------------------
def test_the_memory_check_refuses_a_clip_too_large_and_names_it():
    with pytest.raises(NotEnoughMemory, match=r"a clip of 32 frames at 768x768 x 4 clips \(one per γ\)") as raised:
        check_clip_memory(32, 768, 768, clips=4, available=24 * 2**30)
    assert "use fewer frames, a smaller size or fewer γ values" in str(raised.value)
    assert isinstance(raised.value, ValueError)
    fits = check_clip_memory(16, 512, 512, available=24 * 2**30)  # AnimateDiff's usual clip on a 24 GB card
    assert fits == estimate_clip_memory(16, 512, 512) and 2 * 2**30 < fits < 8 * 2**30
    assert estimate_clip_memory(32, 512, 512, dtype=torch.float32) > 2 * estimate_clip_memory(16, 512, 512) - 2**30
    assert check_clip_memory(32, 768, 768, clips=4, device="cpu") is None  # the CPU is not checked


def test_a_clip_that_cannot_fit_is_refused_before_it_runs(flexip, subject, monkeypatch):
    import flexip_core.generation.pipeline as pipeline

    asked = []

    def refuse(*args, **kwargs):
        asked.append((args, kwargs))
        raise NotEnoughMemory("too large")

    monkeypatch.setattr(pipeline, "check_clip_memory", refuse)
    monkeypatch.setattr(flexip, "device", torch.device("cuda"))  # the check runs on CUDA only
    with pytest.raises(NotEnoughMemory, match="too large"):
        flexip(PROMPT, subject=subject, gate=[0.1, 0.9], num_frames=12, num_inference_steps=1)
    (frames, height, width), kwargs = asked[0]
    assert (frames, height, width) == (12, 512, 512) and kwargs["clips"] == 2 and kwargs["cfg"] is True


# --- 8. the GPU check's smoke run --------------------------------------------------------------------------------
def test_gpu_check_animate_smoke_runs_end_to_end(tmp_path):
    """benchmarks/gpu_check.py --family animate --smoke: the animate check on CPU with the tiny models."""
    report = tmp_path / "report.json"
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--family", "animate", "--smoke", "--json",
                             str(report)], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(report.read_text())
    assert data["family"] == "animate" and data["frames"] == 8 and data["flexip_backend"] == "sdpa"
    for key in ("plain_it_s", "flexip_it_s", "clip_s", "fast_clip_s", "fast_sweep_s", "estimate_gb"):
        assert data[key] > 0, key
    assert data["clip_peak_gb"] is None  # peak memory is read on CUDA only
    assert "plain AnimateDiff" in result.stdout and "per 8-frame clip" in result.stdout


def test_the_command_line_writes_each_clip_beside_its_first_frame(tmp_path, capsys):
    """`python -m flexip_core generate` on an animate profile (here the tiny profile as one): the PNG of each clip's
    first frame and the clip itself, the settings in both."""
    from flexip_core.cli import main
    from flexip_core.loading.profiles import PROFILE_DIR

    profile = {**json.loads((PROFILE_DIR / "tiny.json").read_text()), "name": "tiny-animate",
               "pipeline": "AnimateDiffPipeline"}
    (tmp_path / "tiny-animate.json").write_text(json.dumps(profile))
    Image.new("RGB", (64, 64), (200, 40, 40)).save(tmp_path / "photo.png")
    assert main(["generate", "--profile", str(tmp_path / "tiny-animate.json"), "--image", str(tmp_path / "photo.png"),
                 "--prompt", "a dog running", "--steps", "2", "--seed", "3", "--out", str(tmp_path / "clip.png")]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "clip.png"), str(tmp_path / "clip.mp4")]
    clip = read_video(tmp_path / "clip.mp4")
    assert clip.frames == 16 and clip.parameters["seed"] == 3 and clip.parameters["task"] == "animate"
