"""Real weights: the sd15 profiles on the published checkpoints, run when they are in the local Hub cache.

Marked `real_weights`; each test skips with the missing files named (and the command that fetches them)
when the weights are absent. Nothing here downloads: the cache is read with HF_HUB_OFFLINE=1.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from flexip_core.loading.architectures import SD15_REPO
from flexip_core.loading.sources import in_cache

pytestmark = pytest.mark.real_weights

SD15_FILES = {  # repo -> files the sd15 profile reads (weights included, not only configs)
    SD15_REPO: ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "tokenizer/vocab.json",
                "scheduler/scheduler_config.json"),
    "h94/IP-Adapter": ("models/image_encoder/config.json", "models/image_encoder/model.safetensors",
                       "models/ip-adapter-plus_sd15.safetensors", "models/ip-adapter_sd15.safetensors"),
}
LCM_LORA = {"latent-consistency/lcm-lora-sdv1-5": ("pytorch_lora_weights.safetensors",)}
PROMPT = "a photo of a dog wearing a red scarf, in the snow"


def require_cached(files: dict[str, tuple[str, ...]], profile: str = "sd15") -> None:
    missing = [f"{repo}:{name}" for repo, names in files.items() for name in names if not in_cache(repo, (name,))]
    if missing:
        pytest.skip(f"real weights not in the local Hugging Face cache (missing {', '.join(missing[:2])}"
                    f"{' ...' if len(missing) > 2 else ''}); load the profile once while online to fill the cache: "
                    f"python -m flexip_core generate --profile {profile} --image PHOTO --prompt test")


@pytest.fixture(scope="module")
def offline_env():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def sd15(offline_env):
    require_cached(SD15_FILES)
    from flexip_core import FlexIPPipeline

    return FlexIPPipeline.from_profile("sd15")


def small_run(pipe) -> dict:
    """512 px on a GPU; 256 px and few steps on a CPU, where SD1.5 takes seconds per step."""
    gpu = pipe.device.type != "cpu"
    return dict(height=512 if gpu else 256, width=512 if gpu else 256, num_inference_steps=20 if gpu else 6, seed=0)


def test_sd15_profile_generates_images_along_the_slider(sd15, photos):
    subject = sd15.encode_subject([photos["dog"]])
    out = sd15(PROMPT, subject=subject, gate=[0.0, 1.0], output_type="np", **small_run(sd15))
    assert np.isfinite(out.arrays).all() and out.arrays.std() > 0.05  # neither NaN nor a black/flat image
    assert np.abs(out.arrays[0] - out.arrays[1]).mean() > 0.01  # the gate changes the image
    scores = sd15.identity_score(out.images, subject)
    assert scores[1] > scores[0]  # gamma 1 (Plus branch, identity) looks more like the dog than gamma 0


def test_sd15_branch_equals_diffusers_ip_adapter(sd15, photos, offline_env):
    """Item 4 on the real files: preservation (Plus) at 0.6, personalization off, fp32."""
    from diffusers import StableDiffusionPipeline

    from flexip_core import FlexIPPipeline

    pipe = sd15 if sd15.dtype == torch.float32 else FlexIPPipeline.from_profile("sd15", dtype="float32")
    subject = pipe.encode_subject([photos["dog"]])
    run = dict(height=256, width=256, num_inference_steps=4)
    ours = pipe(PROMPT, subject=subject, branch_weights=(0.6, 0.0), scheduler="pndm", seed=1, output_type="np",
                **run).arrays
    reference = StableDiffusionPipeline.from_pretrained(SD15_REPO, safety_checker=None, feature_extractor=None,
                                                        requires_safety_checker=False, local_files_only=True)
    reference = reference.to(pipe.device)
    reference.set_progress_bar_config(disable=True)
    reference.load_ip_adapter("h94/IP-Adapter", subfolder="models", weight_name="ip-adapter-plus_sd15.safetensors",
                              image_encoder_folder=None, local_files_only=True)
    reference.set_ip_adapter_scale(0.6)
    embeds = torch.cat([subject.uncond.clip_hidden, subject.features.clip_hidden])[:, None].to(pipe.device)
    theirs = reference(PROMPT, ip_adapter_image_embeds=[embeds], output_type="np",
                       generator=torch.Generator("cpu").manual_seed(1), **run).images
    assert np.abs(ours - theirs).max() <= 1e-3


def test_sd15_fast_profile_renders_in_four_steps(offline_env, photos):
    require_cached({**SD15_FILES, **LCM_LORA}, "sd15-fast")
    from flexip_core import FlexIPPipeline

    pipe = FlexIPPipeline.from_profile("sd15-fast")
    out = pipe(PROMPT, subject=pipe.encode_subject([photos["dog"]]), gate=0.5, height=512, width=512,
               output_type="np")
    assert out.parameters[0]["num_inference_steps"] == 4 and out.parameters[0]["scheduler"] == "lcm"
    assert np.isfinite(out.arrays).all() and out.arrays.std() > 0.05
