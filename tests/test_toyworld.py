"""FlexIP-mini toy world and oracle: determinism, split, captions, manifest, and oracle accuracy."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from toyworld import world as tw
from toyworld.oracle import identity_kept, identity_score, prompt_score, read_attributes
from toyworld.oracle_check import REQUIRED_ACCURACY, heldout_accuracy

SUBJECT = tw.Subject("star", "red", "stripes")
SCENE = tw.Scene("sand", "large", "left", "squashed", "outlined")


def test_render_is_deterministic_and_sized():
    a, b = tw.render(SUBJECT, SCENE), tw.render(SUBJECT, SCENE)
    assert a.size == (tw.NATIVE_SIZE, tw.NATIVE_SIZE) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert tw.render(SUBJECT, SCENE, 64).size == (64, 64)
    # every attribute changes the picture
    for name, values in {**tw.IDENTITY_ATTRIBUTES, **tw.EDITABLE_ATTRIBUTES}.items():
        for value in values:
            subject, scene = SUBJECT, SCENE
            if name in tw.IDENTITY_ATTRIBUTES:
                subject = replace(SUBJECT, **{name: value})
            else:
                scene = replace(SCENE, **{name: value})
            if (subject, scene) != (SUBJECT, SCENE):
                assert not np.array_equal(np.asarray(tw.render(subject, scene)), np.asarray(a)), (name, value)


def test_invalid_values_raise():
    with pytest.raises(ValueError, match="shape='blob'"):
        tw.Subject("blob", "red", "plain")
    with pytest.raises(ValueError, match="split"):
        tw.sample_subjects(3, 0, "test")


def test_sampling_is_deterministic_from_seed():
    assert tw.sample_subjects(20, 5) == tw.sample_subjects(20, 5)
    assert tw.sample_subjects(20, 5) != tw.sample_subjects(20, 6)
    assert tw.sample_pairs(30, 5) == tw.sample_pairs(30, 5)
    assert tw.sample_pairs(30, 5) != tw.sample_pairs(30, 6)


def test_heldout_split_is_disjoint_and_combinatorial():
    train, heldout = tw.subjects_in("train"), tw.subjects_in("heldout")
    assert set(train).isdisjoint(heldout) and set(train) | set(heldout) == set(tw.subjects_in("all"))
    assert 0 < len(heldout) < len(train)
    assert set(tw.sample_subjects(100, 0, "heldout")) <= set(heldout)
    assert set(tw.sample_subjects(100, 0, "train")) <= set(train)
    assert {p.subject for p in tw.sample_pairs(100, 0, "train")} <= set(train)
    # held-out subjects are new combinations: each of their attribute pairs occurs in training
    for s in heldout:
        for a, b in (("shape", "colour"), ("shape", "pattern"), ("colour", "pattern")):
            assert any(getattr(t, a) == getattr(s, a) and getattr(t, b) == getattr(s, b) for t in train)
    assert len({s.id for s in tw.subjects_in("all")}) == len(tw.subjects_in("all"))


def test_captions_name_edits_and_parse_back():
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = tw.sample_scene(rng)
        for text in (tw.prompt_for(scene), tw.caption(SUBJECT, scene)):
            assert tw.parse_prompt(text) == {name: getattr(scene, name) for name in tw.EDITABLE_ATTRIBUTES}
    assert "star" not in tw.caption(SUBJECT, SCENE) and "red" not in tw.caption(SUBJECT, SCENE)
    assert {"star", "red", "striped"} <= set(tw.caption(SUBJECT, SCENE, with_identity=True).replace(",", "").split())
    assert tw.parse_prompt("a big toy in the middle, grey backdrop") == {
        "scale": "large", "position": "center", "background": "gray"}
    assert tw.parse_prompt("a photo of a dog") == {}


def test_a_prompt_may_ask_to_recolour_the_subject():
    text = tw.prompt_for(SCENE, "blue")
    assert "blue toy" in text and tw.parse_prompt(text) == {**tw.parse_prompt(tw.prompt_for(SCENE)), "colour": "blue"}
    assert tw.parse_prompt("a red toy, big") == {"colour": "red", "scale": "large"}
    with pytest.raises(ValueError, match="prompt colour='purple' is unknown; choose one of red, yellow, green, blue"):
        tw.prompt_for(SCENE, "purple")


def test_words_outside_the_captions_are_named_with_the_ones_the_world_has():
    rng = np.random.default_rng(4)
    for subject in tw.sample_subjects(20, seed=4, split="all"):  # every caption and prompt the world writes
        scene = tw.sample_scene(rng)
        assert tw.unknown_words_note(tw.caption(subject, scene, with_identity=True)) is None
        assert tw.unknown_words_note(tw.prompt_for(scene, subject.colour)) is None
    note = tw.unknown_words_note("A toy in a SNOWY forest, grey background, snowy", "negative prompt")
    assert note.startswith("left out of the negative prompt, as the toy-world model has never seen them: snowy, "
                           "forest, grey (say gray). ")
    assert "background white, gray, sand, sky" in note and "colour red, yellow, green, blue" in note
    assert tw.known_words("A toy in a SNOWY forest, grey background, snowy") == "a toy in a, background"
    assert tw.known_words(", watercolor, a small toy,, on the left, at night,") == "a small toy, on the left"
    assert tw.known_words("watercolor") == ""


def test_pairs_have_the_right_modalities():
    pairs = tw.sample_pairs(200, 1)
    assert {p.modality for p in pairs} == {"invariant", "variant"}
    for p in pairs:
        if p.modality == "variant":
            assert p.reference != p.target
        else:
            assert p.reference in (p.target, tw.cutout_scene(p.target))
    assert any(p.modality == "invariant" and p.reference != p.target for p in pairs)  # some cut-outs


def test_write_dataset_manifest(tmp_path):
    manifest = tw.write_dataset(tmp_path / "data", 24, seed=3)
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(records) == 24
    for r in records:
        target, reference = manifest.parent / r["target"], manifest.parent / r["reference"]
        assert not r["target"].startswith("/") and target.is_file() and reference.is_file()
        subject = tw.Subject(r["subject"]["shape"], r["subject"]["colour"], r["subject"]["pattern"])
        scene = tw.Scene(**r["scene"])
        assert r["subject"]["id"] == subject.id and r["caption"] == tw.caption(subject, scene)
        assert np.array_equal(np.asarray(Image.open(target)), np.asarray(tw.render(subject, scene)))
        ref = np.asarray(Image.open(reference))
        if r["modality"] == "invariant":
            assert tw.Scene(**r["reference_scene"]) in (scene, tw.cutout_scene(scene))
            assert np.array_equal(ref, np.asarray(tw.render(subject, tw.Scene(**r["reference_scene"]))))
        else:
            assert r["modality"] == "variant" and r["reference_scene"] != r["scene"]
            assert np.array_equal(ref, np.asarray(tw.render(subject, tw.Scene(**r["reference_scene"]))))
    assert {r["modality"] for r in records} == {"invariant", "variant"}


def test_oracle_reads_clean_renders_exactly():
    for subject in tw.subjects_in("heldout")[:4]:
        for scene in (SCENE, tw.Scene("gray", "small", "right", "stretched", "shadowed")):
            truth = {**{k: getattr(subject, k) for k in tw.IDENTITY_ATTRIBUTES}, **vars(scene)}
            assert read_attributes(tw.render(subject, scene)) == truth
            assert read_attributes(tw.render(subject, scene, 64)) == truth


def test_oracle_heldout_accuracy_per_attribute():
    accuracy = heldout_accuracy(n=200, seed=11)
    assert set(accuracy) == set(tw.IDENTITY_ATTRIBUTES) | set(tw.EDITABLE_ATTRIBUTES)
    assert min(accuracy.values()) >= REQUIRED_ACCURACY, accuracy


def test_identity_kept_reads_the_reference_photo_itself():
    """The studio's toy-world identity score: what the oracle reads in the reference (a wide photo, centre square
    as the encoders see it) found again in each output; None when the reference shows no toy."""
    reference = tw.render(SUBJECT, tw.cutout_scene(SCENE), 256)
    wide = Image.new("RGB", (384, 256), (245, 245, 245))
    wide.paste(reference, (64, 0))
    other_scene = tw.Scene("sand", "small", "left", "squashed", "outlined")
    outputs = [tw.render(SUBJECT, other_scene, 64), tw.render(tw.Subject(SUBJECT.shape, "blue", "dots"), SCENE, 64)]
    assert identity_kept(outputs, wide) == [1.0, pytest.approx(1 / 3)]
    assert identity_kept(outputs, Image.new("RGB", (64, 64), (245, 245, 245))) == [None, None]


def test_only_toy_world_images_count_as_toys(dreambench):
    """A photo is not read as a toy (the oracle would find some shape and colour in anything): the toy re-drawn
    from what it reads must look like the image."""
    from toyworld.oracle import read_toy

    rng = np.random.default_rng(5)
    for subject in tw.sample_subjects(12, seed=5, split="all"):
        assert read_toy(tw.render(subject, tw.sample_scene(rng), 64 * int(rng.integers(1, 5)))) == subject
    photos = sorted(dreambench.glob("*/00.jpg"))
    assert len(photos) >= 10 and all(read_toy(Image.open(path)) is None for path in photos)
    assert identity_kept([tw.render(SUBJECT, SCENE)], Image.open(photos[0])) == [None]


def test_identity_and_prompt_scores():
    image = tw.render(SUBJECT, SCENE)
    assert identity_score(image, SUBJECT) == 1.0
    assert identity_score(image, tw.Subject("circle", "red", "stripes")) == pytest.approx(2 / 3)
    assert identity_score(image, tw.Subject("square", "blue", "dots")) == 0.0
    assert prompt_score(image, tw.parse_prompt(tw.prompt_for(SCENE))) == 1.0
    assert prompt_score(image, {"background": "white", "scale": "large"}) == 0.5
    assert identity_score(Image.new("RGB", (32, 32), (245, 245, 245)), SUBJECT) == 0.0  # nothing drawn
    assert prompt_score(image, tw.parse_prompt(tw.prompt_for(SCENE, "blue"))) == pytest.approx(5 / 6)  # red
    assert prompt_score(image, tw.parse_prompt(tw.prompt_for(SCENE, "red"))) == 1.0
    with pytest.raises(ValueError, match="no attributes requested"):
        prompt_score(image, {})
    with pytest.raises(ValueError, match="'shape' is not an attribute a prompt can ask for"):
        prompt_score(image, {"shape": "star"})
