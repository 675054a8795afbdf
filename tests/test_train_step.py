"""benchmarks/train_step.py: the trainer's own step timed on the tiny profile (--smoke), and the epoch arithmetic."""
from __future__ import annotations

import json

import pytest
import torch


def test_epoch_cost_of_the_paper_data_on_eight_gpus():
    from benchmarks.train_step import epoch_cost

    cost = epoch_cost(step_s=0.5, encode_s=0.25, batch=8)
    assert cost["steps"] == 192_188  # ceil(12.3 M / (8 GPUs x 8))
    assert cost["hours"] == {"pre_encoded": round(192_188 * 0.5 / 3600, 1),
                             "encoding_each_batch": round(192_188 * 0.75 / 3600, 1)}
    assert cost["gpu_hours"]["pre_encoded"] == round(192_188 * 0.5 / 3600 * 8, 1)


@pytest.mark.slow
def test_smoke_run_times_both_variants_and_prints_the_epoch(tmp_path, capsys):
    from accelerate.state import AcceleratorState

    from benchmarks import train_step

    threads = torch.get_num_threads()
    AcceleratorState._reset_state(reset_partial_state=True)  # an earlier in-process run may have set another precision
    try:
        assert train_step.main(["--smoke", "--json", str(tmp_path / "train.json")]) == 0
    finally:
        torch.set_num_threads(threads)  # the smoke run uses one thread
    report = json.loads((tmp_path / "train.json").read_text())
    assert report["config"] == "assets/train/tiny.toml" and report["mixed_precision"] == "bf16"
    for name in ("plain", "checkpointing"):
        assert report[name]["steps_per_s"] > 0 and report[name]["peak_gb"] is None  # memory is read on CUDA only
        assert report["epoch"][name]["steps"] == 768_750  # batch 2 on 8 GPUs
    assert report["encode_s"] > 0 and report["trainable_parameters_m"] > 0
    out = capsys.readouterr().out
    assert "gradient checkpointing" in out and "one epoch of 12.3 M pairs on 8 GPUs" in out
