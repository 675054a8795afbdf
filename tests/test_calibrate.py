"""The slider calibrator: the shared inversion on measured trade-offs, and `python -m flexip_core.calibrate` end to end
on the tiny random models (DreamBench photos, tiny CLIP and DINO metric models) and on FlexIP-mini (the oracle)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flexip_core.calibrate import main
from flexip_core.evaluation.calibration import Measurement, WeightPath, calibrate, check_grid, grid, jump_ratio
from flexip_core.loading.profiles import load_profile
from tests.test_metrics_evaluate import metric_folders  # noqa: F401  (the tiny CLIP and DINO metric models)

REPO = Path(__file__).resolve().parent.parent
MINI_BUILD = REPO / "assets" / "mini" / "build.json"


def measured(x, identity, prompt, samples: int = 1, noise: float = 0.0, seed: int = 0) -> Measurement:
    """A Measurement on the linear path with the given mean curves (plus Gaussian noise per sample)."""
    rng = np.random.default_rng(seed)
    spread = lambda values: np.asarray(values, float)[None] + noise * rng.standard_normal((samples, len(x)))
    return Measurement(tuple(float(v) for v in x), WeightPath(), {"clip_i": spread(identity)},
                       {"clip_t": spread(prompt)})


def test_equal_gate_steps_move_the_trade_off_equally_between_the_saturated_ends():
    """Identity comes in between t = 0.1 and 0.5 and the prompt goes between 0.5 and 0.9, nothing moves outside:
    γ = 0 and 1 sit where the scores saturate, and each score takes half the slider in even steps: 2x its mean step,
    the best two disjoint scores allow (the linear path gives 2.5x)."""
    x = np.array(grid(41))
    identity = 0.3 + 0.5 * np.clip((x - 0.1) / 0.4, 0, 1)
    prompt = 0.9 - 0.4 * np.clip((x - 0.5) / 0.4, 0, 1)
    result = calibrate(measured(x, identity, prompt))
    curve = result.curve
    assert 0.08 <= result.low <= 0.1 and 0.9 <= result.high <= 0.92
    assert curve.gammas[0] == 0.0 and curve.gammas[-1] == 1.0
    assert np.all(np.diff(curve.pres) > 0) and np.all(np.diff(curve.pers) < 0)
    assert abs(curve.weights(0.5)[0] - 0.5) < 0.02  # half the trade-off at the switch between the two
    assert jump_ratio(np.interp(np.linspace(0, 1, 11), x, identity)) > 2.4  # the linear gate
    assert result.predicted["clip_i"] < 2.05 and result.predicted["clip_t"] < 2.05, result.predicted
    assert result.moved == {"clip_i": True, "clip_t": True}


def test_saturation_zero_keeps_the_path_ends_and_points_resample_evenly():
    x = np.linspace(0, 1, 21)
    result = calibrate(measured(x, x ** 2, 1 - x ** 2), saturation=0.0, points=11)
    assert result.curve.weights(0.0) == (0.0, 1.0) and result.curve.weights(1.0) == (1.0, 0.0)
    assert result.curve.gammas == tuple(round(float(g), 6) for g in np.linspace(0, 1, 11))
    assert result.curve.weights(0.5)[0] > 0.6  # scores move slowly at first: the slider spends less there


def test_scores_within_their_noise_leave_the_path_as_it_is():
    """Random weights (tiny): the scores move by no more than their noise, so nothing is calibrated."""
    x = np.linspace(0, 1, 9)
    result = calibrate(measured(x, np.full(9, 0.5), np.full(9, 0.2), samples=8, noise=0.05))
    assert result.moved == {"clip_i": False, "clip_t": False}
    assert (result.curve.gammas, result.curve.pres, result.curve.pers) == ((0.0, 1.0), (0.0, 1.0), (1.0, 0.0))


def test_a_score_that_moves_alone_decides_the_curve():
    x = np.linspace(0, 1, 21)
    result = calibrate(measured(x, np.sqrt(x), np.full(21, 0.2)), saturation=0.0)
    assert result.moved == {"clip_i": True, "clip_t": False}
    assert result.predicted["clip_i"] < 1.3


def test_grid_is_denser_at_the_ends_and_covers_them():
    positions = grid(25)
    assert positions[0] == 0.0 and positions[-1] == 1.0 and len(positions) == 25
    assert positions[1] - positions[0] < positions[13] - positions[12]
    assert check_grid([0.5, 0.2, 0.5]) == (0.0, 0.2, 0.5, 1.0)
    with pytest.raises(ValueError, match="at least 3"):
        grid(2)


@pytest.mark.skipif(not MINI_BUILD.is_file(), reason="assets/mini is absent")
def test_the_mini_build_inverts_with_the_shared_calibration():
    """FlexIP-mini's build calls the shared inversion: from the shipped build's linear-gate measurement it gives
    the shipped curve."""
    from toyworld.mini import slider

    rows = json.loads(MINI_BUILD.read_text())["calibration_linear_gate"]
    identity, prompt = (np.array([r[k] for r in rows]) for k in ("identity", "prompt"))
    curve = slider.calibrated_curve(slider.Curve(tuple(r["gamma"] for r in rows), identity, prompt, identity[None],
                                                 prompt[None]))
    shipped = load_profile("mini").gate_curve
    assert np.allclose(curve.gammas, shipped.gammas) and np.allclose(curve.pres, shipped.pres, atol=1e-4)


def test_the_toy_world_scores_prompts_with_its_oracle():
    from toyworld import plugin
    from toyworld import world as tw
    from toyworld.mini import world

    case = world.sample_cases(1, seed=5)[0]
    asked, other = tw.render(case.subject, case.target, 64), tw.render(case.subject, case.reference, 64)
    assert plugin.prompt_scores([asked, other], [case.prompt] * 2)[0] == 1.0
    assert plugin.prompt_scores([other], [case.prompt])[0] < 0.5  # the reference differs in every scene attribute
    assert plugin.prompt_scores([asked], ["a toy"]) == [None]  # asks for nothing the oracle reads


def test_calibrate_writes_a_profile_that_loads_and_records_the_measurement(dreambench, metric_folders,  # noqa: F811
                                                                           tmp_path, monkeypatch):
    clip, dino = metric_folders
    out = tmp_path / "tiny-calibrated.json"
    monkeypatch.chdir(tmp_path)  # the written copy loads from any folder
    code = main(["--profile", "tiny", "--subjects", str(dreambench), "--subject", "dog", "--subject", "backpack",
                 "--prompts-per-subject", "1", "--gates", "5", "--seeds", "0", "--steps", "2",
                 "--clip-metric", str(clip), "--dino-metric", str(dino), "--out", out.name])
    assert code == 0
    raw = json.loads(out.read_text())
    assert raw["name"] == "tiny-calibrated" and raw["base"] == "{build}/base"  # placeholders kept
    profile = load_profile(out.name)
    record = profile.calibration
    assert record["subjects"] == ["backpack", "dog"] and record["seeds"] == [0] and record["samples"] == 2
    assert record["prompts"] == ["a backpack in the jungle", "a dog in the snow"]  # subject i starts at prompt i
    assert record["scores"]["identity"] == ["clip_i", "dino_i"] and record["scores"]["clip_metric"] == str(clip)
    assert record["generation"]["num_inference_steps"] == 2 and record["command"].startswith("python -m flexip_core")
    assert [row["position"] for row in record["measured"]] == list(grid(5))
    assert all(-1 <= row[m] <= 1 for row in record["measured"] for m in ("clip_i", "dino_i", "clip_t"))
    curve = profile.gate_curve
    assert curve.gammas[0] == 0.0 and curve.gammas[-1] == 1.0 and np.all(np.diff(curve.gammas) > 0)
    assert np.all(np.diff(curve.pres) >= 0) and np.all(np.diff(curve.pers) <= 0)

    from flexip_core import FlexIPPipeline
    from flexip_core.generation.images import load_reference_image

    pipe = FlexIPPipeline.from_profile(out.name)
    photo = load_reference_image(dreambench / "dog" / "00.jpg")
    made = pipe("a dog", pipe.encode_subject([photo]), gate=[0.0, 1.0], num_inference_steps=1)
    assert [(p["w_pres"], p["w_pers"]) for p in made.parameters] == [curve.weights(0.0), curve.weights(1.0)]


def test_calibrate_refuses_bad_arguments_before_loading_a_model(dreambench, tmp_path, capsys, monkeypatch):
    from flexip_core.generation import pipeline

    def never(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(pipeline.FlexIPPipeline, "from_profile", never)
    common = ["--profile", "tiny", "--subjects", str(dreambench), "--out", str(tmp_path / "x.json")]
    assert main(common + ["--subject", "unicorn"]) == 2
    assert "unicorn" in capsys.readouterr().err
    assert main(common + ["--saturation", "0.7"]) == 2
    assert "--saturation" in capsys.readouterr().err
    for bad, message in ((["--gates", "0,1.5"], "must lie in [0, 1]"), (["--gates", "2"], "at least 3"),
                         (["--out", str(tmp_path / "x.txt")], "give a name ending in .json")):
        with pytest.raises(SystemExit) as stop:  # argparse refuses it
            main([*common, *bad])
        assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


@pytest.mark.skipif(not MINI_BUILD.is_file(), reason="assets/mini is absent")
def test_calibrate_on_mini_measures_with_the_toy_world_oracle(tmp_path):
    """On mini the scores are the world's (CLIP-T from its random 8 px CLIP would mean nothing): identity rises and
    the prompt score falls along the path, and the written profile keeps the world."""
    from toyworld.mini import slider, world

    subjects, prompts = slider.write_cases(world.sample_cases(2, 100, split="train"), tmp_path / "cases")
    out = tmp_path / "mini-calibrated.json"
    assert main(["--profile", "mini", "--subjects", str(subjects), "--prompts", str(prompts),
                 "--prompts-per-subject", "1", "--gates", "0,0.5,1", "--seeds", "0", "--out", str(out)]) == 0
    profile = load_profile(str(out))
    assert profile.world == "toyworld.plugin" and profile.adapter == load_profile("mini").adapter
    rows = profile.calibration["measured"]
    assert profile.calibration["scores"] == {"identity": ["toyworld"], "prompt": ["toyworld_prompt"]}
    assert rows[-1]["toyworld"] > rows[0]["toyworld"] and rows[-1]["toyworld_prompt"] < rows[0]["toyworld_prompt"]
    assert profile.calibration["prompts"] == prompts.read_text().splitlines()


def test_the_path_runs_between_the_profiles_own_ends_and_a_recalibration_keeps_the_measured_range(tmp_path):
    """sd15's hand-set curve passes the photo at 0.6 through the prompt branch at γ = 0: its path keeps those ends.
    A calibrated copy's curve was cut at saturation, so calibrating it again measures the path it recorded."""
    from dataclasses import replace

    from flexip_core.calibrate import measured_path
    from flexip_core.generation.gate import GateCurve

    assert measured_path(load_profile("tiny")) == WeightPath((0.0, 1.0), (1.0, 0.0))
    assert measured_path(load_profile("sd15")) == WeightPath((0.0, 0.6), (0.75, 0.0))
    calibrated = replace(load_profile("tiny"), gate_curve=GateCurve((0.0, 1.0), (0.1, 0.9), (0.9, 0.1)),
                         calibration={"path": {"start": [0.0, 1.0], "end": [1.0, 0.0]}})
    assert measured_path(calibrated) == WeightPath((0.0, 1.0), (1.0, 0.0))
    assert measured_path(calibrated, (0.0, 0.5), (0.5, 0.0)) == WeightPath((0.0, 0.5), (0.5, 0.0))
    with pytest.raises(ValueError, match="same branch weights"):
        measured_path(calibrated, (0.5, 0.5), (0.5, 0.5))
