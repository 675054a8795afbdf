"""Import of published IP-Adapter files (Ye et al., arXiv 2308.06721; h94/IP-Adapter) into FlexIP's branches.

File layout: `image_proj.*` is the projection model, either plain (`proj`, `norm`: 4 tokens from the CLIP
[CLS] embedding) or Plus (a perceiver resampler: `latents`, `proj_in`, `layers.*`, `proj_out`, `norm_out`,
16 tokens from the CLIP penultimate hidden states); `ip_adapter.N.to_k_ip.weight` / `.to_v_ip.weight` are
the key/value projections of each cross-attention layer, N counting the UNet's attention processors
(attn1, attn2, attn1, ...), so cross-attention layer i has N = 2i + 1, as diffusers' loader counts. A `.bin`
holds the same as {"image_proj": {...}, "ip_adapter": {...}}. The projection's key renaming is diffusers'
own `_convert_ip_adapter_image_proj_to_diffusers`; either layout can feed either FlexIP branch.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from flexip_core.generation.adapter_config import AdapterConfig, BranchConfig
from flexip_core.generation.adapters import FlexIPAdapter, layer_key
from flexip_core.loading.sources import read_tensors, resolve_file
from flexip_core.loading.weights import load_state_strict, save_adapter

logger = logging.getLogger(__name__)

FILES_HINTS = {  # per model family: the published files that fit its UNet
    "sd15": "Use an IP-Adapter made for SD1.5, such as h94/IP-Adapter:models/ip-adapter_sd15.safetensors or "
            "h94/IP-Adapter:models/ip-adapter-plus_sd15.safetensors",
    "sdxl": "Use an IP-Adapter made for SDXL, such as h94/IP-Adapter:sdxl_models/ip-adapter_sdxl_vit-h.safetensors or "
            "h94/IP-Adapter:sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors (both read the ViT-H/14 encoder "
            "h94/IP-Adapter:models/image_encoder)",
}
SD15_FILES_HINT = FILES_HINTS["sd15"]
TOKEN_WIDTH_FAMILIES = {768: "SD1.5", 2048: "SDXL"}  # the published files' token widths
# Other IP-Adapter variants diffusers knows, told apart by one projection key; not FlexIP token providers (yet).
OTHER_LAYOUTS = {
    "proj.3.weight": "IP-Adapter Full Face",
    "perceiver_resampler.proj_in.weight": "IP-Adapter FaceID Plus",
    "norm.weight": "IP-Adapter FaceID",
}
PLUS_DIM_HEAD = 64  # diffusers' converter assumes 64-wide heads in the Plus resampler


def processor_index(layer: int) -> int:
    """The published key number N of the `layer`-th cross-attention layer (attn1 and attn2 alternate)."""
    return 2 * layer + 1


@dataclass(frozen=True)
class IPAdapterFile:
    """The two halves of one IP-Adapter file."""

    name: str  # file name, for messages
    image_proj: dict  # projection weights, keys without the 'image_proj.' prefix
    ip_adapter: dict  # 'N.to_k_ip.weight' / 'N.to_v_ip.weight' -> tensor

    @property
    def layout(self) -> str:
        """'plain', 'plus', or the name of a variant FlexIP does not take."""
        keys = self.image_proj
        if "latents" in keys:
            return "plus"
        if "proj.weight" in keys and "norm.weight" in keys:
            return "plain"
        for key, variant in OTHER_LAYOUTS.items():
            if key in keys:
                return variant
        return "unknown"


def read_ip_adapter(source: str | Path, part: str = "preservation") -> IPAdapterFile:
    """Read an IP-Adapter .safetensors or .bin (a path or 'repo/id:path/in/repo')."""
    path = resolve_file(str(source), part)
    data = read_tensors(path)
    if isinstance(data.get("image_proj"), dict) and isinstance(data.get("ip_adapter"), dict):
        image_proj, ip_adapter = data["image_proj"], data["ip_adapter"]  # the .bin layout
    else:
        image_proj = {k.removeprefix("image_proj."): v for k, v in data.items() if k.startswith("image_proj.")}
        ip_adapter = {k.removeprefix("ip_adapter."): v for k, v in data.items() if k.startswith("ip_adapter.")}
    if not image_proj or not ip_adapter:
        found = ", ".join(sorted(map(str, data))[:5]) or "nothing"
        raise ValueError(f"{path.name} is not an IP-Adapter file: expected image_proj.* and "
                         f"ip_adapter.N.to_k_ip.weight keys, found {found}")
    for key, value in list(image_proj.items()) + list(ip_adapter.items()):
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path.name}: {key} is a {type(value).__name__}, not a tensor")
    return IPAdapterFile(path.name, image_proj, ip_adapter)


def branch_config(file: IPAdapterFile) -> BranchConfig:
    """The token provider's sizes, read off the projection's shapes."""
    p = file.image_proj
    if file.layout == "plain":
        width = p["norm.weight"].shape[0]  # (C,)
        rows, embed = p["proj.weight"].shape  # (tokens * C, E)
        if rows != 4 * width:
            raise ValueError(f"{file.name}: plain IP-Adapter with {rows // width} tokens; only the published 4 are "
                             "supported (diffusers' loader assumes 4)")
        return BranchConfig(kind="ip_adapter", cross_attention_dim=width, clip_embed_dim=embed, num_tokens=4)
    if file.layout == "plus":
        _, queries, hidden = p["latents"].shape  # (1, Q, D)
        depth = len({k.split(".")[1] for k in p if k.startswith("layers.")})
        if depth != 4 or "layers.0.0.to_q.weight" not in p:
            raise ValueError(f"{file.name}: Plus resampler with {depth} layers; only the published 4-layer "
                             "resampler is supported (diffusers' loader assumes 4)")
        return BranchConfig(
            kind="ip_adapter_plus", cross_attention_dim=p["proj_out.weight"].shape[0],
            clip_hidden_dim=p["proj_in.weight"].shape[1], num_queries=queries, resampler_dim=hidden, depth=depth,
            heads=p["layers.0.0.to_q.weight"].shape[0] // PLUS_DIM_HEAD, dim_head=PLUS_DIM_HEAD,
        )
    raise ValueError(f"{file.name} is an {file.layout} file (image_proj keys: "
                     f"{', '.join(sorted(p)[:4])}); FlexIP takes the plain and the Plus IP-Adapter layouts")


def diffusers_projection(file: IPAdapterFile) -> torch.nn.Module:
    """diffusers' ImageProjection / IPAdapterPlusImageProjection, built and loaded by diffusers' own converter."""
    from diffusers.loaders.unet import UNet2DConditionLoadersMixin

    # The converter is a UNet method, but with low_cpu_mem_usage=False it never touches `self`.
    convert = UNet2DConditionLoadersMixin._convert_ip_adapter_image_proj_to_diffusers
    try:
        return convert(None, dict(file.image_proj), low_cpu_mem_usage=False)
    except (KeyError, RuntimeError) as error:
        raise ValueError(f"{file.name}: its image_proj weights do not form a {file.layout} IP-Adapter projection "
                         f"({str(error).strip().splitlines()[0]})") from None


def unet_family(layers, cross_attention_dim: int | None) -> str:
    """'sdxl' or 'sd15', from a UNet's cross-attention layout: SDXL's tokens are 2048 wide and its attention blocks
    stack several transformer layers (2 and 10; the tiny SDXL's too), SD1.5's hold one each."""
    several = any(".transformer_blocks.1." in name for name, _ in layers)
    return "sdxl" if cross_attention_dim == 2048 or several else "sd15"


def check_fits(file: IPAdapterFile, config: BranchConfig, layers, cross_attention_dim: int | None) -> None:
    """Every cross-attention layer's to_k_ip/to_v_ip present with the UNet's shapes; errors name the keys and the
    files made for this UNet's family."""
    width = cross_attention_dim or config.cross_attention_dim
    expected = {}
    for i, (_, inner) in enumerate(layers):
        for name in ("to_k_ip", "to_v_ip"):
            expected[f"{processor_index(i)}.{name}.weight"] = (inner, width)
    got = {k: tuple(v.shape) for k, v in file.ip_adapter.items()}
    problems = []
    if config.cross_attention_dim != width:
        problems.append(f"its image_proj makes {config.cross_attention_dim}-wide tokens; this UNet's cross-attention "
                        f"takes {width}")
    missing = sorted(set(expected) - set(got), key=_key_order)
    unexpected = sorted(set(got) - set(expected), key=_key_order)
    shapes = [f"ip_adapter.{k}: file {got[k]} vs model {expected[k]}"
              for k in sorted(set(got) & set(expected), key=_key_order) if got[k] != expected[k]]
    if missing:
        problems.append(f"missing keys ({len(missing)}): " + ", ".join(f"ip_adapter.{k}" for k in missing[:6]))
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(f"ip_adapter.{k}" for k in unexpected[:6]))
    if shapes:
        problems.append(f"mismatched shapes ({len(shapes)}): " + "; ".join(shapes[:6]))
    if problems:
        family = unet_family(layers, width)
        made_for = TOKEN_WIDTH_FAMILIES.get(config.cross_attention_dim)
        guess = (f" It looks like an {made_for} IP-Adapter ({config.cross_attention_dim}-wide tokens)."
                 if made_for else "")
        unet = {"sd15": "an SD1.5", "sdxl": "an SDXL"}[family]
        raise ValueError(f"{file.name} does not fit this UNet ({unet} UNet: {len(layers)} cross-attention layers, "
                         f"{width}-wide tokens): " + " | ".join(problems) + f".{guess} {FILES_HINTS[family]}")


def _key_order(key: str) -> tuple:
    head, _, rest = key.partition(".")
    return (int(head) if head.isdigit() else 10**9, rest)


def adapter_from_ip_adapter_files(preservation, personalization, layers, cross_attention_dim: int | None = None
                                  ) -> FlexIPAdapter:
    """A FlexIPAdapter whose preservation and personalization branches are two IP-Adapter files.

    `layers` are the UNet's cross-attention layers (name, inner width) in its order; `cross_attention_dim`,
    when given, is the width of the UNet's text tokens, which each file's tokens must match.
    """
    if not preservation or not personalization:
        raise ValueError("IP-Adapter import needs one file per branch: give both preservation= and "
                         "personalization= (--preservation/--personalization; the same file twice is fine)")
    layers = tuple(layers)
    files = {"pres": read_ip_adapter(preservation, "preservation"),
             "pers": read_ip_adapter(personalization, "personalization")}
    configs = {branch: branch_config(file) for branch, file in files.items()}
    for branch, file in files.items():
        check_fits(file, configs[branch], layers, cross_attention_dim)
    adapter = FlexIPAdapter(AdapterConfig(configs["pres"], configs["pers"], layers))
    providers = {"pres": adapter.preservation, "pers": adapter.personalization}
    with torch.no_grad():
        for branch, file in files.items():
            load_state_strict(providers[branch].proj, diffusers_projection(file).state_dict(), file.name)
            for i, (name, _) in enumerate(layers):
                kv = adapter.kv[layer_key(name)]
                getattr(kv, f"to_k_{branch}").weight.copy_(file.ip_adapter[f"{processor_index(i)}.to_k_ip.weight"])
                getattr(kv, f"to_v_{branch}").weight.copy_(file.ip_adapter[f"{processor_index(i)}.to_v_ip.weight"])
    logger.info("IP-Adapter %s (%s) -> preservation, %s (%s) -> personalization", files["pres"].name,
                files["pres"].layout, files["pers"].name, files["pers"].layout)
    return adapter.eval()


def convert_ip_adapter_files(preservation, personalization, out: str | Path, layers,
                             cross_attention_dim: int | None = None) -> Path:
    """Write a pair of IP-Adapter files as one native FlexIP adapter file."""
    adapter = adapter_from_ip_adapter_files(preservation, personalization, layers, cross_attention_dim)
    meta = {"converted_from": "ip-adapter", "preservation_source": str(preservation),
            "personalization_source": str(personalization)}
    return save_adapter(adapter, out, metadata=meta)
