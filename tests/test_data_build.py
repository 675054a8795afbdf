"""The modality recipe (flexip_core.data): COCO RLE, subject rules, and shards built from a SAM-layout folder, a
multi-view folder and videos written with PyAV, captioned from files and by a tiny random BLIP."""
from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from flexip_core.data import rle
from flexip_core.data.build import BuildSettings, build, main, shard_pattern
from flexip_core.data.captions import Captioner
from flexip_core.data.sam import SubjectRules, choose_subjects
from flexip_core.data.video import FrameRules
from flexip_core.generation.images import load_reference_image
from flexip_core.training.data import PairPixels
from flexip_core.training.shards import decode_sample, expand_shards, raw_samples

H, W = 96, 128  # SAM-layout test images


def ellipse(cy, cx, ry, rx, shape=(H, W)) -> np.ndarray:
    y, x = np.ogrid[:shape[0], :shape[1]]
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def box(top, left, bottom, right, shape=(H, W)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[top:bottom, left:right] = True
    return mask


def annotation(index: int, mask: np.ndarray, with_box: bool = True) -> dict:
    out = {"id": index, "segmentation": rle.encode(mask)}
    if with_box:
        rows, cols = np.nonzero(mask)
        out["bbox"] = [int(cols.min()), int(rows.min()), int(np.ptp(cols)) + 1, int(np.ptp(rows)) + 1]
        out["area"] = int(mask.sum())
    return out


def write_sam(folder, name: str, masks: list[np.ndarray], caption: str | None = None, boxes: bool = True):
    pixels = np.full((H, W, 3), 230, np.uint8)
    colours = [(200, 30, 30), (30, 30, 200), (30, 160, 30), (120, 120, 0), (0, 120, 120)]
    for mask, colour in zip(masks, colours):
        pixels[mask] = colour
    Image.fromarray(pixels).save(folder / f"{name}.jpg", quality=95)
    data = {"image": {"image_id": 1, "width": W, "height": H, "file_name": f"{name}.jpg"},
            "annotations": [annotation(i, m, with_box=boxes) for i, m in enumerate(masks)]}
    (folder / f"{name}.json").write_text(json.dumps(data))
    if caption:
        (folder / f"{name}.txt").write_text(caption)


RED = ellipse(45, 40, 22, 26)  # 14% of the image, well inside it
BLUE = box(30, 80, 70, 115)  # 11%
PART = ellipse(45, 40, 14, 16)  # inside RED (6%)
TINY = box(5, 60, 9, 64)  # 0.1%
EDGE = box(70, 0, 96, 50)  # touches the left and bottom edges
SKY = box(0, 0, 80, 128)  # 83%: background


def write_video(path, frames: int, moving: bool = True, fps: int = 10):
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            pixels = np.full((48, 64, 3), 220, np.uint8)
            x = 2 + 2 * i if moving else 10
            pixels[12:36, x:x + 16] = (200, 40, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def view(angle: int) -> Image.Image:
    image = Image.new("RGB", (64, 64), (240, 240, 240))
    square = Image.new("RGB", (28, 28), (40, 140, 40)).rotate(angle, expand=True, fillcolor=(240, 240, 240))
    image.paste(square, (32 - square.width // 2, 32 - square.height // 2))
    return image


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    sam = root / "sam"
    sam.mkdir()
    write_sam(sam, "sa_1", [SKY, RED, BLUE, PART, TINY], caption="a red ball and a blue box")
    write_sam(sam, "sa_2", [TINY, EDGE, SKY])  # no subject
    write_sam(sam, "sa_3", [EDGE, BLUE], boxes=False)  # no caption file: the captioner; no bbox/area: decoded
    (sam / "sa_4.jpg").write_bytes(b"not a jpeg")
    (sam / "sa_4.json").write_text("{}")

    views = root / "mv"
    (views / "toys" / "car").mkdir(parents=True)
    for i in range(4):
        view(20 * i).save(views / "toys" / "car" / f"{i:03d}.png")
    (views / "toys" / "car" / "caption.txt").write_text("a green toy car")
    seq = views / "toys" / "seq7"
    (seq / "images").mkdir(parents=True)
    (seq / "masks").mkdir()
    for i in range(3):
        view(30 * i).save(seq / "images" / f"frame{i}.jpg")
        Image.fromarray(box(16, 16, 48, 48, (64, 64)).astype(np.uint8) * 255).save(seq / "masks" / f"frame{i}.png")
        (seq / "images" / f"frame{i}.txt").write_text(f"a green box, view {i}")
    (views / "lonely").mkdir()
    view(0).save(views / "lonely" / "only.png")

    videos = root / "videos"
    videos.mkdir()
    write_video(videos / "clip.mp4", 30)
    (videos / "clip.txt").write_text("a red block sliding right")
    write_video(videos / "short.mp4", 5)
    write_video(videos / "still.mp4", 30, moving=False)
    (videos / "broken.mp4").write_bytes(b"garbage" * 50)
    (videos / "captions.csv").write_text('video,caption\nstill.mp4,"a red block, still"\nshort.mp4,a short one\n')
    return root


@pytest.fixture(scope="module")
def captioner_dir(tmp_path_factory):
    """A tiny random BLIP captioner built from config dicts, saved like a Hub model."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip import BlipImageProcessorPil

    folder = tmp_path_factory.mktemp("blip")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "red", "ball", "box", "on", "the",
             "table", "toy"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    config = BlipConfig(vision_config=dict(small, image_size=32, patch_size=8),
                        text_config=dict(small, vocab_size=len(words), max_position_embeddings=64, bos_token_id=2,
                                         sep_token_id=3, pad_token_id=0, eos_token_id=3), projection_dim=16)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    BlipProcessor(BlipImageProcessorPil(size={"height": 32, "width": 32}),
                  BertTokenizer(str(folder / "vocab.txt"))).save_pretrained(folder)
    return folder


def samples_of(shards) -> dict[str, dict]:
    """{origin: sample} of every sample in the shards, JSON parsed."""
    out = {}
    for sample in raw_samples([str(p) for p in shards], lambda error: False):
        sample["meta"] = json.loads(sample["json"])
        out[sample["meta"]["origin"]] = sample
    return out


def test_rle_round_trip_and_pycocotools():
    masks = [RED, BLUE | TINY, np.ones((3, 5), bool), np.zeros((4, 2), bool), np.eye(7, dtype=bool)]
    rng = np.random.default_rng(0)
    masks += [rng.random((int(h), int(w))) < 0.3 for h, w in rng.integers(1, 40, (20, 2))]
    for mask in masks:
        encoded = rle.encode(mask)
        assert np.array_equal(rle.decode(encoded), mask)
        assert rle.area(encoded) == mask.sum()
    # column by column: 0, then 1 1, then 0 0 0
    assert rle.decode({"size": [2, 3], "counts": [1, 2, 3]}).tolist() == [[False, True, False], [True, False, False]]
    with pytest.raises(ValueError, match="cover 5 pixels"):
        rle.decode({"size": [2, 3], "counts": [1, 4]})
    coco = pytest.importorskip("pycocotools.mask")
    for mask in masks:
        reference = coco.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert rle.encode(mask)["counts"] == reference["counts"].decode()


def test_subject_rules():
    annotations = [annotation(i, m) for i, m in enumerate([SKY, RED, BLUE, PART, TINY, EDGE])]
    chosen, rejected = choose_subjects(annotations, W, H, SubjectRules(max_subjects=3))
    assert [a["id"] for a, _ in chosen] == [1, 2]  # largest first
    assert np.array_equal(chosen[0][1], RED)
    assert rejected == {"too large (background)": 1, "part of a chosen subject": 1, "too small": 1,
                        "touches the border": 1}
    chosen, rejected = choose_subjects(annotations, W, H, SubjectRules())
    assert [a["id"] for a, _ in chosen] == [1] and rejected["beyond max_subjects"] == 2
    ring = RED & ~ellipse(45, 40, 18, 22)
    _, rejected = choose_subjects([annotation(0, ring)], W, H, SubjectRules(min_area=0.01))
    assert rejected == {"not compact (fills too little of its box)": 1}


def test_build_writes_the_pairs_of_each_source(datasets, captioner_dir, tmp_path, caplog):
    settings = BuildSettings(out=str(tmp_path / "shards"), sam=(str(datasets / "sam"),),
                             multiview=(str(datasets / "mv"),), videos=(str(datasets / "videos"),),
                             captioner=str(captioner_dir), caption_table=str(datasets / "videos" / "captions.csv"),
                             subjects=SubjectRules(max_subjects=2), pairs_per_object=2, samples_per_shard=4,
                             frames=FrameRules(gap=1.0, pairs_per_video=2))
    with caplog.at_level(logging.WARNING):
        summary = build(settings)
    samples = samples_of(summary.shards)
    report = json.loads(settings.summary_file.read_text())

    # SAM: the two largest well-framed instances of sa_1 (not the sky, the part, the speck); the BLUE of sa_3
    sam = {k: s for k, s in samples.items() if s["meta"]["source"] == "sam"}
    assert sorted(sam) == ["sa_1.jpg#1", "sa_1.jpg#2", "sa_3.jpg#1"]
    for key, sample in sam.items():
        assert sample["meta"]["modality"] == "invariant" and "ref.jpg" not in sample  # the target is the reference
        mask = np.asarray(Image.open(io.BytesIO(sample["mask.png"]))) > 127
        assert np.array_equal(mask, {"sa_1.jpg#1": RED, "sa_1.jpg#2": BLUE, "sa_3.jpg#1": BLUE}[key])
    assert sam["sa_1.jpg#1"]["meta"]["caption"] == "a red ball and a blue box"  # its caption file
    expected = Captioner(str(captioner_dir))([load_reference_image(datasets / "sam" / "sa_3.jpg")])[0]
    assert expected and sam["sa_3.jpg#1"]["meta"]["caption"] == expected  # the model's caption
    assert report["sources"]["sam"]["skipped"] == {"no instance fits the subject rules": 1,
                                                   "unreadable image or annotations": 1}
    assert report["sources"]["sam"]["instances_not_chosen"] == {"too large (background)": 2, "too small": 2,
                                                                "beyond max_subjects": 1, "touches the border": 2}

    # Multi-view: two pairs of each object (views of one object), the masks folder no object, a lone view skipped
    views = {k: s for k, s in samples.items() if s["meta"]["source"] == "multiview"}
    assert len(views) == 4 and {k.split(":")[0] for k in views} == {"toys/car", "toys/seq7/images"}
    for key, sample in views.items():
        meta = sample["meta"]
        assert meta["modality"] == "variant" and "ref.jpg" in sample
        assert meta["reference_view"] != meta["target_view"]
        if key.startswith("toys/car"):
            assert meta["caption"] == "a green toy car" and "mask.png" not in sample
        else:  # CO3D layout: the reference cut out by its mask, the caption the target view's own
            assert meta["caption"] == f"a green box, view {meta['target_view'][5]}" and "mask.png" in sample
    assert report["sources"]["multiview"]["skipped"] == {"fewer than 2 views": 1}

    # Videos: frames 1 s apart of the moving clip; the short, still and broken ones skipped
    clips = {k: s for k, s in samples.items() if s["meta"]["source"] == "video"}
    assert sorted(clips) == ["clip.mp4@0.5-1.5s", "clip.mp4@1.5-2.5s"]  # 3 s long: spread over [0, 2]
    for sample in clips.values():
        assert sample["meta"]["modality"] == "variant" and sample["meta"]["caption"] == "a red block sliding right"
        assert sample["jpg"] != sample["ref.jpg"]
    assert report["sources"]["video"]["skipped"] == {"shorter than the frame gap": 1, "unreadable video": 1,
                                                     "frames nearly identical (no motion)": 2}
    assert "broken.mp4" in caplog.text and "sa_4.jpg" in caplog.text  # errors are logged

    # Shards of 4 samples, interleaved sources, every sample readable by the trainer
    assert report["pairs"] == len(samples) == 9 and report["by_modality"] == {"invariant": 3, "variant": 6}
    assert [p.rsplit("/", 1)[1] for p in summary.shards] == ["pairs-000000.tar", "pairs-000001.tar",
                                                            "pairs-000002.tar"]
    assert report["shard_pattern"].endswith("pairs-{000000..000002}.tar")
    assert expand_shards(report["shard_pattern"]) == summary.shards
    first = [s["meta"]["source"] for s in samples_of(summary.shards[:1]).values()]
    assert set(first) == {"sam", "multiview", "video"}
    pixels = PairPixels(64, lambda images: torch.zeros(len(images), 3, 8, 8), None)
    for sample in samples.values():
        item = decode_sample(sample, pixels)
        assert item["modality"] == (0 if sample["meta"]["modality"] == "invariant" else 1)


def test_the_command_without_a_captioner_and_in_parts(datasets, tmp_path, capsys):
    """Pairs without a caption file are skipped (and counted) when no captioner is named; --part splits the work."""
    out = tmp_path / "shards"
    args = ["--out", str(out), "--sam", str(datasets / "sam"), "--multiview", str(datasets / "mv"),
            "--samples-per-shard", "100"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "kept 5 pairs (1 invariant, 4 variant) in 1 shard(s)" in printed
    assert "no caption (no caption file; give --captioner MODEL) 1" in printed
    assert f'train with: shards = "{out}/pairs-000000.tar"' in printed
    whole = samples_of([out / "pairs-000000.tar"])
    parts = {}
    for k in range(2):
        assert main(args + ["--part", f"{k}/2"]) == 0
        parts.update(samples_of(sorted(out.glob(f"pairs-p{k}-*.tar"))))
        assert (out / f"summary-p{k}.json").is_file()
    assert sorted(parts) == sorted(whole)
    assert main(["--out", str(out)]) == 2
    assert "nothing to build from" in capsys.readouterr().err


def test_shard_pattern(tmp_path):
    paths = [tmp_path / f"pairs-p1-{i:06d}.tar" for i in range(12)]
    assert shard_pattern(paths) == str(tmp_path / "pairs-p1-{000000..000011}.tar")
    assert shard_pattern(paths[:1]) == str(paths[0]) and shard_pattern([]) is None
