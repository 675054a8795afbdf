"""The trainer on the tiny SDXL: both text encoders and pooled embeds, size ids, what trains and what stays frozen,
the untrained adapter equal to the base, and the trained file loaded back into FlexIPPipeline."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from flexip_core import FlexIPPipeline
from flexip_core.generation.adapters import cross_attention_layers
from flexip_core.generation.images import square_view
from flexip_core.training import train as train_module
from flexip_core.training.config import load_config
from flexip_core.training.data import PairDataset, crop_top_left, read_manifest
from flexip_core.training.train import AdapterTrainingModel, encode_batch, load_models, train

REPO = Path(__file__).resolve().parent.parent
PROFILE = "tiny-sdxl"
TINY_SDXL_TOML = REPO / "assets" / "train" / "tiny-sdxl.toml"
# (width, height) of the manifest's targets, and the SDXL size ids each gets at resolution 64:
# original (h, w), crop (top, left) in the image resized to a 64 px short side, target (64, 64).
SIZES = {(96, 64): [64, 96, 0, 16, 64, 64], (64, 80): [80, 64, 8, 0, 64, 64], (144, 144): [144, 144, 0, 0, 64, 64]}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """Three pairs whose targets have the sizes in SIZES (random pixels: the tiny models see only noise anyway)."""
    root = tmp_path_factory.mktemp("sdxl-pairs")
    rng = np.random.default_rng(0)
    lines = []
    for i, (width, height) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / f"t{i}.png")
        lines.append({"target": f"t{i}.png", "reference": f"t{i}.png", "caption": f"a red toy number {i}",
                      "modality": ("invariant", "variant")[i % 2]})
    (root / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root / "manifest.jsonl"


def sdxl_config(manifest: Path, output_dir: Path, **overrides):
    """assets/train/tiny-sdxl.toml with this test's data (the file is what the CPU smoke run uses)."""
    return load_config(TINY_SDXL_TOML, {"manifest": str(manifest), "output_dir": str(output_dir),
                                        "checkpoint_every": 0, **overrides})


def fresh_train(config, on_step=None):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # a fresh accelerate state per in-process run
    return train(config, on_step)


def state_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def trained(manifest, tmp_path_factory):
    """Two optimizer steps on the tiny SDXL, with the frozen models and the starting adapter captured."""
    captured = {}
    real_load_models = train_module.load_models

    def spy(config, device, dtype):
        frozen, adapter = real_load_models(config, device, dtype)
        captured.update(frozen=frozen, adapter=adapter, start=state_of(adapter),
                        before={name: state_of(m) for name, m in frozen_modules(frozen).items()})
        return frozen, adapter

    out = tmp_path_factory.mktemp("sdxl-run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "load_models", spy)
        result = fresh_train(sdxl_config(manifest, out, max_steps=2, learning_rate=1e-2))
    return result, captured


def frozen_modules(frozen) -> dict[str, torch.nn.Module]:
    pipe = frozen.text.pipe
    return {"unet": frozen.unet, "vae": frozen.vae, "text_encoder": pipe.text_encoder,
            "text_encoder_2": pipe.text_encoder_2}


def test_crop_top_left_is_where_square_view_crops():
    for width, height in [(96, 64), (64, 80), (144, 144), (101, 67), (50, 203)]:
        image = Image.fromarray(np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8))
        top, left = crop_top_left(width, height, 64)
        scale = 64 / min(width, height)
        resized = image.resize((max(64, round(width * scale)), max(64, round(height * scale))), Image.BICUBIC)
        expected = np.asarray(square_view(image, 64, "crop"))
        assert np.array_equal(np.asarray(resized.crop((left, top, left + 64, top + 64))), expected), (width, height)


def test_sdxl_batch_has_both_encoders_pooled_text_and_size_ids(manifest, tmp_path):
    """encode_batch: text = both encoders' penultimate states concatenated (2048-d in SDXL, 80 here), pooled =
    text_encoder_2's projected embedding, time ids = original size + crop top-left + target size per image; and
    the UNet receives exactly those as added_cond_kwargs."""
    config = sdxl_config(manifest, tmp_path)
    frozen, adapter = load_models(config, torch.device("cpu"), torch.float32)
    pipe = frozen.text.pipe
    assert frozen.tokenizer is None  # captions reach encode_prompt as text
    records, _ = read_manifest(config.manifest)
    dataset = PairDataset(records, config.resolution, frozen.encoder.clip_preprocess, frozen.encoder.dino_preprocess,
                          frozen.tokenizer)
    raw = next(iter(torch.utils.data.DataLoader(dataset, batch_size=len(dataset))))
    batch = encode_batch(frozen, raw)

    hidden, pooled = encode_by_hand(pipe, [r.caption for r in records])
    width = frozen.unet.config.cross_attention_dim
    assert batch.text.shape == (3, 77, width) and width == pipe.text_encoder.config.hidden_size + \
        pipe.text_encoder_2.config.hidden_size
    assert torch.allclose(batch.text, hidden, atol=1e-6)
    assert torch.allclose(batch.pooled, pooled, atol=1e-6)  # text_encoder_2's, (B, projection_dim)
    assert batch.time_ids.shape == (3, 6)
    assert batch.time_ids.tolist() == [SIZES[size] for size in SIZES]

    # The scratch adapter leaves the SDXL UNet's prediction unchanged at any branch weights.
    from flexip_core.generation.attention import install_processors

    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([10, 500, 990])
    added = {"text_embeds": batch.pooled, "time_ids": batch.time_ids}
    with torch.no_grad():
        base = frozen.unet(latents, timesteps, encoder_hidden_states=batch.text, added_cond_kwargs=added).sample
    install_processors(frozen.unet, adapter, "sdpa")
    model = AdapterTrainingModel(adapter, frozen.unet)
    feats = (batch.features.clip_embeds, batch.features.clip_hidden, batch.features.dino)
    for w_pres, w_pers in ((1.0, 0.0), (0.0, 1.0), (2.0, 2.0)):
        with torch.no_grad():
            out = model(latents, timesteps, batch.text, *feats, torch.full((3,), w_pres), torch.full((3,), w_pers),
                        added_cond_kwargs=added)
        assert (out - base).abs().max() <= 1e-5, (w_pres, w_pers)

    # What the UNet is called with in a training step.
    seen = {}
    hook = frozen.unet.register_forward_pre_hook(lambda m, args, kwargs: seen.update(kwargs), with_kwargs=True)
    no_drop = dataclasses.replace(config, drop_text=0.0, drop_image=0.0, drop_both=0.0)
    empty = frozen.text.empty(frozen.device)
    with torch.no_grad():
        loss, _ = train_module.training_loss(model, frozen, batch, no_drop, torch.Generator().manual_seed(0),
                                             empty.hidden, frozen.encoder.uncond(), empty.pooled)
    hook.remove()
    assert math.isfinite(loss.item())
    assert torch.equal(seen["added_cond_kwargs"]["time_ids"], batch.time_ids)
    assert torch.equal(seen["added_cond_kwargs"]["text_embeds"], batch.pooled)
    # Text dropout trains on the unconditional text that guidance uses at inference: with SDXL base's
    # force_zeros_for_empty_prompt, zero states and a zero pooled embedding (the size ids stay).
    assert pipe.config.force_zeros_for_empty_prompt
    assert not empty.hidden.any() and not empty.pooled.any() and empty.pooled.shape == (1, pooled.shape[1])
    all_text = dataclasses.replace(config, drop_text=1.0, drop_image=0.0, drop_both=0.0)
    hook = frozen.unet.register_forward_pre_hook(lambda m, args, kwargs: seen.update(kwargs), with_kwargs=True)
    with torch.no_grad():
        train_module.training_loss(model, frozen, batch, all_text, torch.Generator().manual_seed(0), empty.hidden,
                                   frozen.encoder.uncond(), empty.pooled)
    hook.remove()
    assert torch.equal(seen["added_cond_kwargs"]["text_embeds"], empty.pooled.expand(3, -1))
    assert torch.equal(seen["encoder_hidden_states"], empty.hidden.expand(3, -1, -1))
    assert torch.equal(seen["added_cond_kwargs"]["time_ids"], batch.time_ids)
    # Without that flag, the encoded empty caption (both encoders), as the pipeline would use.
    pipe.register_to_config(force_zeros_for_empty_prompt=False)
    empty = frozen.text.empty(frozen.device)
    assert torch.allclose(empty.hidden, encode_by_hand(pipe, [""])[0], atol=1e-6) and empty.hidden.any()
    assert torch.allclose(empty.pooled, encode_by_hand(pipe, [""])[1], atol=1e-6)


def encode_by_hand(pipe, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's prompt encoding written out: both encoders' penultimate hidden states side by side, and the second
    encoder's projected pooled embedding."""
    states = []
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        with torch.no_grad():
            out = encoder(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])  # (B, 77, C_i)
    return torch.cat(states, dim=-1), out.text_embeds  # (B, 77, C_1 + C_2), (B, P)


def test_sdxl_training_moves_the_adapter_and_nothing_frozen(trained):
    result, captured = trained
    frozen, start = captured["frozen"], captured["start"]
    assert result.steps == 2 and len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)

    # The adapter is sized from the SDXL UNet's cross-attention layers and its text width.
    layers = cross_attention_layers(frozen.unet)
    config = captured["adapter"].config
    assert config.layers == layers and len(layers) == 8  # the tiny SDXL's attn2 layers (2 in its inner block)
    width = frozen.unet.config.cross_attention_dim
    assert config.preservation.cross_attention_dim == config.personalization.cross_attention_dim == width
    for kv in captured["adapter"].kv.values():
        assert kv.to_k_pres.in_features == kv.to_v_pers.in_features == width

    saved = load_file(str(result.adapter_path))
    moved = [k for k in start if not torch.equal(start[k], saved[k])]
    assert len(moved) > len(start) // 2, f"only {len(moved)} of {len(start)} adapter tensors moved"
    assert any(k.endswith("to_v_pres.weight") for k in moved) and any(k.endswith("to_v_pers.weight") for k in moved)
    for name, module in frozen_modules(frozen).items():
        before = captured["before"][name]
        after = module.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), f"the frozen {name} changed"
        assert not any(p.requires_grad for p in module.parameters()), name


def test_sdxl_untrained_adapter_equals_the_base_and_the_trained_one_renders(manifest, tmp_path, trained, photos):
    """`--set max_steps=0` writes the starting adapter; attached to the tiny SDXL it draws what the base draws at
    every γ; the trained file loads into FlexIPPipeline on the tiny SDXL profile and changes its images."""
    from accelerate.state import AcceleratorState

    from flexip_core.train import main

    AcceleratorState._reset_state(reset_partial_state=True)
    assert main(["--config", str(TINY_SDXL_TOML), "--set", f"manifest={manifest}", "--set",
                 f"output_dir={tmp_path}", "--set", "max_steps=0"]) == 0
    untrained = FlexIPPipeline.from_profile(PROFILE, adapter=str(tmp_path / "flexip_adapter.safetensors"))
    assert untrained.family == "sdxl"
    subject = untrained.encode_subject([photos["dog"]])
    settings = dict(num_inference_steps=3, seed=2, output_type="np")
    base = untrained("a dog on the beach", subject=subject, branch_weights=(0.0, 0.0), **settings).arrays
    for gate, strength in ((0.0, 1.0), (0.5, 1.0), (1.0, 1.0), (0.5, 2.0)):
        out = untrained("a dog on the beach", subject=subject, gate=gate, strength=strength, **settings).arrays
        assert np.abs(out - base).max() <= 1e-4, (gate, strength)

    result, _ = trained
    loaded = FlexIPPipeline.from_profile(PROFILE, adapter=str(result.adapter_path))
    assert loaded.adapter.config == untrained.adapter.config
    out = loaded("a dog on the beach", subject=loaded.encode_subject([photos["dog"]]), gate=0.5, **settings)
    assert np.isfinite(out.arrays).all() and out.arrays.shape == base.shape
    assert np.abs(out.arrays - base).max() > 1e-4  # the trained branches act


def test_sdxl_configs_read():
    """The SDXL configs read as TrainConfigs (a typo in a field fails here) and train SDXL base 1.0 at 1024 px."""
    from flexip_core.loading.assembly import apply_overrides
    from flexip_core.loading.profiles import load_profile
    from flexip_core.training.conditioning import base_family

    for path, base, resolution in [(REPO / "assets" / "train" / "sdxl.toml", "stabilityai/stable-diffusion-xl-base-1.0",
                                    1024), (TINY_SDXL_TOML, "{build}/sdxl/base", 64)]:
        config = load_config(path, {"manifest": "m.jsonl", "output_dir": "o"})
        profile = apply_overrides(load_profile(config.profile), config.profile_overrides)
        assert (profile.base, base_family(profile.pipeline), config.resolution) == (base, "sdxl", resolution)


def test_sdxl_mixed_precision_keeps_the_vae_in_fp32(manifest, tmp_path):
    """Under bf16 the UNet and both text encoders run in bf16 while SDXL's VAE (force_upcast) stays fp32, as in
    diffusers' SDXL training script; the batch encodes in those dtypes."""
    config = sdxl_config(manifest, tmp_path)
    frozen, adapter = load_models(config, torch.device("cpu"), torch.bfloat16)
    pipe = frozen.text.pipe
    assert frozen.vae.config.force_upcast and frozen.vae.dtype == torch.float32
    assert frozen.unet.dtype == pipe.text_encoder.dtype == pipe.text_encoder_2.dtype == torch.bfloat16
    assert next(adapter.parameters()).dtype == torch.float32  # the trained weights stay fp32
    records, _ = read_manifest(config.manifest)
    dataset = PairDataset(records, config.resolution, frozen.encoder.clip_preprocess, frozen.encoder.dino_preprocess,
                          frozen.tokenizer)
    batch = encode_batch(frozen, next(iter(torch.utils.data.DataLoader(dataset, batch_size=3))))
    assert torch.isfinite(batch.latent_mean).all() and batch.time_ids.dtype == torch.float32
