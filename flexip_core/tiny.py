"""Tiny random models (fixed seed, config dicts) in the real architectures, written out as real weights are."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection, Dinov2Config, Dinov2Model

from .adapters import FlexIPAdapter, cross_attention_layers
from .config import AdapterConfig, BranchConfig
from .tokenizer import save_tiny_tokenizer
from .weights import save_adapter

logger = logging.getLogger(__name__)

TINY_VERSION = "1"  # bump when the configs below change, so cached builds are rebuilt

UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=32,
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
    sample_size=64,
)
TEXT = dict(
    hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=1000,
    max_position_embeddings=77, bos_token_id=668, eos_token_id=669, pad_token_id=669, projection_dim=32,
)
CLIP_VISION = dict(
    hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32, patch_size=8,
    projection_dim=32,
)
DINO = dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, mlp_ratio=2, image_size=32, patch_size=8)
SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
)


def tiny_branch(kind: str) -> BranchConfig:
    return BranchConfig(
        kind=kind, cross_attention_dim=32, clip_embed_dim=32, clip_hidden_dim=32, dino_dim=32, num_tokens=4,
        num_queries=8, resampler_dim=32, depth=1, heads=2, dim_head=16,
    )


def build_tiny_base(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET)
    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT))
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, scheduler=PNDMScheduler(**SCHEDULER))


def build_tiny_encoders(seed: int = 0) -> tuple[CLIPVisionModelWithProjection, Dinov2Model]:
    torch.manual_seed(seed)
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VISION))
    torch.manual_seed(seed)
    dino = Dinov2Model(Dinov2Config(**DINO))
    return clip.eval(), dino.eval()


def build_tiny_adapter(unet, preservation: str = "flexip_preservation", personalization: str = "flexip_personalization",
                       seed: int = 0) -> FlexIPAdapter:
    """Random adapter whose every branch visibly changes the output (zero-initialised layers made random)."""
    config = AdapterConfig(tiny_branch(preservation), tiny_branch(personalization), cross_attention_layers(unet))
    torch.manual_seed(seed)
    adapter = FlexIPAdapter(config)
    with torch.no_grad():
        for name, param in adapter.named_parameters():
            if param.dim() >= 2 and param.abs().sum() == 0:
                param.normal_(0.0, 0.2)
        for kv in adapter.kv.values():
            for linear in (kv.to_k_pres, kv.to_v_pres, kv.to_k_pers, kv.to_v_pers):
                linear.weight.normal_(0.0, 0.5)
    return adapter.eval()


def write_tiny_models(folder: str | Path, seed: int = 0) -> Path:
    """Write base (diffusers layout), CLIP, DINOv2 and a native adapter file under `folder`."""
    folder = Path(folder)
    base = build_tiny_base(seed)
    tokenizer = save_tiny_tokenizer(folder / "tokenizer_tmp")
    pipe = StableDiffusionPipeline(
        **base, tokenizer=tokenizer, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_pretrained(folder / "base", safe_serialization=True)
    clip, dino = build_tiny_encoders(seed)
    clip.save_pretrained(folder / "image_encoder", safe_serialization=True)
    dino.save_pretrained(folder / "dino", safe_serialization=True)
    save_adapter(build_tiny_adapter(base["unet"], seed=seed), folder / "flexip_adapter.safetensors")
    for leftover in sorted((folder / "tokenizer_tmp").iterdir()):
        leftover.unlink()
    (folder / "tokenizer_tmp").rmdir()
    (folder / "VERSION").write_text(TINY_VERSION)
    logger.info("wrote tiny random models to %s", folder)
    return folder
