"""Shared fixtures: the tiny profile built from config dicts, saved to disk and loaded back."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DREAMBENCH = REPO.parent / "shared" / "dreambench"
# Tiny models are built once into a cache folder that test runs (and app servers they launch) share.
os.environ.setdefault("FLEXIP_HOME", str(REPO / ".cache" / "flexip-test"))


def pytest_collection_modifyitems(config, items):
    import torch

    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is present on this machine")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def dreambench() -> Path:
    if not DREAMBENCH.is_dir():
        pytest.skip(f"DreamBench photos not found at {DREAMBENCH}")
    return DREAMBENCH


@pytest.fixture(scope="session")
def photos(dreambench):
    from flexip_core.generation.images import load_reference_image

    return {name: load_reference_image(dreambench / name / "00.jpg") for name in ("dog", "cat", "backpack")}


@pytest.fixture(scope="session")
def tiny_pipe():
    from flexip_core import FlexIPPipeline

    return FlexIPPipeline.from_profile("tiny")


@pytest.fixture(scope="session")
def subject(tiny_pipe, photos):
    return tiny_pipe.encode_subject([photos["dog"]])


@pytest.fixture
def photo(tmp_path) -> str:
    """A subject photo file for the studio's handlers: a red toy on a light ground (test modules may have their own)."""
    from tests.ui_fixtures import png_bytes

    path = tmp_path / "uploads" / "red_toy.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes((96, 64)))
    return str(path)
