"""Gate curves and schedules; the PNG `parameters` chunk; the generate command."""
from __future__ import annotations

import logging
import subprocess
import sys

import pytest
from PIL import Image

from flexip_core.generation.gate import GateCurve, GateSchedule, as_schedule
from flexip_core.generation.metadata import format_parameters, parse_parameters
from tests.conftest import REPO


def test_default_curve_is_the_spec_formula():
    curve = GateCurve()
    assert curve.weights(0.7, 1.0) == pytest.approx((0.7, 0.3))
    assert curve.weights(0.25, 0.8) == pytest.approx((0.2, 0.6))
    assert curve.weights(1.0, 0.0) == (0.0, 0.0)


def test_calibrated_curve_interpolates():
    curve = GateCurve.from_dict({"gammas": [0, 0.5, 1], "pres": [0, 0.2, 1], "pers": [1, 0.6, 0]})
    assert curve.weights(0.25) == pytest.approx((0.1, 0.8))
    with pytest.raises(ValueError, match="increase from 0 to 1"):
        GateCurve((0.0, 0.5), (0, 1), (1, 0))


def test_schedule_turns_identity_off_late():
    schedule = as_schedule(0.5)
    assert [schedule.factors(i, 4) for i in range(4)] == [(1.0, 1.0), (1.0, 1.0), (0.0, 1.0), (0.0, 1.0)]
    assert GateSchedule(pers_from=0.5).factors(0, 4) == (1.0, 0.0)


def test_parameters_round_trip():
    params = dict(prompt="a dog, on the beach", negative_prompt="blurry", num_inference_steps=20,
                  scheduler="dpmpp_2m", guidance_scale=7.5, seed=42, width=512, height=384, gate=0.25,
                  strength=1.0, profile="tiny")
    text = format_parameters(params)
    assert text.splitlines()[0] == "a dog, on the beach"
    assert "Steps: 20" in text and "Size: 512x384" in text and "FlexIP gate: 0.25" in text
    back = parse_parameters(text)
    assert {k: back[k] for k in params} == params


def test_generate_command_writes_pngs_with_parameters(tmp_path, dreambench):
    out = tmp_path / "out.png"
    result = subprocess.run(
        [sys.executable, "-m", "flexip_core", "generate", "--profile", "tiny",
         "--image", str(dreambench / "dog" / "00.jpg"),
         "--image", str(dreambench / "dog" / "01.jpg"), "--prompt", "a dog in snow", "--gate", "0.3,0.7", "--gate", "1",
         "--seed", "3", "--steps", "2", "--size", "64", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(tmp_path / f"out_{i:02d}.png") for i in range(3)]
    for i, gate in enumerate((0.3, 0.7, 1.0)):
        image = Image.open(tmp_path / f"out_{i:02d}.png")
        params = parse_parameters(image.text["parameters"])
        assert params["gate"] == gate and params["seed"] == 3 and params["prompt"] == "a dog in snow"
        assert params["num_inference_steps"] == 2 and (params["width"], params["height"]) == (64, 64)
        assert params["profile"] == "tiny"


def test_generate_command_reports_bad_input(tmp_path, dreambench):
    result = subprocess.run(
        [sys.executable, "-m", "flexip_core", "generate", "--profile", "tiny", "--image", str(tmp_path / "nope.jpg"),
         "--prompt", "x", "--out", str(tmp_path / "o.png")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "file not found" in result.stderr


def test_generate_command_refuses_outputs_it_must_not_write_before_loading_anything(tmp_path, capsys):
    from flexip_core.cli import build_parser

    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    common = ["generate", "--image", "photo.jpg", "--prompt", "x"]
    for out, message in ((notes, "give a name ending in .png"), (tmp_path, "give a name ending in .png")):
        with pytest.raises(SystemExit):
            build_parser().parse_args(common + ["--out", str(out)])
        assert message in capsys.readouterr().err
    (tmp_path / "shots.png").mkdir()
    with pytest.raises(SystemExit):
        build_parser().parse_args(common + ["--out", str(tmp_path / "shots.png")])
    assert "is a folder; give a file in it" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(common + ["--gate", "0,1.5"])
    assert "is outside 0…1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["convert-ip-adapter", "--out", str(tmp_path / "adapter.bin")])
    assert "give a name ending in .safetensors" in capsys.readouterr().err
    assert notes.read_text() == "mine"
    args = build_parser().parse_args(common + ["--gate", "0, 0.5", "--gate", "1"])
    assert args.gate == [(0.0, 0.5), (1.0,)] and args.out.name == "out.png"


def test_generate_command_checks_the_settings_before_loading_a_model(tmp_path, dreambench, capsys, monkeypatch,
                                                                     caplog):
    from flexip_core.cli import main
    from flexip_core.generation import pipeline

    def never(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(pipeline.FlexIPPipeline, "from_profile", never)
    common = ["generate", "--profile", "tiny", "--image", str(dreambench / "dog" / "00.jpg"), "--prompt", "x",
              "--out", str(tmp_path / "o.png")]
    Image.new("RGBA", (32, 32), (0, 0, 0, 0)).save(tmp_path / "blank.png")
    with caplog.at_level(logging.WARNING, logger="flexip_core.cli"):
        assert main(common + ["--image", str(tmp_path / "blank.png"), "--steps", "0"]) == 2
    assert "blank.png: the photo is one flat colour" in caplog.text and "00.jpg" not in caplog.text
    for extra, message in ((["--size", "70"], "height must be a multiple of 8 from 64 to 512, got 70"),
                           (["--width", "1024"], "width must be a multiple of 8 from 64 to 512, got 1024"),
                           (["--steps", "0"], "num_inference_steps must be a whole number from 1"),
                           (["--guidance", "-1"], "guidance_scale must be a number from 0 to 50"),
                           (["--seed", "-1"], "seed must be a whole number from 0"),
                           (["--scheduler", "eulr"], "unknown scheduler 'eulr'")):
        assert main(common + extra) == 2, extra
        assert message in capsys.readouterr().err, extra


# --- the one generation value ---------------------------------------------------------------------------
def test_a_generation_round_trips_through_parameters_and_the_png_chunk(tmp_path):
    from flexip_core.generation.gate import GateSchedule
    from flexip_core.generation.metadata import read_generation, save_png
    from flexip_core.generation.settings import Generation

    generation = Generation(prompt="a red star, flat style", negative_prompt="blurry", gate=0.3, strength=1.2,
                            seed=2**32 - 1, num_inference_steps=12, guidance_scale=4.5, height=96, width=128,
                            scheduler="euler_a", windows=GateSchedule(0.1, 0.6, 0.2, 0.9), task="image-to-image",
                            task_inputs=(("strength", 0.6),))
    assert Generation.from_parameters(generation.to_parameters()) == generation
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "g.png", {**generation.to_parameters(), "profile": "mini"})
    restored, params = read_generation(Image.open(path))
    assert restored == generation and params["profile"] == "mini"
    assert read_generation(Image.new("RGB", (8, 8))) is None


def test_a_generation_checks_every_setting_with_one_message_each():
    from dataclasses import replace

    from flexip_core.generation.gate import GateSchedule
    from flexip_core.generation.settings import MAX_SEED, Generation

    good = Generation(prompt="x").check()
    for change, message in ((dict(seed=MAX_SEED + 1), "seed must be a whole number from 0 to 2\\*\\*32-1"),
                            (dict(seed=True), "seed"), (dict(gate=1.5), "gate"), (dict(strength=-0.1), "strength"),
                            (dict(num_inference_steps=0), "num_inference_steps"), (dict(height=70), "height"),
                            (dict(guidance_scale=float("nan")), "guidance_scale"), (dict(scheduler="x"), "scheduler"),
                            (dict(task="video"), "task"), (dict(prompt=3), "prompt")):
        with pytest.raises(ValueError, match=message):
            replace(good, **change).check()
    with pytest.raises(ValueError, match="pres_from .* must be below pres_until"):
        GateSchedule(pres_from=0.5, pres_until=0.5)
    assert good.at(0.9).without_gate() == good.without_gate() != replace(good, seed=1).without_gate()


def test_old_png_settings_are_read_into_the_current_names():
    from flexip_core.generation.metadata import parse_parameters
    from flexip_core.generation.settings import Generation

    old = "a toy\nSteps: 20, Sampler: dpmpp_2m, CFG scale: 5.0, Seed: 7, Size: 64x64, FlexIP gate: 0.4, " \
          "FlexIP strength: 1.0, FlexIP identity until: 0.5, Model: mini"
    generation = Generation.from_parameters(parse_parameters(old))
    assert (generation.windows.pres_until, generation.num_inference_steps, generation.seed) == (0.5, 20, 7)


def test_gamma_lists_have_one_parser():
    from flexip_core.cli import gate_values
    from flexip_core.generation.settings import parse_gates

    assert parse_gates("0, .25;0.5 1") == [0.0, 0.25, 0.5, 1.0] == list(gate_values("0,0.25,0.5,1"))
    for text, message in (("", "empty"), ("0, banana", "'banana' is not a number"), ("2", "outside"),
                          (",".join(["0.5"] * 17), "at most 16")):
        with pytest.raises(ValueError, match=message):
            parse_gates(text)


def test_no_core_module_imports_the_toy_world():
    """The toy world plugs in through a profile's `world`; the core never imports it (nor gradio)."""
    import subprocess
    import sys

    code = ("import importlib, pkgutil, sys, flexip_core\n"
            "for m in pkgutil.walk_packages(flexip_core.__path__, 'flexip_core.'):\n"
            "    if not m.name.endswith('__main__'): importlib.import_module(m.name)\n"
            "print(sorted(n for n in sys.modules if n.split('.')[0] in ('toyworld', 'gradio', 'ui')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "[]"
