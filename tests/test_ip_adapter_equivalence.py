"""IP-Adapter files in either branch equal diffusers' own IP-Adapter (spec: "Using public weights").

Tiny models saved to disk, synthetic IP-Adapter files in the published key layout (plain and Plus,
.safetensors and .bin); one branch at weight s, the other off, against StableDiffusionPipeline +
load_ip_adapter + set_ip_adapter_scale(s), same prompt, seed and scheduler.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from flexip_core import FlexIPPipeline
from flexip_core.generation.adapters import layer_key
from flexip_core.loading.tiny import CLIP_VISION, write_synthetic_ip_adapter_files

PROMPT = "a photo of sks dog on the beach"
RUN = dict(num_inference_steps=3, height=64, width=64, seed=4, output_type="np")
OTHER = {"plain": "plus", "plus": "plain"}
BRANCH = {"pres": 0, "pers": 1}


@pytest.fixture(scope="module")
def ip_files(tiny_pipe, tmp_path_factory):
    """{(layout, format): path} for the tiny UNet (CLIP sizes of the tiny image encoder)."""
    return write_synthetic_ip_adapter_files(
        tiny_pipe.pipe.unet, tmp_path_factory.mktemp("ip-adapter"),
        clip_embed_dim=CLIP_VISION["projection_dim"], clip_hidden_dim=CLIP_VISION["hidden_size"])


@pytest.fixture(scope="module")
def ours(ip_files):
    """Our pipeline with `layout` in `branch` and the other layout in the other branch, one per combination."""
    cache = {}

    def get(layout: str, fmt: str, branch: str) -> FlexIPPipeline:
        pres, pers = (layout, OTHER[layout]) if branch == "pres" else (OTHER[layout], layout)
        key = (pres, pers, fmt)
        if key not in cache:
            cache[key] = FlexIPPipeline.from_profile(
                "tiny", preservation=str(ip_files[(pres, fmt)]), personalization=str(ip_files[(pers, fmt)]))
        return cache[key]

    return get


def diffusers_pipe(base, path, scale: float, scheduler=None):
    """diffusers' StableDiffusionPipeline with its own IP-Adapter loaded at `scale`; `scheduler`: a copy of that one
    (profile-built pipelines sample with the profile's scheduler, not the base folder's)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    if scheduler is not None:
        pipe.scheduler = type(scheduler).from_config(scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(path.parent), subfolder="", weight_name=path.name, image_encoder_folder=None)
    pipe.set_ip_adapter_scale(scale)
    return pipe


def image_embeds(subject, layout: str) -> torch.Tensor:
    """diffusers' ip_adapter_image_embeds from our subject: negative rows first, (2, 1, ...) per adapter.

    Negatives follow diffusers: zeros for plain, the encoder's hidden states of an all-zero image for Plus.
    """
    if layout == "plain":
        return torch.cat([subject.uncond.clip_embeds, subject.features.clip_embeds])[:, None]  # (2, 1, E)
    return torch.cat([subject.uncond.clip_hidden, subject.features.clip_hidden])[:, None]  # (2, 1, 1 + P, H)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("layout, branch, scale", [
    ("plus", "pres", 0.6), ("plain", "pers", 0.8), ("plain", "pres", 1.0), ("plus", "pers", 0.5),
])
def test_one_branch_equals_diffusers_ip_adapter(ours, ip_files, photos, layout, branch, scale, fmt):
    pipe = ours(layout, fmt, branch)
    subject = pipe.encode_subject([photos["dog"]])
    weights = [0.0, 0.0]
    weights[BRANCH[branch]] = scale
    got = pipe(PROMPT, subject=subject, branch_weights=tuple(weights), scheduler=None, **RUN).arrays
    reference = diffusers_pipe(pipe.profile.base, ip_files[(layout, fmt)], scale, pipe.pipe.scheduler)
    want = reference(PROMPT, ip_adapter_image_embeds=[image_embeds(subject, layout)], num_inference_steps=3,
                     height=64, width=64, output_type="np",
                     generator=torch.Generator("cpu").manual_seed(RUN["seed"])).images
    assert np.abs(got - want).max() <= 1e-4
    off = pipe(PROMPT, subject=subject, branch_weights=(0.0, 0.0), scheduler=None, **RUN).arrays
    assert np.abs(got - off).mean() > 1e-2  # the branch really acts: the equality above is not vacuous


def test_branch_weights_match_diffusers_loader(ours, ip_files):
    """Layer by layer, our to_k/to_v of each branch are the tensors diffusers' loader puts in its processors."""
    pipe = ours("plus", "safetensors", "pres")
    for layout, branch in (("plus", "pres"), ("plain", "pers")):
        reference = diffusers_pipe(pipe.profile.base, ip_files[(layout, "safetensors")], 1.0)
        processors = reference.unet.attn_processors
        for name, _ in pipe.adapter.config.layers:
            kv = pipe.adapter.kv[layer_key(name)]
            assert torch.equal(getattr(kv, f"to_k_{branch}").weight, processors[name].to_k_ip[0].weight)
            assert torch.equal(getattr(kv, f"to_v_{branch}").weight, processors[name].to_v_ip[0].weight)
        provider = pipe.adapter.preservation if branch == "pres" else pipe.adapter.personalization
        theirs = reference.unet.encoder_hid_proj.image_projection_layers[0].state_dict()
        for key, value in provider.proj.state_dict().items():
            assert torch.equal(value, theirs[key]), key


def test_bin_and_safetensors_give_the_same_adapter(ours):
    a = ours("plus", "safetensors", "pres").adapter.state_dict()
    b = ours("plus", "bin", "pres").adapter.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_converted_native_file_reproduces_the_ip_adapter_pair(ours, ip_files, photos, tmp_path):
    from flexip_core.cli import main

    pipe = ours("plus", "bin", "pres")
    out = tmp_path / "converted.safetensors"
    code = main(["convert-ip-adapter", "--profile", "tiny", "--preservation", str(ip_files[("plus", "bin")]),
                 "--personalization", str(ip_files[("plain", "bin")]), "--out", str(out)])
    assert code == 0 and out.is_file()
    native = FlexIPPipeline.from_profile("tiny", adapter=str(out))
    assert native.adapter.config == pipe.adapter.config
    kwargs = dict(gate=[0.2, 0.7], **RUN)
    before = pipe(PROMPT, subject=pipe.encode_subject([photos["dog"]]), **kwargs).arrays
    after = native(PROMPT, subject=native.encode_subject([photos["dog"]]), **kwargs).arrays
    assert np.array_equal(before, after)


def test_the_sd15_layout_converts_without_weights(ip_files):
    """The default UNet layout of convert-ip-adapter is SD1.5's: 16 cross-attention layers, keys 1, 3, ..., 31."""
    from flexip_core.loading.ip_adapter import processor_index
    from flexip_core.loading.sources import unet_layout

    layers, width = unet_layout(None)
    assert width == 768 and len(layers) == 16
    assert [processor_index(i) for i in range(16)] == list(range(1, 32, 2))
    # the published ip-adapter_sd15 shapes: ip_adapter.1 ... .11 down, .13 ... .29 up, .31 mid
    assert [w for _, w in layers] == [320, 320, 640, 640, 1280, 1280] + [1280] * 3 + [640] * 3 + [320] * 3 + [1280]
    assert layers[-1][0].startswith("mid_block")
