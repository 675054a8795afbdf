"""`python -m benchmarks --smoke` end to end on the tiny models: all six items report, the targets print last.

Untimed: the figures of a smoke run mean nothing; this checks that the benchmark runs and reports completely."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.server]

TARGETS = ("unet_flexip_vs_plain", "unet_flexip_vs_ip_adapter_plus", "slider_move_encoder_calls",
           "sweep_batched_vs_sequential", "studio_vs_api")
TARGET_LINE = re.compile(r"^TARGET (\w+): (ratio|count) \d+(\.\d+)? \(<= \d+(\.\d+)?\) (PASS|FAIL)$")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("benchmarks")
    result = subprocess.run([sys.executable, "-m", "benchmarks", "--smoke", "--out", str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=840)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout, json.loads((out / "smoke.json").read_text())


def test_all_seven_items_report_without_failing(smoke):
    stdout, results = smoke
    for number in range(1, 8):
        header = next(line for line in stdout.splitlines() if line.startswith(f"| {number} | **"))
        assert "failed" not in header, header
    assert [section["number"] for section in results["sections"]] == [1, 2, 3, 4, 5, 6, 7]
    server = results["sections"][4]
    if (REPO / "app.py").is_file():
        assert server["skipped"] is None and server["data"]["final"], server
    else:
        assert server["skipped"] == "app.py not available"
    load = results["sections"][5]  # item 6: every request of the eight users served
    if (REPO / "app.py").is_file():
        assert load["skipped"] is None, load
        assert len(load["data"]["latencies"]) == load["data"]["users"] * load["data"]["requests_per_user"]
    scrub = results["sections"][6]  # item 7: the ticks came in one batch, and the drag was answered
    if (REPO / "app.py").is_file():
        assert scrub["skipped"] is None, scrub
        assert scrub["data"]["ticks_ready"] and scrub["data"]["drag_requests"] > 0


def test_target_lines_come_last_one_per_target(smoke):
    stdout, results = smoke
    lines = stdout.strip().splitlines()
    last = lines[-len(TARGETS):]
    assert [TARGET_LINE.match(line).group(1) for line in last] == list(TARGETS), last
    assert "TARGET slider_move_encoder_calls: count 0 (<= 0) PASS" in last  # a slider move never re-encodes
    assert [t["name"] for t in results["targets"]] == list(TARGETS)


def test_flexip_keys_values_stay_cached_during_timed_steps(smoke):
    _, results = smoke
    unet = results["sections"][0]["data"]
    assert unet["kv_cached"] is True
    assert unet["flops"]["FlexIP"]["total"] > 0 and unet["flops"]["IP-Adapter Plus"]["attention"] > 0


def test_per_image_prints_the_median_for_a_profile(capsys):
    from benchmarks import per_image

    assert per_image.main(["--profile", "tiny", "--steps", "2", "--images", "2"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    pattern = (r"profile tiny on cpu \(torch.float32\), 64x64, 2 steps, CFG: "
               r"median \d+\.\d+ s per image \(min .*; 2 images\)$")
    assert re.match(pattern, line), line


@pytest.mark.parametrize("argv, message", [
    (["--only", "per_image"], "expected item numbers from 1 to 7 (1 UNet step"),
    (["--only", "8"], "expected item numbers from 1 to 7"),
    (["--log-level", "loud"], "invalid choice: 'LOUD'"),
    (["--out", __file__], "is a file; give a folder"),
])
def test_bad_arguments_are_refused_before_any_item_runs(argv, message, capsys):
    from benchmarks.__main__ import parse_args

    with pytest.raises(SystemExit) as stop:
        parse_args(argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert parse_args(["--only", "1, 3", "--log-level", "debug"]).only == {1, 3}


def test_per_image_refuses_bad_arguments_before_loading(capsys):
    from benchmarks import per_image

    for bad, text in ((["--images", "0"], "must be at least 1, got 0"), (["--steps", "x"], "expected a whole number"),
                      (["--profile", "nosuch"], "unknown profile 'nosuch'")):
        with pytest.raises(SystemExit):
            per_image.main(bad)
        assert text in capsys.readouterr().err
