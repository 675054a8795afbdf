"""Frozen configuration dataclasses of the FlexIP adapters (their sizes: docs/method.md, "The two adapters")."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

BRANCH_KINDS = ("flexip_preservation", "flexip_personalization", "ip_adapter", "ip_adapter_plus")


@dataclass(frozen=True)
class BranchConfig:
    kind: str  # one of BRANCH_KINDS: which token provider feeds this branch
    cross_attention_dim: int = 768  # width of the tokens handed to the UNet (SD1.5: 768)
    clip_embed_dim: int = 1024  # CLIP projected [CLS] embedding size (ViT-H/14: 1024)
    clip_hidden_dim: int = 1280  # CLIP penultimate hidden-state width (ViT-H/14: 1280), used by ip_adapter_plus
    dino_dim: int = 1024  # DINOv2 patch-token width (DINOv2-L: 1024), used by flexip_preservation
    num_tokens: int = 4  # tokens projected from the CLIP [CLS] embedding
    num_queries: int = 16  # learnable queries of a perceiver resampler
    resampler_dim: int = 768  # hidden width of the resampler
    depth: int = 4  # resampler layers, or text-grounding layers for flexip_personalization
    heads: int = 12  # attention heads inside the adapter
    dim_head: int = 64  # width of each of those heads

    def __post_init__(self):
        if self.kind not in BRANCH_KINDS:
            raise ValueError(f"unknown branch kind {self.kind!r}; accepted: {', '.join(BRANCH_KINDS)}")

    @property
    def needs(self) -> frozenset[str]:
        """Image features this branch consumes: subset of {'clip_embeds', 'clip_hidden', 'dino'}."""
        return {
            "ip_adapter": frozenset({"clip_embeds"}),
            "ip_adapter_plus": frozenset({"clip_hidden"}),
            "flexip_preservation": frozenset({"clip_embeds", "dino"}),
            "flexip_personalization": frozenset({"clip_embeds"}),
        }[self.kind]


@dataclass(frozen=True)
class AdapterConfig:
    preservation: BranchConfig  # identity branch (w_pres)
    personalization: BranchConfig  # prompt-grounding branch (w_pers)
    layers: tuple[tuple[str, int], ...] = field(default=())  # (attn2 processor name, its inner width), UNet order

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AdapterConfig:
        data = json.loads(text)
        return cls(
            preservation=BranchConfig(**data["preservation"]),
            personalization=BranchConfig(**data["personalization"]),
            layers=tuple((str(name), int(width)) for name, width in data["layers"]),
        )
