"""The Preservation and Personalization adapters (FlexIP, arXiv 2504.07405) and IP-Adapter token providers.

The IP-Adapter projections reuse diffusers' `ImageProjection` and `IPAdapterPlusImageProjection` so that
published IP-Adapter weights produce exactly the tokens diffusers produces.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.embeddings import ImageProjection, IPAdapterPlusImageProjection
from torch import nn
from torch.nn import functional as F

from flexip_core.generation.adapter_config import AdapterConfig, BranchConfig


@dataclass(frozen=True)
class ImageFeatures:
    """Encoder outputs for a batch of subjects; fields an adapter does not need may be None."""

    clip_embeds: torch.Tensor | None = None  # (B, E) projected CLIP [CLS]
    clip_hidden: torch.Tensor | None = None  # (B, 1 + P, H) CLIP penultimate hidden states
    dino: torch.Tensor | None = None  # (B, P, D) DINOv2 patch tokens

    def map(self, fn) -> ImageFeatures:
        return ImageFeatures(*(None if t is None else fn(t) for t in (self.clip_embeds, self.clip_hidden, self.dino)))

    @staticmethod
    def cat(items: list[ImageFeatures]) -> ImageFeatures:
        fields = zip(*((f.clip_embeds, f.clip_hidden, f.dino) for f in items))
        return ImageFeatures(*(None if parts[0] is None else torch.cat(parts) for parts in fields))


def _resampler(cfg: BranchConfig, in_dim: int) -> IPAdapterPlusImageProjection:
    return IPAdapterPlusImageProjection(
        embed_dims=in_dim,
        output_dims=cfg.cross_attention_dim,
        hidden_dims=cfg.resampler_dim,
        depth=cfg.depth,
        dim_head=cfg.dim_head,
        heads=cfg.heads,
        num_queries=cfg.num_queries,
    )


class PlainIPAdapterTokens(nn.Module):
    """IP-Adapter: the CLIP [CLS] embedding projected to `num_tokens` tokens (linear + LayerNorm)."""

    def __init__(self, cfg: BranchConfig):
        super().__init__()
        self.proj = ImageProjection(cfg.clip_embed_dim, cfg.cross_attention_dim, cfg.num_tokens)

    def forward(self, features: ImageFeatures, text_embeds: torch.Tensor) -> torch.Tensor:
        return self.proj(features.clip_embeds)  # (B, num_tokens, C)


class PlusIPAdapterTokens(nn.Module):
    """IP-Adapter Plus: a perceiver resampler with learned queries over CLIP penultimate hidden states."""

    def __init__(self, cfg: BranchConfig):
        super().__init__()
        self.proj = _resampler(cfg, cfg.clip_hidden_dim)

    def forward(self, features: ImageFeatures, text_embeds: torch.Tensor) -> torch.Tensor:
        return self.proj(features.clip_hidden)  # (B, num_queries, C)


class PreservationAdapter(nn.Module):
    """FlexIP Preservation Adapter: learnable queries over DINOv2 patches plus tokens from the CLIP [CLS]."""

    def __init__(self, cfg: BranchConfig):
        super().__init__()
        self.detail = _resampler(cfg, cfg.dino_dim)
        self.glob = ImageProjection(cfg.clip_embed_dim, cfg.cross_attention_dim, cfg.num_tokens)

    def forward(self, features: ImageFeatures, text_embeds: torch.Tensor) -> torch.Tensor:
        detail = self.detail(features.dino)  # (B, num_queries, C)
        glob = self.glob(features.clip_embeds)  # (B, num_tokens, C)
        return torch.cat([detail, glob], dim=1)  # (B, num_queries + num_tokens, C)


class _GroundingLayer(nn.Module):
    """Pre-norm cross-attention of text tokens to visual tokens; output projection starts at zero."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.norm_text = nn.LayerNorm(dim)
        self.norm_visual = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def forward(self, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        batch, length, _ = text.shape
        q = self.to_q(self.norm_text(text)).view(batch, length, self.heads, self.dim_head)  # (B, L, h, d)
        q = q.transpose(1, 2)  # (B, h, L, d)
        k, v = self.to_kv(self.norm_visual(visual)).chunk(2, dim=-1)  # (B, V, h*d) each
        k = k.view(batch, -1, self.heads, self.dim_head).transpose(1, 2)  # (B, h, V, d)
        v = v.view(batch, -1, self.heads, self.dim_head).transpose(1, 2)  # (B, h, V, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, L, d)
        out = out.transpose(1, 2).reshape(batch, length, self.heads * self.dim_head)  # (B, L, h*d)
        return text + self.to_out(out)


class PersonalizationAdapter(nn.Module):
    """FlexIP Personalization Adapter: text tokens cross-attend to visual tokens from the CLIP [CLS]."""

    def __init__(self, cfg: BranchConfig):
        super().__init__()
        self.visual = ImageProjection(cfg.clip_embed_dim, cfg.cross_attention_dim, cfg.num_tokens)
        self.layers = nn.ModuleList(
            [_GroundingLayer(cfg.cross_attention_dim, cfg.heads, cfg.dim_head) for _ in range(cfg.depth)]
        )

    def forward(self, features: ImageFeatures, text_embeds: torch.Tensor) -> torch.Tensor:
        visual = self.visual(features.clip_embeds)  # (B, num_tokens, C)
        tokens = text_embeds.to(visual.dtype)  # (B, 77, C)
        for layer in self.layers:
            tokens = layer(tokens, visual)
        return tokens  # (B, 77, C): visually grounded text tokens


TOKEN_PROVIDERS = {
    "ip_adapter": PlainIPAdapterTokens,
    "ip_adapter_plus": PlusIPAdapterTokens,
    "flexip_preservation": PreservationAdapter,
    "flexip_personalization": PersonalizationAdapter,
}


class BranchKV(nn.Module):
    """One cross-attention layer's key/value projections for both branches."""

    def __init__(self, cross_attention_dim: int, inner_dim: int):
        super().__init__()
        self.to_k_pres = nn.Linear(cross_attention_dim, inner_dim, bias=False)
        self.to_v_pres = nn.Linear(cross_attention_dim, inner_dim, bias=False)
        self.to_k_pers = nn.Linear(cross_attention_dim, inner_dim, bias=False)
        self.to_v_pers = nn.Linear(cross_attention_dim, inner_dim, bias=False)


def layer_key(processor_name: str) -> str:
    """ModuleDict key for an attention processor name ('down_blocks.0...attn2.processor')."""
    return processor_name.removesuffix(".processor").replace(".", "_")


class FlexIPAdapter(nn.Module):
    """Both branches: their token providers and, per cross-attention layer, their key/value projections."""

    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.config = config
        self.preservation = TOKEN_PROVIDERS[config.preservation.kind](config.preservation)
        self.personalization = TOKEN_PROVIDERS[config.personalization.kind](config.personalization)
        pres_dim = config.preservation.cross_attention_dim
        if config.personalization.cross_attention_dim != pres_dim:
            raise ValueError("both branches must produce tokens of the same width (cross_attention_dim)")
        self.kv = nn.ModuleDict({layer_key(name): BranchKV(pres_dim, width) for name, width in config.layers})

    @property
    def needs(self) -> frozenset[str]:
        return self.config.preservation.needs | self.config.personalization.needs

    def init_kv_from_unet(self, unet) -> None:
        """Start every branch as the identity: keys from its layer's own text to_k, values at zero.

        A zero value projection makes each branch's attention output zero, so an untrained adapter leaves the base
        model's output unchanged at every γ and strength; its gradient is not zero (the attention weights are
        not), so training moves it. Copying to_v instead would make the personalization branch, whose untrained
        tokens equal the text's, an exact copy of the text attention: (1 + w_pers) · Attn(text).
        """
        modules = dict(unet.named_modules())
        with torch.no_grad():
            for name, _ in self.config.layers:
                attn = modules[name.removesuffix(".processor")]
                kv = self.kv[layer_key(name)]
                for branch in ("pres", "pers"):
                    getattr(kv, f"to_k_{branch}").weight.copy_(attn.to_k.weight)
                    getattr(kv, f"to_v_{branch}").weight.zero_()


def is_cross_attention(processor_name: str) -> bool:
    """Whether an attention processor name is a spatial cross-attention layer (attn2), where FlexIP's branches act.

    The motion modules of diffusers' UNetMotionModel (AnimateDiff) have attn1 and attn2 too, both temporal
    self-attention across frames; they are skipped, as diffusers' own IP-Adapter loader skips them."""
    return processor_name.endswith("attn2.processor") and "motion_modules" not in processor_name


def cross_attention_layers(unet) -> tuple[tuple[str, int], ...]:
    """(processor name, inner width) of every cross-attention layer of a UNet, in the UNet's order (an AnimateDiff
    UNetMotionModel has the same ones as the UNet it was made from)."""
    modules = dict(unet.named_modules())
    layers = []
    for name in unet.attn_processors:
        if is_cross_attention(name):
            attn = modules[name.removesuffix(".processor")]
            layers.append((name, attn.to_k.out_features))
    return tuple(layers)
