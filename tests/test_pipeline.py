"""Behaviour of the gated pipeline on tiny random models (CPU)."""
from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from flexip_core import GenerationCancelled

PROMPT = "a photo of sks dog on the beach"
FAST = dict(num_inference_steps=4, height=64, width=64, seed=0, output_type="np")


def run(pipe, subject, **kwargs):
    return pipe(PROMPT, subject=subject, **{**FAST, **kwargs}).arrays


def test_strength_zero_equals_plain_stable_diffusion(tiny_pipe, subject):
    from diffusers import StableDiffusionPipeline

    plain = StableDiffusionPipeline.from_pretrained(tiny_pipe.profile.base, safety_checker=None,
                                                    feature_extractor=None, requires_safety_checker=False)
    plain.set_progress_bar_config(disable=True)
    ours = run(tiny_pipe, subject, strength=0.0, scheduler="pndm")
    theirs = plain(PROMPT, num_inference_steps=4, height=64, width=64, output_type="np",
                   generator=torch.Generator("cpu").manual_seed(0)).images
    assert np.abs(ours - theirs).max() <= 1e-5
    both_off = run(tiny_pipe, subject, branch_weights=(0.0, 0.0), scheduler="pndm")
    assert np.abs(both_off - theirs).max() <= 1e-5


def test_gate_extremes_select_one_branch(tiny_pipe, subject):
    assert np.abs(run(tiny_pipe, subject, gate=1.0) - run(tiny_pipe, subject, branch_weights=(1.0, 0.0))).max() <= 1e-6
    assert np.abs(run(tiny_pipe, subject, gate=0.0) - run(tiny_pipe, subject, branch_weights=(0.0, 1.0))).max() <= 1e-6


@pytest.mark.parametrize("weights", [(0.3, 0.0), (0.0, 0.3)])
def test_any_branch_weight_changes_the_image(tiny_pipe, subject, weights):
    off = run(tiny_pipe, subject, branch_weights=(0.0, 0.0))
    assert np.abs(run(tiny_pipe, subject, branch_weights=weights) - off).mean() > 1e-2


def test_batched_gates_equal_single_runs(tiny_pipe, subject):
    batch = run(tiny_pipe, subject, gate=[0.0, 0.5, 1.0])
    assert batch.shape[0] == 3
    for i, g in enumerate([0.0, 0.5, 1.0]):
        assert np.abs(batch[i] - run(tiny_pipe, subject, gate=g)[0]).max() <= 1e-4
    assert np.abs(batch[0] - batch[2]).mean() > 1e-2  # the gate values really differ


def test_batched_gates_equal_single_runs_with_an_ancestral_sampler(tiny_pipe, subject):
    batch = run(tiny_pipe, subject, gate=[0.2, 0.8], scheduler="euler_a")
    assert np.abs(batch[1] - run(tiny_pipe, subject, gate=0.8, scheduler="euler_a")[0]).max() <= 1e-4


def test_slider_moves_reuse_the_subject_encoding(tiny_pipe, photos):
    subject = tiny_pipe.encode_subject([photos["cat"]])
    calls = tiny_pipe.encoder.calls
    run(tiny_pipe, subject, gate=0.1)
    run(tiny_pipe, subject, gate=0.9, seed=3)
    tiny_pipe("another prompt", subject=subject, num_inference_steps=2)
    assert tiny_pipe.encoder.calls == calls
    again = tiny_pipe.encode_subject([photos["cat"]])  # same photo: served from the cache
    assert tiny_pipe.encoder.calls == calls and again.key == subject.key


def test_branch_keys_values_computed_once_per_generation(tiny_pipe, subject):
    layers = len(tiny_pipe.adapter.config.layers)
    short = tiny_pipe(PROMPT, subject=subject, gate=0.5, num_inference_steps=2)
    long = tiny_pipe(PROMPT, subject=subject, gate=0.5, num_inference_steps=6)
    assert short.kv_projections == long.kv_projections == layers * 6  # k, v of text, pres and pers
    one_branch = tiny_pipe(PROMPT, subject=subject, gate=1.0, num_inference_steps=3)
    assert one_branch.kv_projections == layers * 4  # personalization at weight 0 costs nothing


def test_seed_determines_the_image(tiny_pipe, subject):
    assert np.array_equal(run(tiny_pipe, subject, seed=7), run(tiny_pipe, subject, seed=7))
    assert np.abs(run(tiny_pipe, subject, seed=7) - run(tiny_pipe, subject, seed=8)).mean() > 1e-2


def test_identity_only_early_schedule(tiny_pipe, subject):
    full = run(tiny_pipe, subject, gate=1.0)
    early = run(tiny_pipe, subject, gate=1.0, gate_schedule=0.5)
    none = run(tiny_pipe, subject, branch_weights=(0.0, 0.0))
    assert np.abs(full - early).mean() > 1e-3 and np.abs(early - none).mean() > 1e-3


def test_callback_gets_previews_and_can_cancel(tiny_pipe, subject):
    seen = []
    tiny_pipe(PROMPT, subject=subject, gate=[0.2, 0.8], num_inference_steps=3,
              callback=lambda step, total, previews: seen.append((step, total, len(previews), previews[0].size)))
    assert seen == [(s, 3, 2, (8, 8)) for s in (1, 2, 3)]

    def stop(step, total, previews):
        raise GenerationCancelled()

    with pytest.raises(GenerationCancelled):
        tiny_pipe(PROMPT, subject=subject, num_inference_steps=3, callback=stop)


def test_two_threads_generate_at_once(tiny_pipe, subject):
    expected = {g: run(tiny_pipe, subject, gate=g) for g in (0.1, 0.9)}
    results = {}
    threads = [threading.Thread(target=lambda g=g: results.__setitem__(g, run(tiny_pipe, subject, gate=g)))
               for g in expected]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g in expected:
        assert np.abs(results[g] - expected[g]).max() <= 1e-5


def test_parameters_record_the_settings(tiny_pipe, subject):
    out = tiny_pipe(PROMPT, subject=subject, gate=[0.25, 0.75], seed=5, num_inference_steps=2)
    assert [p["gate"] for p in out.parameters] == [0.25, 0.75]
    assert all(p["seed"] == 5 and p["num_inference_steps"] == 2 and p["profile"] == "tiny" for p in out.parameters)
    assert len(out.images) == 2 and out.images[0].size == (64, 64)


def test_long_prompt_is_truncated_with_a_warning(tiny_pipe, subject):
    out = tiny_pipe("dog " * 200, subject=subject, num_inference_steps=1)
    assert out.warnings and "cut off" in out.warnings[0]


@pytest.mark.parametrize("kwargs, message", [
    (dict(gate=1.5), "gate"), (dict(gate=float("nan")), "gate"), (dict(gate=-0.1), "gate"),
    (dict(strength=3.0), "strength"), (dict(strength=float("nan")), "strength"),
    (dict(num_inference_steps=0), "num_inference_steps"), (dict(num_inference_steps=100000), "num_inference_steps"),
    (dict(height=65), "height"), (dict(width=8192), "width"), (dict(gate=[]), "gate values"),
    (dict(gate=[0.5] * 17), "gate values"), (dict(seed=-1), "seed"), (dict(guidance_scale=float("inf")), "guidance"),
    (dict(scheduler="nope"), "scheduler"), (dict(gate_schedule=0.0), "gate_schedule"),
    (dict(branch_weights=(0.5,)), "branch_weights"),
])
def test_bad_inputs_raise_clear_errors(tiny_pipe, subject, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_pipe(PROMPT, subject=subject, **{**dict(num_inference_steps=1), **kwargs})


def test_missing_subject_is_refused(tiny_pipe):
    with pytest.raises(ValueError, match="no subject"):
        tiny_pipe(PROMPT, subject=None)
    with pytest.raises(ValueError, match="no subject photos"):
        tiny_pipe.encode_subject([])


def test_loading_says_nothing_about_torchvision_and_other_notices_still_pass():
    """diffusers' import of transformers' image processors warns that torchvision is missing; FlexIP does not use
    them, so flexip_core drops that one notice (a user saw it at every start) and nothing else."""
    script = ("import logging, flexip_core.generation.pipeline, diffusers.loaders.ip_adapter; "
              "logging.getLogger('transformers.utils.import_utils').warning('another notice')")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "torchvision" not in result.stderr and "another notice" in result.stderr


def test_branch_windows_act_only_in_their_steps(tiny_pipe, subject):
    """A late identity window (pres_from 0.5) leaves the first half of the steps as the base model draws them; early
    and late windows differ; the float shorthand still means identity early."""
    from flexip_core import GateSchedule

    def run(windows, weights=(1.0, 0.0)):
        previews = []
        out = tiny_pipe(PROMPT, subject=subject, branch_weights=weights, gate_schedule=windows, num_inference_steps=4,
                        seed=3, output_type="np", callback=lambda step, total, p: previews.append(np.asarray(p[0])))
        return previews, out.arrays

    base_steps, base = run(None, (0.0, 0.0))
    late_steps, late = run(GateSchedule(pres_from=0.5))
    early_steps, early = run(GateSchedule(pres_until=0.5))
    assert all(np.array_equal(a, b) for a, b in zip(late_steps[:2], base_steps[:2]))  # steps 1-2: the base model's
    assert not np.array_equal(early_steps[0], base_steps[0])  # identity early acts from the first step
    assert np.abs(late - base).mean() > 1e-3 and np.abs(late - early).mean() > 1e-3
    shorthand_steps, shorthand = run(0.5)
    assert np.array_equal(shorthand, early)
