"""Training manifests: reading (bad records reported by line and skipped), masks, batching order, folder builder."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from flexip_core.training.data import (
    PairDataset,
    StepBatchSampler,
    cut_out,
    load_reference,
    read_manifest,
    stream_indices,
)
from flexip_core.training.manifest import build_manifest
from flexip_core.training.manifest import main as manifest_main


def _image(path, colour, size=(48, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def _pair(target="a.png", reference="a.png", caption="a red square", modality="invariant", **extra):
    return {"target": target, "reference": reference, "caption": caption, "modality": modality, **extra}


def test_bad_records_are_reported_by_line_and_skipped(tmp_path, caplog):
    _image(tmp_path / "a.png", "red")
    _image(tmp_path / "b.png", "blue")
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    manifest = _write(tmp_path / "m.jsonl", [
        _pair(),  # 1: fine
        _pair(target="missing.png"),  # 2: missing file
        _pair(target="broken.png"),  # 3: unreadable image
        _pair(caption="   "),  # 4: empty caption
        "{not json",  # 5
        _pair(modality="sideways"),  # 6: unknown modality
        {"target": "a.png", "caption": "x", "modality": "variant"},  # 7: no reference
        "",  # 8: blank lines are not records
        _pair(target="b.png", reference="a.png", modality="variant", subject={"id": "x"}),  # 9: extra keys are fine
    ])
    with caplog.at_level(logging.WARNING, logger="flexip_core.training.data"):
        records, problems = read_manifest(manifest)
    assert [r.line for r in records] == [1, 9]
    assert [p.line for p in problems] == [2, 3, 4, 5, 6, 7]
    messages = {p.line: p.message for p in problems}
    assert "not found" in messages[2] and "missing.png" in messages[2]
    assert "unreadable" in messages[3]
    assert "empty caption" in messages[4]
    assert "not valid JSON" in messages[5]
    assert "sideways" in messages[6]
    assert "reference" in messages[7]
    for line in (2, 3, 4, 5, 6, 7):
        assert f"line {line}:" in caplog.text
    assert records[1].target == tmp_path / "b.png" and records[1].modality_id == 1


def test_a_manifest_without_usable_records_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="manifest not found"):
        read_manifest(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="no usable record.*line 1"):
        read_manifest(_write(tmp_path / "m.jsonl", [_pair(target="gone.png")]))


def test_mask_cuts_the_subject_out_of_the_reference(tmp_path):
    photo = np.zeros((40, 48, 3), np.uint8)
    photo[:] = (0, 0, 200)
    Image.fromarray(photo).save(tmp_path / "a.png")
    mask = np.zeros((40, 48), np.uint8)
    mask[10:20, 5:25] = 255
    Image.fromarray(mask).save(tmp_path / "a_mask.png")
    Image.fromarray(mask[:20]).save(tmp_path / "small_mask.png")
    Image.fromarray(np.zeros_like(mask)).save(tmp_path / "empty_mask.png")
    manifest = _write(tmp_path / "m.jsonl", [_pair(mask="a_mask.png"), _pair(mask="small_mask.png"),
                                            _pair(mask="empty_mask.png")])
    records, problems = read_manifest(manifest)
    assert [p.line for p in problems] == [2, 3]
    assert "20" in problems[0].message and "empty" in problems[1].message
    reference = load_reference(records[0])
    assert reference.size == (20, 10)  # cropped to the mask's box
    assert np.all(np.asarray(reference) == (0, 0, 200))
    white = cut_out(Image.fromarray(photo), np.pad(np.ones((2, 2), bool), ((0, 38), (0, 46))))
    assert white.size == (2, 2)


def test_dataset_items_and_a_file_that_breaks_later(tmp_path, tiny_pipe, caplog):
    _image(tmp_path / "a.png", "red")
    _image(tmp_path / "b.png", "green")
    records, _ = read_manifest(_write(tmp_path / "m.jsonl", [_pair(), _pair("b.png", "a.png", modality="variant")]))
    encoder = tiny_pipe.encoder
    dataset = PairDataset(records, 64, encoder.clip_preprocess, encoder.dino_preprocess, tiny_pipe.tokenizer)
    item = dataset[1]
    assert item["target"].shape == (3, 64, 64) and -1.0 <= item["target"].min() <= item["target"].max() <= 1.0
    assert item["clip"].shape == (3, 32, 32) and item["dino"].shape == (3, 32, 32)
    assert item["input_ids"].shape == (77,) and item["modality"] == 1
    (tmp_path / "b.png").write_bytes(b"corrupted after the manifest was read")
    with caplog.at_level(logging.WARNING, logger="flexip_core.training.data"):
        stand_in = dataset[1]
    assert stand_in["index"] == 0 and "manifest line 2" in caplog.text


def test_batches_cover_each_epoch_once_and_split_across_processes():
    assert sorted(stream_indices(0, 10, 10, seed=3)) == list(range(10))
    assert stream_indices(0, 10, 10, seed=3) != stream_indices(10, 10, 10, seed=3)  # each epoch reshuffles
    assert stream_indices(7, 5, 10, seed=3) == stream_indices(0, 12, 10, seed=3)[7:]  # start anywhere
    ranks = [StepBatchSampler(12, 2, rank, 2, seed=1, start=0, stop=5) for rank in (0, 1)]
    seen = [i for step in range(3) for sampler in ranks for i in sampler.batch(step)]
    assert sorted(seen) == list(range(12))  # two processes, one epoch, no overlap
    resumed = StepBatchSampler(12, 2, 1, 2, seed=1, start=3, stop=5)
    assert list(resumed) == [ranks[1].batch(3), ranks[1].batch(4)] and len(resumed) == 2


def test_manifest_from_captioned_and_multiview_folders(tmp_path):
    captioned, views = tmp_path / "captioned", tmp_path / "views"
    _image(captioned / "cat.png", "red")
    (captioned / "cat.txt").write_text("a cat\non a sofa\n")
    _image(captioned / "cat_mask.png", "white")
    _image(captioned / "nocaption.jpg", "blue")
    for i in range(3):
        _image(views / "teapot" / f"{i:02d}.png", (i * 60, 0, 0))
    (views / "teapot" / "caption.txt").write_text("a teapot")
    (views / "teapot" / "01.txt").write_text("a teapot seen from the side")
    _image(views / "lonely" / "00.png", "green")
    out = tmp_path / "out" / "manifest.jsonl"
    path, counts, skipped = build_manifest(out, captioned, views, pairs_per_frame=2, seed=0)
    assert counts == {"invariant": 1, "variant": 6}
    assert any("nocaption" in s for s in skipped) and any("lonely" in s for s in skipped)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    invariant = lines[0]
    assert invariant == {"target": "../captioned/cat.png", "reference": "../captioned/cat.png",
                         "caption": "a cat on a sofa", "modality": "invariant", "mask": "../captioned/cat_mask.png"}
    variant = lines[1:]
    assert all(r["target"] != r["reference"] for r in variant)
    assert all("teapot" in r["target"] and "teapot" in r["reference"] for r in variant)
    assert {r["caption"] for r in variant if r["target"].endswith("01.png")} == {"a teapot seen from the side"}
    records, problems = read_manifest(path)  # what the builder writes, the reader accepts
    assert len(records) == 7 and not problems
    assert manifest_main(["--out", str(tmp_path / "x.jsonl")]) == 2  # no folder given: a clear error
    with pytest.raises(SystemExit):  # not a manifest's name: refused before anything is written
        manifest_main(["--captioned", str(tmp_path / "captioned"), "--out", str(tmp_path / "captions.txt")])
    assert not (tmp_path / "captions.txt").exists()


def test_toy_world_manifests_read_as_they_are(tmp_path):
    toyworld = pytest.importorskip("toyworld.world")
    manifest = toyworld.write_dataset(tmp_path, n_pairs=6, seed=0)
    records, problems = read_manifest(manifest)
    assert len(records) == 6 and not problems
