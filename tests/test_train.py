"""The accelerate trainer on tiny models: modality-aware draws, over-fitting, resume, a real 2-process run."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from flexip_core import FlexIPPipeline
from flexip_core.loading.tiny import tiny_branch
from flexip_core.training.config import LR_SCHEDULERS, SIZE_KEYS, TrainConfig, load_config
from flexip_core.training.data import PairDataset, read_manifest
from flexip_core.training.train import (
    AdapterTrainingModel,
    draw_dropout,
    draw_gammas,
    draw_timesteps,
    encode_batch,
    load_models,
    train,
    training_loss,
)

REPO = Path(__file__).resolve().parent.parent
TINY_SIZES = {k: v for k, v in dataclasses.asdict(tiny_branch("flexip_preservation")).items() if k in SIZE_KEYS}


class Interrupted(Exception):
    """Stands in for a crash or a pre-empted job."""


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, dreambench) -> Path:
    """Six pairs (three invariant, three variant) from DreamBench photos, shrunk into a temporary folder."""
    root = tmp_path_factory.mktemp("pairs")
    lines = []
    for subject in ("dog", "cat", "backpack"):
        for i in range(2):
            image = Image.open(dreambench / subject / f"0{i}.jpg").convert("RGB")
            image.thumbnail((96, 96))
            image.save(root / f"{subject}{i}.png")
        lines.append({"target": f"{subject}0.png", "reference": f"{subject}0.png", "caption": f"a photo of a {subject}",
                      "modality": "invariant"})
        lines.append({"target": f"{subject}1.png", "reference": f"{subject}0.png",
                      "caption": f"a {subject} on the beach", "modality": "variant"})
    path = root / "manifest.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def tiny_config(manifest: Path, output_dir: Path, **overrides) -> TrainConfig:
    fields = dict(manifest=str(manifest), output_dir=str(output_dir), profile="tiny", resolution=64,
                  adapter_sizes=TINY_SIZES, train_batch_size=2, max_steps=4, learning_rate=1e-3, checkpoint_every=0,
                  report_to="none")
    return TrainConfig(**{**fields, **overrides})


def run(config: TrainConfig, on_step=None):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # a fresh accelerate state per in-process run
    return train(config, on_step)


def loss_setup(config: TrainConfig):
    """Frozen parts, the training model and one batch of every record; the config without dropout."""
    from flexip_core.generation.attention import install_processors

    frozen, adapter = load_models(config, torch.device("cpu"), torch.float32)
    install_processors(frozen.unet, adapter, "sdpa")
    model = AdapterTrainingModel(adapter, frozen.unet).eval()
    records, _ = read_manifest(config.manifest)
    dataset = PairDataset(records, config.resolution, frozen.encoder.clip_preprocess, frozen.encoder.dino_preprocess,
                          frozen.tokenizer)
    batch = encode_batch(frozen, next(iter(torch.utils.data.DataLoader(dataset, batch_size=len(dataset)))))
    return frozen, model, batch, dataclasses.replace(config, drop_text=0.0, drop_image=0.0, drop_both=0.0)


def fixed_loss(config: TrainConfig, draws: int = 8) -> float:
    """Loss of config.init's adapter on every record, over fixed noise/timestep/gamma draws, without dropout."""
    frozen, model, batch, no_drop = loss_setup(config)
    with torch.no_grad():
        losses = [training_loss(model, frozen, batch, no_drop, torch.Generator().manual_seed(1000 + s), batch.text[:1],
                                frozen.encoder.uncond())[0].item() for s in range(draws)]
    return float(np.mean(losses))


def test_latents_are_posterior_samples_or_means_as_configured(manifest, tmp_path):
    """sample_latents=False trains on the VAE's posterior means: the posterior's spread no longer matters."""
    frozen, model, batch, no_drop = loss_setup(tiny_config(manifest, tmp_path))
    wide = dataclasses.replace(batch, latent_std=batch.latent_std * 50 + 1)

    def loss(config, b):
        with torch.no_grad():
            return training_loss(model, frozen, b, config, torch.Generator().manual_seed(3), b.text[:1],
                                 frozen.encoder.uncond())[0].item()

    means = dataclasses.replace(no_drop, sample_latents=False)
    assert loss(means, batch) == loss(means, wide)
    assert loss(no_drop, batch) != loss(no_drop, wide)


def test_gamma_draws_follow_the_modality():
    config = TrainConfig(manifest="m.jsonl", output_dir="out")
    modality = torch.tensor([0, 1] * 5000)
    gammas = draw_gammas(modality, config, torch.Generator().manual_seed(0))
    invariant, variant = gammas[modality == 0], gammas[modality == 1]
    assert 0.7 <= invariant.min() < 0.71 and 0.99 < invariant.max() <= 1.0
    assert 0.0 <= variant.min() < 0.01 and 0.39 < variant.max() <= 0.4
    narrow = dataclasses.replace(config, invariant_gamma=(0.9, 0.9), variant_gamma=(0.2, 0.3))
    gammas = draw_gammas(modality, narrow, torch.Generator().manual_seed(0))
    variant = gammas[modality == 1]
    assert torch.all(gammas[modality == 0] == 0.9) and torch.all((variant >= 0.2) & (variant <= 0.3))


def test_dropout_shares():
    config = TrainConfig(manifest="m.jsonl", output_dir="out", drop_text=0.05, drop_image=0.1, drop_both=0.05)
    text, image = draw_dropout(200_000, config, torch.Generator().manual_seed(0))
    both = (text & image).float().mean()
    assert abs((text & ~image).float().mean() - 0.05) < 0.003
    assert abs((image & ~text).float().mean() - 0.10) < 0.003
    assert abs(both - 0.05) < 0.003


def test_timestep_power_biases_draws_towards_noise():
    generator = torch.Generator().manual_seed(0)
    uniform = draw_timesteps(100_000, 1000, 1.0, generator).float()
    ramp = draw_timesteps(100_000, 1000, 2.0, generator).float()
    assert 0 <= ramp.min() and ramp.max() <= 999 and uniform.max() <= 999
    assert abs(uniform.mean() - 499.5) < 5 and abs(ramp.mean() - 666.2) < 5  # density ~ t: mean 2T/3
    assert abs((ramp < 500).float().mean() - 0.25) < 0.01  # a quarter below the middle instead of a half
    with pytest.raises(ValueError, match="timestep_power"):
        TrainConfig(manifest="m", output_dir="o", timestep_power=0.0)


def test_config_files(tmp_path):
    (tmp_path / "run.toml").write_text('manifest = "data/m.jsonl"\noutput_dir = "out"\nprofile = "tiny"\n'
                                       "variant_gamma = [0.1, 0.3]\n[adapter_sizes]\ndepth = 2\n")
    config = load_config(tmp_path / "run.toml", {"max_steps": 7})
    assert config.manifest == str(tmp_path / "data" / "m.jsonl")  # relative to the config file
    assert load_config(tmp_path / "run.toml", {"output_dir": "here"}).output_dir == "here"  # --set: as given
    assert config.variant_gamma == (0.1, 0.3) and config.adapter_sizes == {"depth": 2} and config.max_steps == 7
    assert load_config(tmp_path / "run.toml", {"learning_rate": 1}).learning_rate == 1.0  # a whole number will do
    assert load_config(tmp_path / "run.toml", {"checkpoints_total_limit": None}).checkpoints_total_limit is None
    from diffusers.optimization import SchedulerType

    assert set(LR_SCHEDULERS) <= {kind.value for kind in SchedulerType}  # names diffusers' get_scheduler takes
    (tmp_path / "run.json").write_text(json.dumps({"manifest": "m.jsonl", "output_dir": "o", "learnin_rate": 1}))
    with pytest.raises(ValueError, match="unknown field.*learnin_rate"):
        load_config(tmp_path / "run.json")
    for bad, message in [(dict(invariant_gamma=(0.9, 0.5)), "invariant_gamma"),
                         (dict(drop_text=0.6, drop_image=0.6), "sum"), (dict(resolution=100), "multiple of 8"),
                         (dict(adapter_sizes={"width": 3}), "width"), (dict(init="ip_adapter"), "init_preservation"),
                         (dict(learning_rate="abc"), "learning_rate must be a number, got 'abc'"),
                         (dict(learning_rate=0), "learning_rate must be above 0"),
                         (dict(max_grad_norm=float("nan")), "max_grad_norm must be a finite number"),
                         (dict(lr_warmup_steps=2.5), "lr_warmup_steps must be a whole number"),
                         (dict(checkpoint_every=-1), "checkpoint_every must be 0 or more"),
                         (dict(verify_images="yes"), "verify_images must be true or false"),
                         (dict(lr_scheduler="cosin"), "lr_scheduler 'cosin' unknown; choose one of constant"),
                         (dict(init="scrach"), "init 'scrach' unknown; choose one of scratch, profile, ip_adapter"),
                         (dict(init="adapter.bin"), "or the path of a FlexIP .safetensors file")]:
        with pytest.raises(ValueError, match=message):
            TrainConfig(manifest="m", output_dir="o", **bad)


def test_overfitting_lowers_the_loss_and_the_adapter_changes_the_pipeline(manifest, tmp_path, tiny_pipe, photos):
    config = tiny_config(manifest, tmp_path, init="profile", train_batch_size=6, max_steps=60, learning_rate=1e-2)
    draws = []
    before = fixed_loss(config)
    result = run(config, on_step=lambda report: draws.extend(report.draws))
    after = fixed_loss(dataclasses.replace(config, init=str(result.adapter_path)))
    assert after < before - 0.03, (before, after)

    # Modality-aware gamma, as the run drew it: invariant samples high, variant samples low.
    gammas = torch.cat([d.gammas for d in draws])
    modality = torch.cat([d.modality for d in draws])
    assert len(gammas) == 60 * 6 and set(modality.tolist()) == {0, 1}
    assert torch.all((gammas[modality == 0] >= 0.7) & (gammas[modality == 0] <= 1.0))
    assert torch.all((gammas[modality == 1] >= 0.0) & (gammas[modality == 1] <= 0.4))
    assert torch.cat([d.drop_text | d.drop_image for d in draws]).any()  # CFG dropout happened

    trained = FlexIPPipeline.from_profile("tiny", adapter=str(result.adapter_path))
    assert trained.adapter.config == tiny_pipe.adapter.config
    settings = dict(gate=[0.2, 0.8], num_inference_steps=3, seed=0, output_type="np")
    new = trained("a dog", subject=trained.encode_subject([photos["dog"]]), **settings).arrays
    old = tiny_pipe("a dog", subject=tiny_pipe.encode_subject([photos["dog"]]), **settings).arrays
    assert np.abs(new - old).mean() > 1e-3


def test_encoding_each_batch_equals_encoding_up_front(manifest, tmp_path):
    """The large-data path (DataLoader + per-batch encoding, here with gradient checkpointing) trains identically."""
    up_front = run(tiny_config(manifest, tmp_path / "a", max_steps=2))
    per_batch = run(tiny_config(manifest, tmp_path / "b", max_steps=2, precompute_limit=0, gradient_checkpointing=True))
    a, b = load_file(str(up_front.adapter_path)), load_file(str(per_batch.adapter_path))
    # Encoder batches of another size round differently (~1e-7); Adam's first steps (lr 1e-3) move every
    # weight by about the learning rate, so a real difference in the training path would show as ~1e-3.
    assert all(torch.allclose(a[k], b[k], atol=1e-4, rtol=0) for k in a)
    assert up_front.losses == pytest.approx(per_batch.losses, abs=1e-5)


def test_resume_equals_an_uninterrupted_run(manifest, tmp_path):
    settings = dict(max_steps=4, gradient_accumulation_steps=2, lr_scheduler="linear", lr_warmup_steps=1)
    straight = run(tiny_config(manifest, tmp_path / "straight", **settings))

    config = tiny_config(manifest, tmp_path / "resumed", checkpoint_every=2, **settings)

    def crash(report):
        if report.step == 3:
            raise Interrupted()

    with pytest.raises(Interrupted):
        run(config, on_step=crash)
    assert (tmp_path / "resumed" / "checkpoints" / "step-000002").is_dir()
    resumed = run(dataclasses.replace(config, resume_from="latest"))
    assert resumed.steps == 4 and len(resumed.losses) == 2  # steps 3 and 4 only

    a, b = load_file(str(straight.adapter_path)), load_file(str(resumed.adapter_path))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed parameters differ from the uninterrupted run's"
    assert straight.losses[2:] == resumed.losses
    log = [json.loads(line) for line in (tmp_path / "resumed" / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2, 3, 4]  # the interrupted run's step 3 was replaced


def torchrun(config: dict, folder: Path) -> list[dict]:
    """Train `config` in two CPU processes started by torchrun (accelerate joins them with gloo); its log lines."""
    (folder / "run.json").write_text(json.dumps(config))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "flexip_core.train", "--config", str(folder / "run.json")]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in (Path(config["output_dir"]) / "logs" / "train_log.jsonl").read_text()
            .splitlines()]


@pytest.mark.slow
def test_two_processes_with_torchrun(manifest, tmp_path, tiny_pipe, photos):
    """A real distributed run: torchrun starts two CPU processes that accelerate joins with gloo."""
    init = tiny_pipe.profile.adapter  # start from a native FlexIP file
    config = dataclasses.asdict(tiny_config(manifest, tmp_path / "out", init=init, max_steps=3, checkpoint_every=2))
    log = torchrun(config, tmp_path)
    assert [entry["processes"] for entry in log] == [2, 2, 2]
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints" / "step-000002").glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]
    trained = FlexIPPipeline.from_profile("tiny", adapter=str(tmp_path / "out" / "flexip_adapter.safetensors"))
    settings = dict(gate=0.5, num_inference_steps=2, seed=0, output_type="np")
    new = trained("a dog", subject=trained.encode_subject([photos["dog"]]), **settings).arrays
    old = tiny_pipe("a dog", subject=tiny_pipe.encode_subject([photos["dog"]]), **settings).arrays
    assert np.abs(new - old).max() > 0


def test_init_from_ip_adapter_files(manifest, tmp_path, tiny_pipe):
    """Warm start from published-layout IP-Adapter files (Plus -> preservation, plain -> personalization)."""
    from flexip_core.loading.tiny import write_synthetic_ip_adapter_files

    files = write_synthetic_ip_adapter_files(tiny_pipe.unet, tmp_path / "ip", clip_embed_dim=32, clip_hidden_dim=32)
    config = tiny_config(manifest, tmp_path / "out", init="ip_adapter", max_steps=2,
                         init_preservation=str(files[("plus", "safetensors")]),
                         init_personalization=str(files[("plain", "bin")]))
    result = run(config)
    trained = FlexIPPipeline.from_profile("tiny", adapter=str(result.adapter_path))
    kinds = (trained.adapter.config.preservation.kind, trained.adapter.config.personalization.kind)
    assert kinds == ("ip_adapter_plus", "ip_adapter")


def test_an_untrained_adapter_leaves_the_base_model_unchanged(manifest, tmp_path, photos):
    """`python -m flexip_core.train ... --set max_steps=0` writes the scratch adapter without a step; attached at any γ
    and strength it draws exactly what the base model draws (each branch's value projection starts at zero), and
    one training step moves it."""
    from accelerate.state import AcceleratorState

    from flexip_core.train import main

    config = dataclasses.asdict(tiny_config(manifest, tmp_path / "untrained", init="scratch"))
    (tmp_path / "run.json").write_text(json.dumps(config))
    AcceleratorState._reset_state(reset_partial_state=True)
    assert main(["--config", str(tmp_path / "run.json"), "--set", "max_steps=0"]) == 0
    untrained = FlexIPPipeline.from_profile("tiny", adapter=str(tmp_path / "untrained" / "flexip_adapter.safetensors"))
    subject = untrained.encode_subject([photos["dog"]])
    settings = dict(num_inference_steps=3, seed=2, output_type="np")
    base = untrained("a dog on the beach", subject=subject, branch_weights=(0.0, 0.0), **settings).arrays
    for gate, strength in ((0.0, 1.0), (0.5, 1.0), (1.0, 1.0), (0.5, 2.0)):
        out = untrained("a dog on the beach", subject=subject, gate=gate, strength=strength, **settings).arrays
        assert np.abs(out - base).max() <= 1e-4, (gate, strength)
    trained = run(tiny_config(manifest, tmp_path / "one-step", init="scratch", max_steps=1, learning_rate=1e-2))
    moved = FlexIPPipeline.from_profile("tiny", adapter=str(trained.adapter_path))
    out = moved("a dog on the beach", subject=moved.encode_subject([photos["dog"]]), gate=0.5, **settings).arrays
    assert np.abs(out - base).max() > 1e-4
