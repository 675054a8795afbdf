"""FlexIP-mini acceptance: on held-out subjects and prompts, the gate trades identity for prompt smoothly.

Needs the shipped weights (assets/mini, built by `python -m toyworld.mini.build`); skipped without them.
"""
from __future__ import annotations

import functools
import json
import logging
import re
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from toyworld import world as tw
from toyworld.mini import curve as curve_command
from toyworld.mini import gate_map, slider, world
from toyworld.mini.build import ASSETS, PROFILE_PATH

HAVE_WEIGHTS = (ASSETS / "flexip_adapter.safetensors").is_file() and PROFILE_PATH.is_file()
needs_weights = pytest.mark.skipif(not HAVE_WEIGHTS, reason="assets/mini is absent; build it with "
                                   "`python -m toyworld.mini.build`")
CASES, SEEDS = 6, (0, 1)  # held-out cases x seeds: 12 images per gate value


def test_training_data_never_shows_heldout_subjects_or_prompts(tmp_path):
    manifest = world.write_adapter_manifest(tmp_path, 80, seed=3, invariant_conflict_p=0.5, conflict_colour_p=0.5)
    heldout_subjects = {s.id for s in tw.subjects_in("heldout")}
    conflicts = recoloured = 0
    for line in manifest.read_text().splitlines():
        record = json.loads(line)
        assert tw.Subject(**record["subject"]).id not in heldout_subjects
        assert not world.scene_is_heldout(tw.Scene(**record["scene"]))
        asked = tw.parse_prompt(record["caption"])
        colour = asked.pop("colour", None)
        if not asked.items() <= record["scene"].items():  # an invariant caption describing another scene
            assert record["modality"] == "invariant" and not world.scene_is_heldout(tw.Scene(**asked))
            conflicts += 1
            if colour is not None:  # and another colour than the subject's, which the target keeps
                assert colour != record["subject"]["colour"]
                recoloured += 1
        else:
            assert colour is None
    assert 5 <= conflicts <= 35 and 1 <= recoloured < conflicts
    for case in world.sample_cases(8, seed=1):
        assert case.subject.id in heldout_subjects and world.scene_is_heldout(case.target)
        assert all(getattr(case.reference, a) != getattr(case.target, a) for a in world.SCENE_NAMES)


def test_recolouring_cases_are_the_same_cases_asking_for_another_colour():
    plain, recolour = world.sample_cases(12, seed=1), world.sample_cases(12, seed=1, recolour=True)
    for a, b in zip(plain, recolour):
        assert (a.subject, a.reference, a.target, a.colour) == (b.subject, b.reference, b.target, None)
        assert b.colour in tw.COLOURS and b.colour != b.subject.colour
        assert tw.parse_prompt(b.prompt) == {**tw.parse_prompt(a.prompt), "colour": b.colour}
    assert len({c.colour for c in recolour}) > 1


def test_full_caption_is_the_toyworld_prompt():
    scene = tw.Scene("sand", "small", "left", "squashed", "flat")
    assert world.describe(scene) == tw.prompt_for(scene)
    assert tw.parse_prompt(world.describe(scene, {"pose"})) == {"pose": "squashed"}


@pytest.fixture(scope="module")
def curve():
    from toyworld.mini.curve import load_mini

    pipe = load_mini()
    return slider.measure(pipe, world.sample_cases(CASES, seed=1, split="heldout"), seeds=SEEDS)


@needs_weights
def test_mini_leaves_out_the_prompt_words_it_has_never_seen_and_says_so():
    """Words outside the toy world's captions (never trained: they made the model draw noise and, spelled out letter
    by letter, pushed known words past its 32 tokens) are left out with a warning that names them; the API and the
    studio show a result's warnings."""
    from toyworld.mini.curve import load_mini

    pipe = load_mini()
    subject = pipe.encode_subject([world.sample_cases(1, seed=1, split="heldout")[0].reference_image()])
    run = dict(subject=subject, num_inference_steps=3, seed=0, gate=[0.0, 1.0], output_type="np")
    free = "a toy in a snowy forest at night, watercolor, on a sky background"
    out = pipe(free, negative_prompt="ugly", guidance_scale=5.0, **run)
    assert out.warnings == [tw.unknown_words_note(free), tw.unknown_words_note("ugly", "negative prompt")]
    assert "left out of the prompt, as the toy-world model has never seen them: snowy, forest, at," in out.warnings[0]
    same = pipe("a toy in a, on a sky background", guidance_scale=5.0, **run)
    assert same.warnings == [] and np.array_equal(out.arrays, same.arrays)


@needs_weights
def test_studio_on_mini_says_when_the_subject_photo_is_not_a_toy(photos):
    """On the toy-world model a photo gets no identity score (the oracle would read some shape and colour in any
    photo) and a warning that says why; a toy of the world gets its score and no warning."""
    from flexip_core.generation.settings import Generation
    from toyworld.oracle import NOT_A_TOY
    from ui.engine import CoreEngine

    engine = CoreEngine("mini")
    generation = Generation(prompt="a small toy on the left, on a sky background", num_inference_steps=3, width=64,
                            height=64)
    dog = engine.render([photos["dog"]], [1.0], generation, [0.5, 1.0])
    assert [r.identity for r in dog] == [None, None] and all(r.warnings == (NOT_A_TOY,) for r in dog)
    toy = world.sample_cases(1, seed=1, split="heldout")[0].reference_image()
    kept = engine.render([toy], [1.0], generation, [1.0])
    assert kept[0].identity is not None and kept[0].warnings == ()


@needs_weights
def test_mini_runs_on_the_cpu_unless_a_device_is_named(monkeypatch):
    """A GPU is no faster for a 4 M-parameter model on 8 x 8 latents (H200: 0.48 s per image, 2 CPU cores: 0.35 s),
    and the acceptance curve was measured on the CPU: mini stays there when CUDA is present."""
    import torch

    from flexip_core import FlexIPPipeline

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert FlexIPPipeline.from_profile("mini").device.type == "cpu"
    with pytest.raises(ValueError, match="device 'tpu' unknown"):
        FlexIPPipeline.from_profile("mini", device="tpu")


@needs_weights
def test_gate_zero_follows_held_out_prompts(curve):
    assert curve.prompt[0] >= 0.9, curve.rows()  # measured 0.996 on 16 cases x 3 seeds


@needs_weights
def test_raising_the_gate_brings_identity_in_and_lets_the_prompt_go(curve):
    """What the shipped build reaches (16 cases x 3 seeds: identity 0.22 -> 0.92, prompt 1.00 -> 0.46)."""
    assert curve.identity[-1] >= 0.8 and curve.identity[-1] - curve.identity[0] >= 0.4, curve.rows()
    assert curve.prompt[0] - curve.prompt[-1] >= 0.5, curve.rows()
    # the middle keeps both
    assert curve.identity[5] - curve.identity[0] >= 0.15 and curve.prompt[5] >= 0.9, curve.rows()


@needs_weights
def test_identity_breaks_down_into_the_attributes_the_oracle_finds(curve):
    """The identity score is the mean of its attributes' shares; at gamma = 1 each comes through for subjects never
    seen in training, the pattern too (16 cases x 3 seeds: shape 0.98, colour 0.83, pattern 0.96)."""
    shares = np.array([curve.attributes[name] for name in tw.IDENTITY_ATTRIBUTES])  # (3, G)
    assert np.allclose(shares.mean(0), curve.identity), curve.rows()
    at_one = {name: curve.attributes[name][-1] for name in tw.IDENTITY_ATTRIBUTES}
    assert at_one["shape"] >= 0.7 and at_one["pattern"] >= 0.7 and at_one["colour"] >= 0.6, curve.rows()
    assert curve.attributes["pattern"][0] <= 0.5, curve.rows()  # at gamma = 0 the prompt, which names none, decides
    assert set(curve.rows()[0]) == {"gamma", "identity", "prompt", *tw.IDENTITY_ATTRIBUTES}


@needs_weights
def test_issue_targets_identity_at_one_and_the_prompt_at_zero(curve):
    assert curve.identity[-1] >= 0.8 and curve.prompt[0] >= 0.8, curve.rows()


@needs_weights
@pytest.mark.xfail(strict=True, reason="issue 4's smoothness target not reached: the largest steps are about 3 x the "
                   "mean step (target 2; identity and the prompt do not compete in this world, so identity comes in on "
                   "the lower half of the slider and the prompt goes on the upper); XPASS once a build meets it")
def test_issue_target_a_smooth_trade_off(curve):
    assert slider.check_slider(curve) == [], curve.rows()


@needs_weights
def test_the_gate_decides_between_the_colour_asked_for_and_the_subjects():
    """A prompt asking to recolour the subject: the low end draws the colour asked for, the high end keeps the rest
    of the identity (16 cases x 3 seeds, `curve --prompts recolour`: colour kept 0.12 at gamma 0, shape and pattern
    0.19 and 0.29 at gamma 0, 1.00 and 0.98 at 1)."""
    measured = _recolour_ends()
    assert measured.attributes["colour"][0] <= 0.1 and measured.prompt[0] >= 0.9, measured.rows()
    assert measured.attributes["shape"][1] >= 0.7 and measured.attributes["pattern"][1] >= 0.7, measured.rows()


@needs_weights
@pytest.mark.xfail(strict=True, reason="the shipped build keeps the subject's colour against a colour word at gamma 1 "
                   "in 0.31 of images (the build before it: 0.88): the adapters' push, added to the text's and "
                   "amplified less by guidance, does not outweigh its colour words (docs/mini_findings.md); XPASS "
                   "once a build holds it again")
def test_the_high_end_keeps_the_subjects_colour_against_a_colour_word():
    assert _recolour_ends().attributes["colour"][1] >= 0.5


@functools.cache
def _recolour_ends():
    from toyworld.mini.curve import load_mini

    return slider.measure(load_mini(), world.sample_cases(CASES, seed=1, split="heldout", recolour=True),
                          seeds=SEEDS, gammas=(0.0, 1.0))


@needs_weights
def test_profile_generates_at_native_size():
    from toyworld.mini.curve import load_mini

    pipe = load_mini()
    case = world.sample_cases(1, seed=2)[0]
    out = pipe(case.prompt, pipe.encode_subject([case.reference_image()]), gate=0.5, seed=0)
    assert out.images[0].size == (world.NATIVE_SIZE, world.NATIVE_SIZE)
    assert np.asarray(out.images[0]).std() > 5  # a picture, not a flat field


@needs_weights
def test_a_scratch_profile_brings_its_own_gate_curve(tmp_path):
    """`curve --profile` measures weights built elsewhere with the gate curve calibrated for them."""
    from toyworld.mini.curve import load_mini

    scratch = tmp_path / "scratch.json"
    scratch.write_text(json.dumps({**json.loads(PROFILE_PATH.read_text()), "gate_curve": None}))
    assert load_mini().profile.gate_curve.weights(0.5) != (0.5, 0.5)  # the shipped, calibrated curve
    assert load_mini(profile=scratch).profile.gate_curve.weights(0.5) == (0.5, 0.5)  # the linear one


@needs_weights
def test_mini_scores_identity_with_the_oracle_and_other_profiles_with_clip(tmp_path):
    """The studio shows mini's identity score as the oracle's share of the reference's attributes (a CLIP cosine
    from its random 8 px encoder would say nothing); without the reference photos it stays the CLIP cosine."""
    from flexip_core.loading.profiles import load_profile, load_world
    from toyworld.mini.curve import load_mini

    pipe = load_mini()
    assert pipe.profile.world == "toyworld.plugin" and pipe.identity_metric == "toyworld"
    case = world.sample_cases(1, seed=4)[0]
    reference = case.reference_image()
    other = tw.Subject(*(next(v for v in values if v != getattr(case.subject, name))
                         for name, values in tw.IDENTITY_ATTRIBUTES.items()))
    images = [tw.render(case.subject, case.target, 64), tw.render(other, case.target, 64)]
    assert pipe.identity_score(images, pipe.encode_subject([reference]), [reference]) == [1.0, 0.0]
    cosines = pipe.identity_score(images, pipe.encode_subject([reference]))
    assert all(-1.0 <= c <= 1.0 for c in cosines) and cosines[0] not in (0.0, 1.0)
    assert load_profile("tiny").world is None
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "bad", "base": "x", "clip_encoder": "x", "identity_metric": "dino"}))
    with pytest.raises(ValueError, match="unknown identity_metric"):  # a world names its metric now
        load_profile(str(bad))
    with pytest.raises(ValueError, match="world 'no_such_world' cannot be imported"):
        load_world("no_such_world")
    with pytest.raises(ValueError, match="world 'json' lacks IDENTITY_METRIC, identity_scores"):
        load_world("json")


def test_calibrated_curve_inverts_a_measured_trade_off():
    gammas = slider.GAMMAS
    g = np.array(gammas)
    identity = 0.4 + 0.5 * (g > 0.45) + 0.05 * g  # an abrupt switch near 0.5 under the linear gate
    prompt = 0.9 - 0.5 * (g > 0.45)
    measured = slider.Curve(gammas, identity, prompt, identity[None], prompt[None])
    curve = slider.calibrated_curve(measured)
    w_pres = [curve.weights(x)[0] for x in gammas]
    assert w_pres[0] == 0.0 and w_pres[-1] == 1.0 and np.all(np.diff(w_pres) >= 0)
    assert 0.4 <= curve.weights(0.5)[0] <= 0.5  # half the trade-off is reached around the switch


def test_calibrated_curve_keeps_both_scores_steps_within_twice_their_mean_when_they_overlap():
    """Identity comes in mostly (85%) under a little preservation and the rest while the prompt goes: the
    calibration spreads the slider so that neither score's largest step dominates (equal shares of the summed
    progress would give identity steps of exactly 2x its mean here)."""
    g = np.linspace(0.0, 1.0, 101)
    identity = 0.2 + np.where(g < 0.3, 0.85 * g / 0.3, 0.85 + 0.15 * (g - 0.3) / 0.7) * 0.6
    prompt = 1.0 - 0.7 * np.clip((g - 0.3) / 0.7, 0.0, 1.0)
    measured = slider.Curve(tuple(g), identity, prompt, identity[None], prompt[None])
    w_pres = [slider.calibrated_curve(measured).weights(x)[0] for x in slider.GAMMAS]
    ratios = [slider.jump_ratio(np.interp(w_pres, g, scores)) for scores in (identity, prompt)]
    assert max(ratios) < 1.9, ratios


@pytest.mark.slow
def test_quick_build_runs_every_stage_and_loads_as_a_profile(tmp_path, monkeypatch, caplog):
    """The build end to end (VAE, base, adapters through flexip_core.training.train, calibration) at smoke size: what it
    writes loads through the same profile code the app uses and renders at the native size. A run killed after
    the base resumes there; a resume can start from the weights of a built folder instead."""
    from flexip_core.generation.pipeline import FlexIPPipeline
    from toyworld.mini import build, encoders

    def killed(*args, **kwargs):
        raise RuntimeError("killed during the encoders stage")

    monkeypatch.setattr(encoders, "pretrain_dino", killed)
    with pytest.raises(RuntimeError, match="killed"):
        build.build("quick", out=tmp_path / "mini", work=tmp_path / "work", write_profile=False)
    monkeypatch.undo()
    times = build.build("quick", out=tmp_path / "mini", work=tmp_path / "work", write_profile=False,
                        from_stage="encoders")
    assert {"vae", "base", "encoders", "adapters", "calibration"} <= set(times)
    profile = tmp_path / "mini.json"
    profile.write_text(json.dumps(build.profile_dict(str(tmp_path / "mini"))))
    pipe = FlexIPPipeline.from_profile(str(profile), device="cpu")
    case = world.sample_cases(1, seed=3)[0]
    out = pipe(case.prompt, pipe.encode_subject([case.reference_image()]), gate=[0.0, 1.0], seed=0,
               num_inference_steps=2)
    assert [im.size for im in out.images] == [(world.NATIVE_SIZE, world.NATIVE_SIZE)] * 2
    record = json.loads((tmp_path / "mini" / "build.json").read_text())
    assert record["adapters"]["steps"] == 10 and 0 <= record["vae_reconstruction"]["identity"] <= 1
    assert set(record["dino_readout"]) == set(tw.IDENTITY_ATTRIBUTES) | set(tw.EDITABLE_ATTRIBUTES)
    # resuming at the calibration reuses the staged weights and still reports every stage's seconds
    again = build.build("quick", out=tmp_path / "mini2", work=tmp_path / "work", write_profile=False,
                        from_stage="calibration")
    kept = ("vae", "base", "encoders", "adapters")
    assert {k: again[k] for k in kept} == {k: times[k] for k in kept}
    resumed = json.loads((tmp_path / "mini2" / "build.json").read_text())
    assert resumed["vae_reconstruction"] == record["vae_reconstruction"]
    assert resumed["dino_readout"] == record["dino_readout"]
    with pytest.raises(SystemExit, match="needs base, dino, image_encoder, stages.json .* run the whole build first"):
        build.build("quick", out=tmp_path / "mini3", work=tmp_path / "empty", from_stage="adapters")
    # a resume whose staged weights are not those it replaces says so; --reuse starts from a built folder instead
    config = tmp_path / "mini2" / "image_encoder" / "config.json"
    config.write_text(config.read_text() + "\n")
    caplog.set_level(logging.WARNING, logger="toyworld.mini.build")
    build.build("quick", out=tmp_path / "mini2", work=tmp_path / "work", write_profile=False,
                from_stage="calibration")
    assert "the staged image_encoder differ from those in" in caplog.text
    caplog.clear()
    config.write_text(config.read_text() + "\n")  # the resume above put the staged file back
    build.build("quick", out=tmp_path / "mini2", work=tmp_path / "fresh", write_profile=False,
                from_stage="calibration", reuse=tmp_path / "mini2")
    assert "differ" not in caplog.text
    assert config.read_text().endswith("\n\n")  # the folder's own weights, not the work folder's staging
    assert json.loads((tmp_path / "mini2" / "build.json").read_text())["seconds"]["base"] == round(times["base"], 1)
    with pytest.raises(SystemExit, match="lacks build.json"):
        build.build("quick", out=tmp_path / "mini3", work=tmp_path / "fresh", from_stage="calibration",
                    reuse=tmp_path / "work" / "staging")


def _pooled_probe_accuracy(dino) -> dict[str, float]:
    """Accuracy of a ridge read-out of mean-pooled DINOv2 patch tokens, fitted on training subjects and scored on
    held-out subjects in held-out scenes (what the preservation branch's attention pooling can start from)."""
    import torch

    from toyworld.mini import encoders

    def pooled(items):
        with torch.no_grad():
            return dino(encoders.dino_pixels(items)).last_hidden_state[:, 1:].mean(1).double().numpy()  # (N, D)

    train, held = encoders.sample_items(1200, 5, "train"), encoders.sample_items(300, 6, "heldout")
    x, x_held = pooled(train), pooled(held)
    mean, std = x.mean(0), x.std(0) + 1e-6
    x, x_held = (x - mean) / std, (x_held - mean) / std
    labels, labels_held = encoders.attribute_labels(train).numpy(), encoders.attribute_labels(held).numpy()
    scores = {}
    for k, name in enumerate(tw.IDENTITY_ATTRIBUTES):
        onehot = np.eye(labels[:, k].max() + 1)[labels[:, k]]
        weights = np.linalg.solve(x.T @ x + 10 * np.eye(x.shape[1]), x.T @ onehot)
        scores[name] = float(np.mean(np.argmax(x_held @ weights, 1) == labels_held[:, k]))
    return scores


@needs_weights
def test_build_refuses_before_training_to_delete_folders_that_are_not_an_earlier_builds(tmp_path):
    from toyworld.mini import build

    mine = tmp_path / "my-models"
    (mine / "notes").mkdir(parents=True)
    (mine / "notes" / "keep.txt").write_text("mine")
    for kwargs, flag in ((dict(out=mine, work=tmp_path / "work"), "--out"),
                         (dict(out=tmp_path / "new", work=mine), "--work")):
        with pytest.raises(SystemExit, match=f"{flag} .*my-models holds files that are not from an earlier build"):
            build.build("quick", write_profile=False, **kwargs)
    with pytest.raises(SystemExit, match="is a file; give a folder"):
        build.build("quick", out=mine / "notes" / "keep.txt", work=tmp_path / "work", write_profile=False)
    assert (mine / "notes" / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "work").exists() and not (tmp_path / "new").exists()  # nothing started
    (mine / "build.json").write_text("{}")  # an earlier build's folder may be replaced (checked, not built here)
    build.check_replaceable(mine, build.OUT_MARKERS, "--out")


def test_shipped_dino_is_pretrained_to_tell_held_out_subjects_apart():
    """A random ViT's pooled tokens give colour and the pattern (one motif per 4 px patch) but not the shape; the
    shipped mini DINOv2 gives every identity attribute of subjects it never saw."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    from toyworld.mini import models

    shipped = _pooled_probe_accuracy(Dinov2Model.from_pretrained(ASSETS / "dino").eval())
    assert min(shipped.values()) >= 0.9, shipped
    torch.manual_seed(0)
    random = _pooled_probe_accuracy(Dinov2Model(Dinov2Config(**models.DINO)).eval())
    assert random["shape"] < 0.7, random  # measured 0.13 (pattern 0.89, colour 0.96)


def test_pattern_code_marks_the_patterns_channel_on_the_bodys_cells_only():
    import torch

    from toyworld.mini import base

    items = [(tw.Subject("square", "red", "dots"), tw.Scene("white", "large", "left", "upright", "flat")),
             (tw.Subject("circle", "blue", "plain"), tw.Scene("sky", "small", "right", "squashed", "outlined"))]
    code = base.pattern_code(base.body_masks(items), base.pattern_index(items), 2.0)
    assert code.shape == (2, len(tw.PATTERNS), 8, 8)
    for row, (subject, _) in zip(code, items):
        k = tw.PATTERNS.index(subject.pattern)
        assert torch.all(torch.cat([row[:k], row[k + 1:]]) == 0) and row[k].max() == 2.0  # a whole cell of body
        assert 0 < row[k].sum() < 2.0 * 64 and row[k, 0, 0] == 0  # the body's cells only (not the corner)
    dots, plain = tw.PATTERNS.index("dots"), tw.PATTERNS.index("plain")
    assert code[0, dots, :, :4].sum() > code[0, dots, :, 4:].sum()  # on the left
    assert code[1, plain, :, 4:].sum() > code[1, plain, :, :4].sum()  # on the right
    swapped = base.swapped_items(items * 20, seed=0)
    assert all(o.pattern != s.pattern and (o.shape, o.colour, os) == (s.shape, s.colour, ss)
               for (s, ss), (o, os) in zip(items * 20, swapped))
    assert {o.pattern for o, _ in swapped[::2]} == set(tw.PATTERNS) - {"dots"}  # every other pattern in turn


@needs_weights
def test_shipped_vae_draws_the_pattern_its_code_names():
    """The shipped VAE's last latent channels hold the pattern: its encoder writes the code of the pattern it sees,
    and its decoder draws whichever pattern the code names on any render's latent (what lets the base model draw a
    held-out subject's pattern by placing that code, as it places a colour)."""
    import torch
    from diffusers import AutoencoderKL

    from toyworld.mini import base
    from toyworld.oracle import read_attributes

    amplitude = json.loads((ASSETS / "build.json").read_text())["base"]["pattern_code"]
    vae = AutoencoderKL.from_pretrained(ASSETS / "base", subfolder="vae", torch_dtype=torch.float32)
    rng = np.random.default_rng(4)
    items = [(s, tw.sample_scene(rng)) for s in tw.sample_subjects(16, 4, "heldout")]
    masks, n = base.body_masks(items), len(tw.PATTERNS)
    with torch.no_grad():
        latents = vae.encode(base.renders(items)).latent_dist.mean
        assert torch.equal(latents[:, -n:].sum((2, 3)).argmax(1), base.pattern_index(items))
        read = {}
        for k, pattern in enumerate(tw.PATTERNS):
            z = torch.cat([latents[:, :-n], base.pattern_code(masks, torch.full((len(items),), k), amplitude)], 1)
            images = ((vae.decode(z).sample.permute(0, 2, 3, 1) + 1) * 127.5).clamp(0, 255).round().byte().numpy()
            read[pattern] = np.mean([read_attributes(Image.fromarray(im))["pattern"] == pattern for im in images])
    assert min(read.values()) >= 0.75 and np.mean(list(read.values())) >= 0.9, read


def test_base_captions_name_the_subject_every_time_during_the_warm_up(monkeypatch, tmp_path):
    """The base binds pattern words only if its first steps see them in every caption (a base trained with the
    subject named half the time from the start ignores them: probe ratio 0.02); after the warm-up the subject is
    named with probability identity_p, so that captions without it ('a small toy ...') are learned as well."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from toyworld.mini import base, models

    asked, real = [], world.random_caption

    def recording(rng, subject, scene, keep_p, identity_p):
        asked.append(identity_p)
        return real(rng, subject, scene, keep_p, identity_p)

    monkeypatch.setattr(world, "random_caption", recording)
    tokenizer = models.save_mini_tokenizer(tmp_path)
    text_encoder = CLIPTextModel(CLIPTextConfig(**models.TEXT, vocab_size=len(tokenizer),
                                                bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(**models.UNET)
    items = [(s, world.scenes_in("train")[0]) for s in tw.sample_subjects(4, 0)]
    config = base.BaseConfig(base_steps=4, base_batch=3, identity_warmup=2, identity_p=0.3, drop_caption=0.0,
                             warmup=1)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    base.base_loop(config, unet, text_encoder, tokenizer, torch.randn(4, 32, 8, 8), items, base.Ema(params, 0.9))
    assert asked == [1.0] * 6 + [0.3] * 6


def test_mini_noise_schedule_is_zero_terminal_snr_v_prediction_in_every_usable_sampler():
    """The base trains on pure noise at t = T (no mean-colour leak); every sampler the app offers for it keeps that
    schedule and the v-prediction, and one that cannot (PNDM) is refused with the alternatives named."""
    from diffusers import DDPMScheduler

    from flexip_core.generation.schedulers import SCHEDULERS, make_scheduler
    from toyworld.mini import models

    assert float(DDPMScheduler.from_config(models.SCHEDULER).alphas_cumprod[-1]) == 0.0
    config = dict(models.SCHEDULER, _class_name="DDIMScheduler")
    for name in SCHEDULERS:
        if name == "pndm":
            with pytest.raises(ValueError, match="zero-terminal-SNR.*choose one of dpmpp_2m"):
                make_scheduler(name, config)
            continue
        sched = make_scheduler(name, config)
        assert sched.config.prediction_type == "v_prediction" and sched.config.rescale_betas_zero_snr, name
        sched.set_timesteps(10)
        assert int(sched.timesteps[0]) == 999, name  # trailing spacing: sampling starts at the pure-noise step


def test_default_profile_is_mini_only_with_its_weights(monkeypatch, tmp_path):
    """No CUDA: the app starts on `mini` when assets/mini holds its weights, else on `tiny` (never a profile whose
    files are missing)."""
    import torch

    from flexip_core.loading import profiles

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert profiles.default_profile() == ("mini" if HAVE_WEIGHTS else "tiny")
    folder = tmp_path / "profiles"
    folder.mkdir()
    (folder / "tiny.json").write_text((profiles.PROFILE_DIR / "tiny.json").read_text())
    (folder / "mini.json").write_text(json.dumps({"name": "mini", "description": "weights gone", "base": "x",
                                                  "clip_encoder": "x",
                                                  "adapter": str(tmp_path / "missing.safetensors")}))
    monkeypatch.setattr(profiles, "PROFILE_DIR", folder)
    assert profiles.default_profile() == "tiny"


@needs_weights
def test_probe_measures_how_much_the_base_listens_to_each_identity_word():
    """The shipped base follows colour and pattern words almost fully (its predictions differ by 0.90 and 0.95 of what
    the renders do; a base trained without the identity warm-up: pattern 0.02-0.08); with the pattern words'
    embeddings made equal the probe finds that it no longer listens."""
    import torch

    from toyworld.mini import probe

    pipe = probe.load()
    found = {name: probe.word_spread(pipe, name) for name in tw.IDENTITY_ATTRIBUTES}
    assert found["colour"]["model"] >= 0.8 * found["colour"]["renders"], found  # measured 0.163 vs 0.181
    assert found["pattern"]["model"] >= 0.8 * found["pattern"]["renders"], found  # measured 0.183 vs 0.194
    embedding = pipe.text_encoder.get_input_embeddings().weight
    words = [pipe.tokenizer.convert_tokens_to_ids(w + "</w>") for w in tw._PATTERN_WORDS.values()]
    with torch.no_grad():
        embedding[words] = embedding[words].mean(0)
    assert probe.word_spread(pipe, "pattern")["model"] < 0.01
    assert probe.word_spread(pipe, "pattern")["renders"] == found["pattern"]["renders"]


@needs_weights
def test_probe_finds_the_base_draws_the_shape_and_colour_a_caption_names():
    """With both branches off, the shipped base draws the shape, colour and pattern its caption names, for held-out
    subjects too (each 1.00 on 16 x 2): it composes combinations it never saw; once the colour words' embeddings are
    made equal, the colour is left to chance."""
    import torch

    from toyworld.mini import probe
    from toyworld.mini.curve import load_mini

    pipe = load_mini()
    found = probe.drawn_from_caption(pipe, "heldout", n=8, seeds=(0,))
    assert min(found.values()) >= 0.75, found  # measured 1.00 for each here
    embedding = pipe.text_encoder.get_input_embeddings().weight
    words = [pipe.tokenizer.convert_tokens_to_ids(w + "</w>") for w in tw.COLOURS]
    with torch.no_grad():
        embedding[words] = embedding[words].mean(0)
    assert probe.drawn_from_caption(pipe, "heldout", n=8, seeds=(0,))["colour"] <= 0.5  # measured 0.25


def test_a_point_is_dominated_when_another_is_as_good_in_both_scores_and_better_in_one():
    scores = [(0.8, 0.9), (0.7, 0.9), (0.9, 0.5), (0.8, 0.9), (0.6, 0.95)]
    assert gate_map.dominated_points(scores) == [False, True, False, False, False]


@needs_weights
def test_gate_map_with_the_shipped_weights_follows_the_preservation_weight():
    """Each grid row is generated with its own branch weights: preservation brings identity in and the prompt out
    (as along the slider), and the (1, 0) row is the slider's gamma = 1 (calibrated curves end at w_pres = 1)."""
    from toyworld.mini.curve import load_mini

    pipe = load_mini()
    cases = world.sample_cases(6, seed=100, split="train")
    rows = gate_map.measure_grid(pipe, cases, seeds=(0,), pres=(0.0, 1.0), pers=(0.0, 1.0))
    assert [(r["pres"], r["pers"]) for r in rows] == [(0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0)]
    identity, prompt, colour = (np.array([r[k] for r in rows]).reshape(2, 2).mean(1)  # (w_pres 0, w_pres 1)
                                for k in ("identity", "prompt", "colour"))
    # measured: identity 0.42 -> 0.69, prompt 1.00 -> 0.40, colour 0.33 -> 1.00
    assert identity[1] - identity[0] >= 0.2 and prompt[0] - prompt[1] >= 0.3 and colour[1] >= 0.9, rows
    end = slider.measure(pipe, cases, seeds=(0,), gammas=(1.0,)).rows()[0]
    assert (end["identity"], end["prompt"]) == (rows[2]["identity"], rows[2]["prompt"]), (end, rows)
    assert all(isinstance(r["dominated"], bool) for r in rows)


def test_gate_map_passes_each_weight_pair_and_the_schedule_to_the_pipeline():
    """Without weights: a stand-in pipeline that draws the reference records what each call asked for."""
    case = world.sample_cases(1, seed=100, split="train")[0]
    calls = []

    class RecordingPipe:
        def encode_subject(self, images):
            return "subject"

        def __call__(self, prompt, subject, gate, seed, branch_weights, gate_schedule, **defaults):
            calls.append(dict(prompt=prompt, branch_weights=branch_weights, gate_schedule=gate_schedule))
            return SimpleNamespace(images=[case.reference_image()] * len(gate))

    rows = gate_map.measure_grid(RecordingPipe(), [case], seeds=(0,), pres=(0.0, 0.3, 1.0), pers=(0.0, 1.0),
                                 gate_schedule=0.5)
    sent = [w for call in calls for w in call["branch_weights"]]
    assert sent == [(0.0, 0.0), (0.0, 1.0), (0.3, 0.0), (0.3, 1.0), (1.0, 0.0), (1.0, 1.0)]
    assert all(c["gate_schedule"] == 0.5 and c["prompt"] == case.prompt for c in calls)
    assert [(r["pres"], r["pers"]) for r in rows] == sent
    assert all(r["identity"] == 1.0 for r in rows)  # the reference itself carries every identity attribute


@pytest.mark.parametrize("command, argv, message", [
    (gate_map, ["--pres", "3"], "branch weights must lie in \\[0, 2\\]"),
    (gate_map, ["--pers", "a,b"], "expected comma-separated numbers"),
    (gate_map, ["--seeds", "0,1.5"], "expected comma-separated whole numbers"),
    (gate_map, ["--seeds", ","], "give at least one value"),
    (gate_map, ["--cases", "0"], "argument --cases: must be at least 1, got 0"),
    (curve_command, ["--threads", "two"], "argument --threads: expected a whole number"),
    (curve_command, ["--seeds", "0,x"], "expected comma-separated numbers"),
    (curve_command, ["--out", "results.txt"], "the file written is .png; give a name ending in .png"),
    (curve_command, ["--prompts", "style"], "argument --prompts: invalid choice: 'style'"),
    (curve_command, ["--device", "tpu"], "device 'tpu' unknown; use cuda, cuda:N, mps or cpu"),
    (curve_command, ["--dtype", "double"], "argument --dtype: invalid choice: 'double'"),
    (curve_command, ["--profile", "nowhere.json"], "no profile at nowhere.json"),
])
def test_slider_commands_refuse_bad_arguments_before_loading_anything(command, argv, message, capsys):
    import torch

    threads = torch.get_num_threads()
    with pytest.raises(SystemExit) as stop:
        command.main(argv)
    assert stop.value.code == 2 and re.search(message, capsys.readouterr().err)
    assert torch.get_num_threads() == threads  # nothing changed either (the process's other runs keep their threads)
