"""Attention backends: SDPA everywhere, xformers on CUDA; the two agree."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from flexip_core.generation.attention import pick_backend, xformers_usable


def test_backend_choice_on_cpu():
    assert pick_backend(None, torch.device("cpu")) == "sdpa"
    assert pick_backend("auto", torch.device("cpu")) == "sdpa"
    with pytest.raises(ValueError, match="needs CUDA"):
        pick_backend("xformers", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown"):
        pick_backend("flash9", torch.device("cpu"))


def _fake_xformers(monkeypatch, attention):
    """Installs a stand-in `xformers` package whose attention op is `attention`."""
    import sys
    import types

    package, ops = types.ModuleType("xformers"), types.ModuleType("xformers.ops")
    package.__version__, package.ops, ops.memory_efficient_attention = "0.0.0-fake", ops, attention
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    xformers_usable.cache_clear()


def test_xformers_without_kernels_is_reported_not_used(monkeypatch):
    """A wheel built for another torch imports but has no operators: the probe says why, auto falls back."""
    def no_operator(q, k, v):
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward` with inputs:\n ...")

    _fake_xformers(monkeypatch, no_operator)
    problem = xformers_usable("cpu")
    assert problem and "cannot run on this torch" in problem and "No operator found" in problem
    xformers_usable.cache_clear()


def test_working_xformers_passes_the_probe(monkeypatch):
    calls = []

    def works(q, k, v):
        calls.append(q.shape)
        return q

    _fake_xformers(monkeypatch, works)
    assert xformers_usable("cpu") is None and calls == [(1, 8, 1, 40)]
    assert xformers_usable("cpu") is None and len(calls) == 1  # probed once per process
    xformers_usable.cache_clear()


@pytest.mark.gpu
def test_xformers_matches_sdpa_on_cuda(photos):
    problem = xformers_usable("cuda")
    if problem:
        pytest.skip(problem)
    from flexip_core import FlexIPPipeline

    results = []
    for backend in ("sdpa", "xformers"):
        pipe = FlexIPPipeline.from_profile("tiny", device="cuda", dtype="float16", attention=backend)
        subject = pipe.encode_subject([photos["dog"]])
        results.append(pipe("a dog", subject=subject, gate=[0.2, 0.8], num_inference_steps=4, output_type="np").arrays)
    assert np.abs(results[0] - results[1]).max() <= 2e-3


def test_a_zero_weight_keeps_a_sample_finite_when_its_branch_overflows():
    """In a batched sweep, γ = 0 rows must not turn NaN when the branch overflows (fp16's 0 · inf), by construction:
    value projections so large that the branch's output is inf."""
    import torch
    from diffusers.models.attention_processor import Attention

    from flexip_core.generation.adapters import BranchKV
    from flexip_core.generation.attention import BranchInputs, GatedCrossAttnProcessor

    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=32, heads=4, dim_head=8)
    kv = BranchKV(32, 32)
    with torch.no_grad():
        kv.to_v_pres.weight.fill_(3e38)  # every value overflows to inf
    processor = GatedCrossAttnProcessor(kv, fused=False)  # one call per term: bit-exact (fused: tests/test_speed.py)
    hidden, text = torch.randn(2, 16, 32), torch.randn(2, 77, 32)
    tokens = torch.randn(2, 4, 32).abs() + 1.0
    inputs = BranchInputs(tokens, None, torch.tensor([0.0, 1.0]), torch.zeros(2), True, False)
    with torch.no_grad():
        out = processor(attn, hidden, text, flexip=inputs)
        plain = processor(attn, hidden, text)
    assert torch.isfinite(out[0]).all() and torch.equal(out[0], plain[0])  # γ = 0: exactly the text attention
    assert not torch.isfinite(out[1]).all()  # the construction does overflow the branch
