"""Attention backends: SDPA everywhere, xformers on CUDA; the two agree."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from flexip_core.attention import pick_backend, xformers_available


def test_backend_choice_on_cpu():
    assert pick_backend(None, torch.device("cpu")) == "sdpa"
    assert pick_backend("auto", torch.device("cpu")) == "sdpa"
    with pytest.raises(ValueError, match="needs CUDA"):
        pick_backend("xformers", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown"):
        pick_backend("flash9", torch.device("cpu"))


@pytest.mark.gpu
def test_xformers_matches_sdpa_on_cuda(photos):
    if not xformers_available():
        pytest.skip("xformers is not installed (pip install -r requirements-gpu.txt)")
    from flexip_core import FlexIPPipeline

    results = []
    for backend in ("sdpa", "xformers"):
        pipe = FlexIPPipeline.from_profile("tiny", device="cuda", dtype="float16", attention=backend)
        subject = pipe.encode_subject([photos["dog"]])
        results.append(pipe("a dog", subject=subject, gate=[0.2, 0.8], num_inference_steps=4, output_type="np").arrays)
    assert np.abs(results[0] - results[1]).max() <= 2e-3
