"""Training from WebDataset shards: shard lists, streams split across processes and workers, bad samples skipped,
exact resume (data order and weights), and a real two-process run."""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from flexip_core.training.config import TrainConfig, load_config
from flexip_core.training.data import PairPixels
from flexip_core.training.shards import ShardBatches, ShardStream, expand_shards, stream_shards
from tests.test_train import TINY_SIZES, Interrupted, run, torchrun

REPO = Path(__file__).resolve().parent.parent
SHARDS = 4
PER_SHARD = 4  # samples per shard; one of the 16 is bad (a broken JPEG) and one has no caption
BAD = {"s1-0002": "target", "s3-0000": "caption"}


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, dreambench) -> Path:
    """4 shards x 4 samples from DreamBench photos: invariant (the target as reference, some cut out by a mask) and
    variant (another photo as reference) pairs, one broken target and one sample without a caption."""
    import webdataset as wds

    root = tmp_path_factory.mktemp("shards")
    photos = {}
    for subject in ("dog", "cat", "backpack"):
        for i in range(2):
            image = Image.open(dreambench / subject / f"0{i}.jpg").convert("RGB")
            image.thumbnail((80, 80))
            photos[subject, i] = image
    subjects = ("dog", "cat", "backpack")
    for s in range(SHARDS):
        with wds.TarWriter(str(root / f"pairs-{s:06d}.tar"), encoder=False) as sink:
            for n in range(PER_SHARD):
                key = f"s{s}-{n:04d}"
                subject = subjects[(s * PER_SHARD + n) % 3]
                variant = n % 2 == 1
                target = photos[subject, 1 if variant else 0]
                sample = {"__key__": key, "jpg": _jpeg(target)}
                if variant:
                    sample["ref.jpg"] = _jpeg(photos[subject, 0])
                elif n == 2:
                    mask = np.zeros((target.height, target.width), np.uint8)
                    mask[10:-10, 10:-10] = 255
                    sample["mask.png"] = _png(Image.fromarray(mask))
                meta = {"caption": f"a {subject} on the beach" if variant else f"a photo of a {subject}",
                        "modality": "variant" if variant else "invariant"}
                if BAD.get(key) == "target":
                    sample["jpg"] = sample["jpg"][:200]  # truncated JPEG
                if BAD.get(key) == "caption":
                    meta["caption"] = " "
                sample["json"] = json.dumps(meta).encode()
                sink.write(sample)
    return root


def pixels() -> PairPixels:
    """Decoding without image encoders: the item's keys and sizes, none of the models (fast, picklable)."""
    return PairPixels(64, _blank, None)


def _blank(images):
    return torch.zeros(len(images), 3, 8, 8)


def shard_config(shard_dir: Path, output_dir: Path, **overrides) -> TrainConfig:
    fields = dict(shards=str(shard_dir / "pairs-{000000..000003}.tar"), output_dir=str(output_dir), profile="tiny",
                  resolution=64, adapter_sizes=TINY_SIZES, train_batch_size=2, max_steps=4, learning_rate=1e-3,
                  checkpoint_every=0, report_to="none", shuffle_buffer=3)
    return TrainConfig(**{**fields, **overrides})


def test_shard_lists_expand_braces_globs_and_relative_paths(shard_dir, tmp_path):
    names = [f"pairs-{s:06d}.tar" for s in range(SHARDS)]
    assert expand_shards(str(shard_dir / "pairs-{000000..000003}.tar")) == [str(shard_dir / n) for n in names]
    assert expand_shards(str(shard_dir / "pairs-*.tar")) == [str(shard_dir / n) for n in names]
    assert expand_shards([str(shard_dir / names[2]), str(shard_dir / "pairs-00000{0..1}.tar")]) == [
        str(shard_dir / n) for n in (names[2], names[0], names[1])]
    assert expand_shards(f"file://{shard_dir}/{names[0]}") == [f"file://{shard_dir}/{names[0]}"]  # fsspec URLs
    with pytest.raises(ValueError, match="shard not found: .*pairs-000004.tar"):
        expand_shards(str(shard_dir / "pairs-{000000..000004}.tar"))
    with pytest.raises(ValueError, match="matches no file"):
        expand_shards(str(shard_dir / "nope-*.tar"))
    with pytest.raises(ValueError, match="more than once"):
        expand_shards([str(shard_dir / names[0]), str(shard_dir / "pairs-*.tar")])

    relative = os.path.relpath(shard_dir, tmp_path)
    (tmp_path / "run.toml").write_text(f'shards = ["{relative}/pairs-{{000000..000001}}.tar", '
                                       '"s3://bucket/pairs-000009.tar"]\noutput_dir = "out"\n')
    config = load_config(tmp_path / "run.toml")
    assert config.shards == [str(shard_dir / "pairs-{000000..000001}.tar"), "s3://bucket/pairs-000009.tar"]
    assert config.manifest is None
    with pytest.raises(ValueError, match="not both"):
        load_config(tmp_path / "run.toml", {"manifest": "m.jsonl"})
    with pytest.raises(ValueError, match="one of them"):
        TrainConfig(output_dir="o")


def test_streams_read_different_shards_and_skip_bad_samples(shard_dir, caplog):
    """2 processes x 2 workers: four streams, disjoint shards, every good sample of an epoch once; bad ones logged."""
    urls = expand_shards(str(shard_dir / "pairs-*.tar"))
    keys, shards_read = [], []
    with caplog.at_level(logging.WARNING, logger="flexip_core.training.shards"):
        for rank in range(2):
            stream = ShardStream(urls, pixels(), seed=7, rank=rank, world_size=2, num_workers=2, shuffle_buffer=3)
            for local in range(2):
                shard = stream_shards(urls, 7, 0, rank * 2 + local, 4)
                items = list(_one_epoch(stream._stream(local, 0, 0)))
                assert {item["key"][:2] for item in items} == {"s" + Path(shard[0]).stem[-1]}  # from its shard only
                shards_read += shard
                keys += [item["key"] for item in items]
    assert sorted(shards_read) == urls  # each shard read by exactly one stream
    good = {f"s{s}-{n:04d}" for s in range(SHARDS) for n in range(PER_SHARD)} - set(BAD)
    assert sorted(keys) == sorted(good)
    assert "s1-0002" in caplog.text and "truncated or corrupt" in caplog.text
    assert "s3-0000" in caplog.text and "no caption" in caplog.text
    item = items[0]
    assert item["target"].shape == (3, 64, 64) and item["clip"].shape == (3, 8, 8)
    assert item["modality"] in (0, 1) and item["epoch"] == 0 and item["position"] >= 1


def _one_epoch(items):
    """A stream's items until its epoch changes."""
    for item in items:
        if item["epoch"] != 0:
            return
        yield item


def test_a_resumed_stream_continues_the_same_batches(shard_dir):
    """Through real DataLoader workers: batches after a resume from the positions kept equal the uninterrupted ones,
    across epochs and whichever worker's turn it was."""
    urls = expand_shards(str(shard_dir / "pairs-*.tar"))
    settings = dict(seed=3, rank=0, world_size=1, batch_size=2, num_workers=2, shuffle_buffer=3)

    def take(batches, count):
        out = []
        for raw in batches:
            out.append((raw["caption"], raw["target"]))
            if len(out) == count:
                return out

    straight = take(ShardBatches(urls, pixels(), **settings), 12)  # 24 samples: past one epoch (14)
    first = ShardBatches(urls, pixels(), **settings)
    head = take(first, 5)  # an odd number of batches: the second worker's turn comes first after the resume
    saved = first.state()
    assert set(saved) == {0, 1}
    resumed = take(ShardBatches(urls, pixels(), **settings, micro_step=5, saved=saved), 7)
    for (captions_a, targets_a), (captions_b, targets_b) in zip(head + resumed, straight, strict=True):
        assert captions_a == captions_b and torch.equal(targets_a, targets_b)
    restarted = take(ShardBatches(urls, pixels(), **settings), 7)  # without the positions: not the same batches
    assert [c for c, _ in restarted] != [c for c, _ in straight[5:]]


def test_training_from_shards_resumes_to_the_same_weights(shard_dir, tmp_path):
    """The trainer reads shards with two DataLoader workers; a run interrupted after its step-3 checkpoint and resumed
    ends with exactly the weights of an uninterrupted one, and the log counts the bad samples met."""
    # 4 steps x 4 samples: each worker's stream draws 8 samples, past its first epoch (2 shards, at most 7 good
    # samples when one holds a bad one), so both bad samples have been met
    settings = dict(max_steps=4, train_batch_size=4, num_workers=2, lr_scheduler="linear", lr_warmup_steps=1)
    straight = run(shard_config(shard_dir, tmp_path / "straight", **settings))
    assert straight.steps == 4 and all(np.isfinite(straight.losses))

    config = shard_config(shard_dir, tmp_path / "resumed", checkpoint_every=3, **settings)

    def crash(report):  # after the step-3 checkpoint: 3 batches taken, the second worker's turn comes next
        if report.step == 4:
            raise Interrupted()

    with pytest.raises(Interrupted):
        run(config, on_step=crash)
    resumed = run(dataclasses.replace(config, resume_from="latest"))
    assert resumed.steps == 4 and len(resumed.losses) == 1
    a, b = load_file(str(straight.adapter_path)), load_file(str(resumed.adapter_path))
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed parameters differ from the uninterrupted run's"
    assert straight.losses[3:] == resumed.losses
    log = [json.loads(line) for line in (tmp_path / "straight" / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2, 3, 4]
    assert sum(entry["skipped_samples"] for entry in log) >= len(BAD)


@pytest.mark.slow
def test_two_processes_read_different_shards(shard_dir, tmp_path):
    """torchrun starts two CPU processes: each reads its own shards; the checkpoint keeps both processes' streams."""
    config = dataclasses.asdict(shard_config(shard_dir, tmp_path / "out", max_steps=2, checkpoint_every=2))
    log = torchrun(config, tmp_path)
    assert [entry["processes"] for entry in log] == [2, 2]
    state = torch.load(tmp_path / "out" / "checkpoints" / "step-000002" / "custom_checkpoint_0.pkl",
                       weights_only=False)
    streams = state["streams"]  # per process: {stream: [epoch, samples drawn]}
    assert len(streams) == 2 and all(s[0][1] >= 2 for s in streams)  # each process drew its own 2 x 2 samples
    urls = expand_shards(config["shards"])
    read = [stream_shards(urls, config["seed"], 0, rank, 2) for rank in range(2)]
    assert not set(read[0]) & set(read[1]) and sorted(read[0] + read[1]) == urls
    assert (tmp_path / "out" / "flexip_adapter.safetensors").is_file()


def test_paper_scale_configs_and_the_zero2_accelerate_config_load():
    """The paper-scale configs read with shards given on the command line; the DeepSpeed ZeRO-2 accelerate config
    loads with accelerate's own loader and its DeepSpeed file parses (neither needs deepspeed installed)."""
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    for name, batch in (("sd15-paper", 16), ("sdxl-paper", 4)):
        config = load_config(REPO / "assets" / "train" / f"{name}.toml",
                             {"shards": "/data/pairs-{000000..012299}.tar", "output_dir": "runs/x"})
        assert config.train_batch_size == batch and config.mixed_precision == "bf16" and config.manifest is None
        assert config.resume_from == "latest" and config.checkpoint_every > 0
    accelerate_config = load_config_from_file(str(REPO / "assets" / "train" / "accelerate" / "zero2.yaml"))
    assert isinstance(accelerate_config, ClusterConfig)
    assert accelerate_config.distributed_type == DistributedType.DEEPSPEED and accelerate_config.num_processes == 8
    ds_file = REPO / accelerate_config.deepspeed_config["deepspeed_config_file"]  # relative to the repository root
    plugin = DeepSpeedPlugin(hf_ds_config=str(ds_file))
    assert plugin.zero_stage == 2 and plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == "auto"
