"""Native FlexIP adapter files: one .safetensors holding both branches, its AdapterConfig in the metadata."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from flexip_core.generation.adapter_config import AdapterConfig
from flexip_core.generation.adapters import FlexIPAdapter

logger = logging.getLogger(__name__)

FORMAT = "flexip-adapter/1"


def save_adapter(adapter: FlexIPAdapter, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write the adapter's weights (fp32 unless already lower) and config to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter.state_dict().items()}
    meta = {"format": FORMAT, "config": adapter.config.to_json(), **(metadata or {})}
    save_file(tensors, str(path), metadata=meta)
    return path


def read_adapter_config(path: str | Path) -> AdapterConfig:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"adapter file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path.name}: not a readable .safetensors file ({error}); "
                         "re-download or re-export it") from None
    if meta.get("format") != FORMAT or "config" not in meta:
        raise ValueError(
            f"{path.name}: not a native FlexIP adapter (no '{FORMAT}' metadata); "
            "IP-Adapter files go through --preservation/--personalization or `python -m flexip_core convert-ip-adapter`"
        )
    return AdapterConfig.from_json(meta["config"])


def load_adapter(path: str | Path, layers: tuple[tuple[str, int], ...] | None = None) -> FlexIPAdapter:
    """Build the adapter its file describes and load it strictly; errors name missing and mismatched keys.

    `layers`, when given, are the cross-attention layers of the UNet it will be attached to.
    """
    path = Path(path)
    config = read_adapter_config(path)
    if layers is not None and tuple(layers) != config.layers:
        ours = dict(config.layers)
        theirs = dict(layers)
        detail = sorted(set(ours.items()) ^ set(theirs.items()))[:6]
        raise ValueError(
            f"{path.name} was made for a UNet with other cross-attention layers; differing (layer, width): {detail}"
        )
    adapter = FlexIPAdapter(config)
    load_state_strict(adapter, load_file(str(path)), path.name)
    return adapter


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], label: str) -> None:
    """load_state_dict(strict) with an error that lists missing, unexpected and wrongly shaped keys."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing[:8])}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:8])}")
    if shapes:
        problems.append(f"mismatched shapes ({len(shapes)}): {'; '.join(shapes[:8])}")
    if problems:
        raise ValueError(f"{label} does not fit this model: " + " | ".join(problems))
    module.load_state_dict(state, strict=True)
