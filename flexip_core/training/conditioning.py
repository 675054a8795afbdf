"""What the frozen base is conditioned on besides the adapter, per model family: SD1.5's one text encoder, or
SDXL's two text encoders, pooled text embeddings and size micro-conditioning (Podell et al., arXiv 2307.01952).

SDXL prompts are encoded by the pipeline's own `encode_prompt` (the penultimate hidden states of both encoders,
concatenated to 768 + 1280 = 2048 wide, and text_encoder_2's projected pooled embedding); the time ids are
`original_size + crops_coords_top_left + target_size`, each (height, width), as diffusers'
train_text_to_image_sdxl.py computes them. A text-dropped sample gets what the pipeline's guidance pairs with
an empty negative prompt: for SDXL base (force_zeros_for_empty_prompt) zeros, as SDXL itself was trained.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SDXL_TIME_IDS = 6  # original (h, w), crop top-left (top, left), target (h, w)


def base_family(pipeline: str) -> str:
    """'sd15' or 'sdxl' from a profile's pipeline class name (a ValueError names the classes known)."""
    from flexip_core.generation.pipeline import FAMILY_OF

    if pipeline not in FAMILY_OF:
        raise ValueError(f"profile pipeline {pipeline!r} is not one FlexIP trains on; use one of "
                         f"{', '.join(sorted(FAMILY_OF))}")
    return FAMILY_OF[pipeline]


def text_to_image_class(family: str) -> str:
    """The diffusers text-to-image pipeline class the trainer loads a base of `family` as."""
    from flexip_core.generation.pipeline import FAMILIES

    return FAMILIES[family]["text-to-image"]


@dataclass
class TextStates:
    """A batch's text conditioning, as the UNet takes it."""

    hidden: torch.Tensor  # (B, 77, C) encoder_hidden_states (SDXL: C = 2048, both encoders concatenated)
    pooled: torch.Tensor | None = None  # (B, P) SDXL: text_encoder_2's projected pooled embedding; SD1.5: None

    def to(self, device, dtype=None) -> TextStates:
        pooled = None if self.pooled is None else self.pooled.to(device=device, dtype=dtype)
        return TextStates(self.hidden.to(device=device, dtype=dtype), pooled)


def sdxl_time_ids(original_size: torch.Tensor, crop_top_left: torch.Tensor, resolution: int) -> torch.Tensor:
    """(B, 6) SDXL size ids from (B, 2) original (h, w) and (B, 2) crop (top, left); the target is (R, R)."""
    target = torch.tensor([resolution, resolution]).expand(original_size.shape[0], 2)  # (B, 2)
    return torch.cat([original_size, crop_top_left, target], dim=1).float()  # (B, 6)


class SD15Text:
    """SD1.5: PairDataset tokenizes each caption; the text encoder's last hidden state conditions the UNet."""

    family = "sd15"

    def __init__(self, pipe):
        self.text_encoder = pipe.text_encoder
        self.tokenizer = pipe.tokenizer  # PairDataset tokenizes with it (in DataLoader workers)

    @property
    def modules(self) -> tuple[torch.nn.Module, ...]:
        return (self.text_encoder,)

    def check_unet(self, unet) -> None:
        pass

    @torch.no_grad()
    def encode(self, raw: dict, device: torch.device) -> TextStates:
        return TextStates(self.text_encoder(raw["input_ids"].to(device))[0])  # (B, 77, C)

    @torch.no_grad()
    def empty(self, device: torch.device) -> TextStates:
        """The empty caption's states: what text dropout trains with, and what FlexIPPipeline's guidance uses."""
        ids = self.tokenizer("", padding="max_length", max_length=self.tokenizer.model_max_length,
                             return_tensors="pt").input_ids
        return TextStates(self.text_encoder(ids.to(device))[0])  # (1, 77, C)


class SDXLText:
    """SDXL: captions go through the pipeline's own encode_prompt (two encoders, pooled embeds); size ids added."""

    family = "sdxl"
    tokenizer = None  # PairDataset passes captions as strings; encode_prompt tokenizes with both tokenizers

    def __init__(self, pipe):
        self.pipe = pipe

    @property
    def modules(self) -> tuple[torch.nn.Module, ...]:
        return (self.pipe.text_encoder, self.pipe.text_encoder_2)

    def check_unet(self, unet) -> None:
        """The UNet takes text_time added conditioning of 6 size ids plus the pooled text (as diffusers'
        _get_add_time_ids checks): a refiner (5 ids with an aesthetic score) or an SD1.5 UNet is refused here."""
        pooled = self.pipe.text_encoder_2.config.projection_dim
        if unet.config.addition_embed_type != "text_time":
            raise ValueError(f"an SDXL profile needs a UNet with text_time added conditioning, but this one has "
                             f"addition_embed_type={unet.config.addition_embed_type!r}; check the profile's base")
        wanted = unet.add_embedding.linear_1.in_features
        given = unet.config.addition_time_embed_dim * SDXL_TIME_IDS + pooled
        if wanted != given:
            raise ValueError(f"the UNet expects an added embedding {wanted} wide, but {SDXL_TIME_IDS} size ids and "
                             f"the {pooled}-wide pooled text give {given}; train on an SDXL base model (a refiner "
                             "takes an aesthetic score instead of the target size)")

    @torch.no_grad()
    def encode(self, raw: dict, device: torch.device) -> TextStates:
        hidden, _, pooled, _ = self.pipe.encode_prompt(list(raw["caption"]), device=device, num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False)
        return TextStates(hidden, pooled)  # (B, 77, 2048), (B, 1280)

    @torch.no_grad()
    def empty(self, device: torch.device) -> TextStates:
        """The unconditional text that FlexIPPipeline's guidance uses (no negative prompt: encode_prompt's own
        choice, zeros when the pipeline has force_zeros_for_empty_prompt, else the encoded empty caption)."""
        _, hidden, _, pooled = self.pipe.encode_prompt("", device=device, num_images_per_prompt=1,
                                                       do_classifier_free_guidance=True, negative_prompt=None)
        return TextStates(hidden, pooled)  # (1, 77, 2048), (1, 1280)


def text_conditioning(family: str, pipe) -> SD15Text | SDXLText:
    return {"sd15": SD15Text, "sdxl": SDXLText}[family](pipe)
