"""Speed options (issue 35): fused branch attention equals the three calls it replaces; a compiled UNet renders the
same image; previews come from the profile's tiny autoencoder when it has one."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from flexip_core.generation.attention import BranchInputs, GatedCrossAttnProcessor

TOLERANCE = 1e-5


def _layer(seed: int = 0):
    """A cross-attention layer (4 heads of 8) and random branch projections that visibly act."""
    from diffusers.models.attention_processor import Attention

    from flexip_core.generation.adapters import BranchKV

    torch.manual_seed(seed)
    attn = Attention(query_dim=32, cross_attention_dim=32, heads=4, dim_head=8).eval()
    kv = BranchKV(32, 32)
    with torch.no_grad():
        for linear in (kv.to_k_pres, kv.to_v_pres, kv.to_k_pers, kv.to_v_pers):
            linear.weight.normal_(0.0, 0.5)
    return attn, kv


CASES = {  # name -> (pres_on, pers_on, photo-share bias on the preservation tokens)
    "both branches": (True, True, False),
    "preservation only": (True, False, False),
    "personalization only": (False, True, False),
    "both, two photos' shares": (True, True, True),
}


@pytest.mark.parametrize("case", CASES)
def test_fused_attention_equals_one_call_per_term(case):
    """A CFG batch (2 unconditional + 2 conditional rows) with per-sample weights, 0 among them, over two steps (the
    second reuses the stacked keys and values, the weights change)."""
    pres_on, pers_on, biased = CASES[case]
    attn, kv = _layer()
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(4, 16, 32, generator=gen)  # (B, HW, C)
    text = torch.randn(4, 77, 32, generator=gen)  # (B, 77, C)
    pres, pers = torch.randn(4, 16, 32, generator=gen), torch.randn(4, 4, 32, generator=gen)
    bias = torch.tensor([0.25] * 8 + [0.75] * 8).log() if biased else None  # (16,): two photos of 8 tokens
    steps = [(torch.tensor([0.0, 0.3, 1.0, 2.0]), torch.tensor([1.0, 0.0, 0.5, 0.7])),
             (torch.tensor([0.5, 0.0, 0.0, 1.0]), torch.tensor([0.0, 0.2, 1.5, 0.0]))]
    outputs = {}
    for fused in (False, True):
        processor = GatedCrossAttnProcessor(kv, fused=fused)
        inputs = BranchInputs(pres, pers, *steps[0], pres_on, pers_on, pres_bias=bias)
        with torch.no_grad():
            outputs[fused] = [processor(attn, hidden, text, flexip=inputs)]
            inputs.w_pres, inputs.w_pers = steps[1]
            outputs[fused].append(processor(attn, hidden, text, flexip=inputs))
        assert inputs.kv_calls[0] == 2 + 2 * (pres_on + pers_on)  # the projections are still computed once
    for unfused, fused in zip(outputs[False], outputs[True]):
        assert (unfused - fused).abs().max() <= TOLERANCE
    plain = GatedCrossAttnProcessor(kv)(attn, hidden, text).detach()
    assert (outputs[True][0] - plain).abs().max() > 1e-2  # the branches do act


def test_fused_zero_weight_keeps_an_overflowing_branch_out():
    """fp16's 0 · inf: a sample at weight 0 gets exactly the text attention although the branch overflows."""
    attn, kv = _layer()
    with torch.no_grad():
        kv.to_v_pres.weight.fill_(3e38)  # every value overflows to inf
    hidden, text = torch.randn(2, 16, 32), torch.randn(2, 77, 32)
    tokens = torch.randn(2, 4, 32).abs() + 1.0
    inputs = BranchInputs(tokens, None, torch.tensor([0.0, 1.0]), torch.zeros(2), True, False)
    processor = GatedCrossAttnProcessor(kv, fused=True)
    with torch.no_grad():
        out, plain = processor(attn, hidden, text, flexip=inputs), processor(attn, hidden, text)
    assert torch.isfinite(out[0]).all() and (out[0] - plain[0]).abs().max() <= TOLERANCE
    assert not torch.isfinite(out[1]).all()


def test_xformers_processors_keep_one_call_per_term():
    attn, kv = _layer()
    assert GatedCrossAttnProcessor(kv, "sdpa").fused and not GatedCrossAttnProcessor(kv, "sdpa", fused=False).fused
    assert not GatedCrossAttnProcessor(kv, "xformers").fused  # it takes no broadcast mask


# --- whole pipelines ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    """The tiny profile (its own load: these tests install other processors on its UNet)."""
    from flexip_core import FlexIPPipeline

    pipe = FlexIPPipeline.from_profile("tiny")
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    return pipe, pipe.encode_subject([photo])


def _render(pipe, subject, **call) -> np.ndarray:
    return pipe("a dog on the beach", subject=subject, gate=[0.0, 0.5, 1.0], num_inference_steps=3, seed=5,
                output_type="np", **call).arrays


def test_fused_pipeline_renders_what_the_unfused_one_does(tiny):
    from flexip_core import FlexIPPipeline
    from flexip_core.generation.attention import install_processors

    pipe, subject = tiny
    assert pipe.fused_attention
    fused = _render(pipe, subject)
    unfused_pipe = FlexIPPipeline(pipe.pipe, encoder=pipe.encoder, adapter=pipe.adapter, profile=pipe.profile,
                                  fused_attention=False)
    try:
        unfused = _render(unfused_pipe, subject)
    finally:
        install_processors(pipe.unet, pipe.adapter, pipe.backend, fused=True)  # the fixture's own processors back
    assert np.abs(fused - unfused).max() <= TOLERANCE
    assert np.abs(fused - _render(pipe, subject)).max() <= TOLERANCE


def test_compiled_unet_renders_the_same_image(tiny, monkeypatch):
    """The compile option reaches torch.compile (mode, fixed shapes) and the traced UNet, FlexIP's processors and
    all, renders what the eager one does. Dynamo's own backend stands in for Inductor: Inductor's C++ build of the
    tiny UNet takes about 95 s on this 2-core machine, and what could break here is the tracing of our processors."""
    from flexip_core import FlexIPPipeline
    from flexip_core.generation.speed import compile_mode

    pipe, subject = tiny
    eager = _render(pipe, subject)
    calls = []
    real_compile = torch.compile

    def recording_compile(model, **options):
        calls.append(options)
        return real_compile(model, backend="eager", dynamic=options.get("dynamic"))

    monkeypatch.setattr(torch, "compile", recording_compile)
    import diffusers

    parts = dict(pipe.pipe.components)
    unet = type(parts["unet"]).from_config(parts["unet"].config)  # its own UNet: compiling is in place
    unet.load_state_dict(parts["unet"].state_dict())
    twin = diffusers.StableDiffusionPipeline(**{**parts, "unet": unet})
    twin.set_progress_bar_config(disable=True)
    compiled = FlexIPPipeline(twin, encoder=pipe.encoder, adapter=pipe.adapter, profile=pipe.profile, compile=True)
    assert compiled.compiled == "default" and calls == [{"mode": "default", "dynamic": False}]
    assert np.abs(_render(compiled, subject) - eager).max() <= TOLERANCE
    assert compile_mode(True, torch.device("cuda")) == "reduce-overhead"  # CUDA graphs on a GPU
    # with CUDA graphs a replay overwrites its outputs, and a scheduler may keep one step's output: they are copies
    from diffusers.utils import BaseOutput

    from flexip_core.generation.speed import speed_up_unet

    class Replayed(torch.nn.Module):  # a graph replay: the output is the same memory each call
        def __init__(self):
            super().__init__()
            self.register_buffer("out", torch.zeros(3))

        def forward(self, x, as_tuple=True):
            self.out.copy_(2 * x)
            return (self.out,) if as_tuple else BaseOutput(sample=self.out)

    module, x = Replayed(), torch.ones(3)
    assert speed_up_unet(module, torch.device("cuda"), True) == "reduce-overhead"  # nothing runs on CUDA here
    assert calls[-1] == {"mode": "reduce-overhead", "dynamic": False}
    kept, dict_out = module(x)[0], module(x, as_tuple=False).sample
    module(3 * x)
    assert torch.equal(kept, 2 * x) and torch.equal(dict_out, 2 * x)  # copies: the next call did not overwrite them
    with pytest.raises(ValueError, match="torch.compile mode"):
        compile_mode("fastest", torch.device("cpu"))


@pytest.mark.parametrize("argv, options", [
    ([], {}),
    (["--compile"], {"compile": True}),
    (["--compile", "max-autotune-no-cudagraphs", "--channels-last"],
     {"compile": "max-autotune-no-cudagraphs", "channels_last": True}),
    (["--preview-vae", "madebyollin/taesd"], {"preview_vae": "madebyollin/taesd"}),
])
def test_speed_flags_reach_the_profile_overrides(argv, options):
    """`--compile [MODE]`, `--channels-last` and `--preview-vae` (the CLI's and app.py's) become from_profile's
    overrides of the profile fields of the same names; an unknown compile mode is refused by name."""
    import argparse

    from flexip_core.cli import add_model_flags, model_options
    from flexip_core.loading.profiles import Profile

    parser = argparse.ArgumentParser()
    add_model_flags(parser)
    assert model_options(parser.parse_args(argv)) == options
    assert set(options) <= set(Profile.__dataclass_fields__)
    with pytest.raises(SystemExit):
        parser.parse_args(["--compile", "fastest"])


# --- previews ----------------------------------------------------------------------------------------------------
def test_previews_come_from_the_tiny_autoencoder_when_the_profile_has_one(tiny):
    from flexip_core import FlexIPPipeline
    from flexip_core.loading.assembly import ensure_built

    pipe, subject = tiny
    with_vae = FlexIPPipeline.from_profile("tiny", preview_vae=str(ensure_built("tiny") / "preview_vae"))
    assert with_vae.preview_decoder.kind == "tiny autoencoder" and pipe.preview_decoder.kind == "linear projection"
    seen = {}
    for name, flexip in (("tiny", with_vae), ("linear", pipe)):
        flexip("a dog", subject=subject, gate=[0.2, 0.8], num_inference_steps=2, seed=1,
               callback=lambda step, total, previews, name=name: seen.setdefault(name, []).append(previews))
    assert [[p.size for p in step] for step in seen["tiny"]] == [[(64, 64)] * 2] * 2  # full size, one per γ
    assert [[p.size for p in step] for step in seen["linear"]] == [[(8, 8)] * 2] * 2  # the latents' size
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    fast = [np.asarray(image, dtype=np.float32) for image in with_vae.decode_fast(latents)]
    linear = [np.asarray(image, dtype=np.float32) for image in pipe.decode_fast(latents)]
    assert [f.shape for f in fast] == [f.shape for f in linear] == [(64, 64, 3)] * 2
    assert np.abs(fast[0] - linear[0]).mean() > 5  # a different decoder, not the projection again
    fast_render = with_vae("a dog", subject=subject, gate=0.5, num_inference_steps=2, decode="fast", output_type="np")
    assert fast_render.arrays.shape == (1, 64, 64, 3) and fast_render.images[0].size == (64, 64)
    with pytest.raises(ValueError, match="decode must be"):
        with_vae("a dog", subject=subject, num_inference_steps=1, decode="slow")


def test_a_preview_autoencoder_not_downloaded_falls_back_to_the_projection(caplog, monkeypatch, tmp_path):
    from huggingface_hub import constants

    from flexip_core.loading.assembly import load_preview_vae

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache: nothing there, nothing fetched
    with caplog.at_level(logging.INFO, logger="flexip_core.loading.assembly"):
        assert load_preview_vae("madebyollin/taesd", torch.float32) is None
    assert [r.getMessage() for r in caplog.records if "preview autoencoder" in r.getMessage()] == [
        "preview autoencoder madebyollin/taesd is not downloaded: step previews use the linear projection (to get it: "
        "hf download madebyollin/taesd)"]


def test_the_studio_decodes_renders_while_dragging_with_the_tiny_autoencoder_only_where_there_is_one():
    """The studio's engine asks for decode="fast" while the slider is dragged: with a tiny autoencoder that decode
    differs from the VAE's; without one the VAE decodes (the projection would be a blur)."""
    from flexip_core.generation.settings import Generation
    from flexip_core.loading.assembly import ensure_built
    from ui.engine import CoreEngine

    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    generation = Generation(prompt="a dog", seed=3, num_inference_steps=2, width=64, height=64)

    def pixels(engine, decode):
        image = engine.render([photo], [1.0], generation, [0.5], decode=decode)[0].image
        return np.asarray(image, dtype=np.float32)

    with_vae = CoreEngine("tiny", {"preview_vae": str(ensure_built("tiny") / "preview_vae")})
    assert np.abs(pixels(with_vae, "fast") - pixels(with_vae, "full")).mean() > 5
    plain = CoreEngine("tiny")
    assert np.array_equal(pixels(plain, "fast"), pixels(plain, "full"))
