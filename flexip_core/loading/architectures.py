"""The real model architectures as config dicts (SD1.5, SDXL, AnimateDiff, OpenCLIP ViT-H/14, DINOv2-L, IP-Adapter).

Copied from the published config files (stable-diffusion-v1-5/stable-diffusion-v1-5,
stabilityai/stable-diffusion-xl-base-1.0, h94/IP-Adapter models/image_encoder, facebook/dinov2-large), so that
benchmarks and tests can build random models of the true sizes without the Hub. Building one never downloads anything.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from flexip_core.generation.adapter_config import BranchConfig

SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # diffusers layout: model config, tokenizer, weights
SDXL_REPO = "stabilityai/stable-diffusion-xl-base-1.0"  # the same for SDXL (two text encoders and tokenizers)

# stable-diffusion-v1-5 unet/config.json (UNet2DConditionModel)
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
# stable-diffusion-xl-base-1.0 unet/config.json (UNet2DConditionModel): 70 cross-attention layers, 2048-wide tokens
# (CLIP ViT-L's 768 and OpenCLIP bigG's 1280 side by side), the pooled bigG text and 6 size/crop numbers added to
# the time embedding (2816 = 1280 + 6 * 256)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, addition_embed_type="text_time",
    addition_embed_type_num_heads=64, addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
# stable-diffusion-v1-5 vae/config.json (AutoencoderKL)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, act_fn="silu",
    norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
)
# stable-diffusion-v1-5 text_encoder/config.json (transformers CLIPTextConfig; OpenAI CLIP ViT-L/14 text tower)
SD15_TEXT_ENCODER = dict(
    hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, max_position_embeddings=77,
    vocab_size=49408, hidden_act="quick_gelu", projection_dim=768, layer_norm_eps=1e-5, bos_token_id=0,
    eos_token_id=2, pad_token_id=1,
)
# stable-diffusion-v1-5 scheduler/scheduler_config.json (PNDMScheduler)
SD15_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, clip_sample=False,
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
)
# stable-diffusion-xl-base-1.0 vae/config.json (AutoencoderKL): SD1.5's VAE with SDXL's scaling; force_upcast, as it
# overflows in fp16 at 1024 px (diffusers' SDXL pipelines, and FlexIP's decoder, decode it in fp32)
SDXL_VAE = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
# stable-diffusion-xl-base-1.0 text_encoder/config.json: the same CLIP ViT-L/14 text tower as SD1.5's
SDXL_TEXT_ENCODER = SD15_TEXT_ENCODER
# stable-diffusion-xl-base-1.0 text_encoder_2/config.json (CLIPTextModelWithProjection; OpenCLIP ViT-bigG/14 text)
SDXL_TEXT_ENCODER_2 = dict(
    hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, max_position_embeddings=77,
    vocab_size=49408, hidden_act="gelu", projection_dim=1280, layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2,
    pad_token_id=1,
)
# stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json (EulerDiscreteScheduler; the keys it takes)
SDXL_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    prediction_type="epsilon", interpolation_type="linear", use_karras_sigmas=False, timestep_spacing="leading",
    steps_offset=1,
)
# The architecture of guoyww/animatediff-motion-adapter-v1-5-3 (MotionAdapter; AnimateDiff v3, from its checkpoint's
# layout, not its config file): two motion modules per block of SD1.5's UNet (one per resnet), none in the mid block,
# 8 heads, positional embeddings for 32 frames
SD15_MOTION_ADAPTER = dict(
    block_out_channels=(320, 640, 1280, 1280), motion_layers_per_block=2, motion_mid_block_layers_per_block=1,
    motion_num_attention_heads=8, motion_norm_num_groups=32, motion_max_seq_length=32, use_motion_mid_block=False,
)
# h94/IP-Adapter models/image_encoder/config.json (CLIPVisionModelWithProjection; OpenCLIP ViT-H/14)
VIT_H14_VISION = dict(
    hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32, image_size=224,
    patch_size=14, projection_dim=1024, hidden_act="gelu", layer_norm_eps=1e-5,
)
# facebook/dinov2-large config.json (Dinov2Model)
DINOV2_LARGE = dict(
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4, image_size=518, patch_size=14,
    layerscale_value=1.0, hidden_act="gelu", layer_norm_eps=1e-6, use_swiglu_ffn=False,
)
# The two published SD1.5 IP-Adapter projections, as FlexIP branch configs
IP_ADAPTER_SD15 = BranchConfig(kind="ip_adapter", cross_attention_dim=768, clip_embed_dim=1024, num_tokens=4)
IP_ADAPTER_PLUS_SD15 = BranchConfig(
    kind="ip_adapter_plus", cross_attention_dim=768, clip_hidden_dim=1280, num_queries=16, resampler_dim=768,
    depth=4, heads=12, dim_head=64,
)

# The two published SDXL IP-Adapters for the ViT-H/14 encoder (sdxl_models/ip-adapter_sdxl_vit-h and
# ip-adapter-plus_sdxl_vit-h): 2048-wide tokens; the Plus resampler is 1280 wide with 20 heads
IP_ADAPTER_SDXL_VIT_H = BranchConfig(kind="ip_adapter", cross_attention_dim=2048, clip_embed_dim=1024, num_tokens=4)
IP_ADAPTER_PLUS_SDXL_VIT_H = BranchConfig(
    kind="ip_adapter_plus", cross_attention_dim=2048, clip_hidden_dim=1280, num_queries=16, resampler_dim=1280,
    depth=4, heads=20, dim_head=64,
)
# Per model family: the diffusers repository whose configs and tokenizers a single-file checkpoint is read with,
# and its UNet's config (the cross-attention layout an adapter is sized for, known without any download)
FAMILY_REPOS = {"sd15": SD15_REPO, "sdxl": SDXL_REPO}
FAMILY_UNETS = {"sd15": SD15_UNET, "sdxl": SDXL_UNET}


def build_sd15(device=None, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """Random unet, vae, text_encoder and scheduler in the SD1.5 architecture (initialised on `device`)."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device(device or "cpu"):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER))
    parts = dict(unet=unet, vae=vae, text_encoder=text_encoder)
    parts = {name: model.to(dtype).eval().requires_grad_(False) for name, model in parts.items()}
    return dict(parts, scheduler=PNDMScheduler.from_config(SD15_SCHEDULER))


def build_motion_adapter(device=None, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A random AnimateDiff MotionAdapter of the v1-5-3 architecture, created on `device` in `dtype`."""
    from diffusers import MotionAdapter

    with _created_on(device, dtype):
        torch.manual_seed(seed)
        adapter = MotionAdapter(**SD15_MOTION_ADAPTER)
    return adapter.to(dtype).eval().requires_grad_(False)


def build_vit_h14(device=None, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A random OpenCLIP ViT-H/14 vision tower with projection (the IP-Adapter image encoder's architecture)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.device(device or "cpu"):
        torch.manual_seed(seed)
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_H14_VISION))
    return model.to(dtype).eval().requires_grad_(False)


@contextmanager
def _created_on(device, dtype: torch.dtype):
    """Parameters created inside start on `device` in `dtype` (no float32 copy built first and cast down)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device or "cpu"):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_sdxl(device=None, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """Random unet, vae, text_encoder, text_encoder_2 and scheduler in the SDXL base 1.0 architecture, created on
    `device` in `dtype` (the keys of `tiny.build_tiny_sdxl_base`; tokenizers aside)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with _created_on(device, dtype):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**SDXL_UNET)
        vae = AutoencoderKL(**SDXL_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_ENCODER))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODER_2))
    parts = dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2)
    parts = {name: model.to(dtype).eval().requires_grad_(False) for name, model in parts.items()}
    return dict(parts, scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER))
