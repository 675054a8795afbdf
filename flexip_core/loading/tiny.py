"""Tiny random models (fixed seed, config dicts) in the real architectures, written out as real weights are."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    ControlNetModel,
    EulerDiscreteScheduler,
    MotionAdapter,
    PNDMScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    Dinov2Config,
    Dinov2Model,
)

from flexip_core.generation.adapter_config import AdapterConfig, BranchConfig
from flexip_core.generation.adapters import FlexIPAdapter, cross_attention_layers
from flexip_core.loading.tiny_tokenizer import save_tiny_tokenizer
from flexip_core.loading.weights import save_adapter

logger = logging.getLogger(__name__)

TINY_VERSION = "6"  # bump when the configs below change, so cached builds are rebuilt

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
# SDXL in miniature: the same UNet skeleton with SDXL's parts (two text encoders whose penultimate hidden states are
# concatenated into the tokens, SDXL's "text_time" added embedding of the pooled text and the size/crop conditions,
# linear projections, two transformer layers in the inner block as SDXL has several), and SDXL's VAE scaling.
TEXT_2 = dict(TEXT, hidden_size=48, intermediate_size=37, num_attention_heads=4)  # CLIPTextModelWithProjection
SDXL_ADD_TIME_DIM = 8  # addition_time_embed_dim: width of each of the 6 size/crop conditions' embeddings
SDXL_UNET = dict(
    UNET, cross_attention_dim=TEXT["hidden_size"] + TEXT_2["hidden_size"], attention_head_dim=(2, 4),
    use_linear_projection=True, transformer_layers_per_block=(1, 2), addition_embed_type="text_time",
    addition_time_embed_dim=SDXL_ADD_TIME_DIM,
    projection_class_embeddings_input_dim=6 * SDXL_ADD_TIME_DIM + TEXT_2["projection_dim"],
)
SDXL_VAE = dict(VAE, scaling_factor=0.13025, force_upcast=True)
SDXL_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1,
    timestep_spacing="leading",
)
# AnimateDiff's motion modules for the tiny UNet: one per resnet, as the UNet's blocks have (layers_per_block), and one
# in the mid block as AnimateDiff v2 and AnimateLCM have (v3 has none); 32 frames of positional embeddings, as published
MOTION = dict(
    block_out_channels=UNET["block_out_channels"], motion_layers_per_block=UNET["layers_per_block"],
    motion_num_attention_heads=4, motion_norm_num_groups=8, motion_max_seq_length=32, use_motion_mid_block=True,
)
# diffusers' AutoencoderTiny (TAESD) in miniature: the same 8x upsampling (four blocks), 8 channels instead of 64
PREVIEW_VAE = dict(
    encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8), num_encoder_blocks=(1, 1, 1, 1),
    num_decoder_blocks=(1, 1, 1, 1), latent_channels=4,
)
DINO = dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, mlp_ratio=2, image_size=32, patch_size=8)
SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
)


def tiny_branch(kind: str, cross_attention_dim: int = 32) -> BranchConfig:
    """A tiny branch whose tokens are `cross_attention_dim` wide (the UNet's text width: 32, or 80 for SDXL)."""
    return BranchConfig(
        kind=kind, cross_attention_dim=cross_attention_dim, clip_embed_dim=32, clip_hidden_dim=32, dino_dim=32,
        num_tokens=4, num_queries=8, resampler_dim=32, depth=1, heads=2, dim_head=16,
    )


def build_tiny_base(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET)
    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT))
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, scheduler=PNDMScheduler(**SCHEDULER))


def build_tiny_inpainting_unet(seed: int = 0, unet_config: dict | None = None) -> UNet2DConditionModel:
    """The tiny UNet of an inpainting model: 9 input channels (latents, mask, masked-image latents)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(**dict(unet_config or UNET, in_channels=9))


def build_tiny_sdxl_base(seed: int = 0) -> dict:
    """The components of a tiny StableDiffusionXLPipeline (tokenizers aside: `save_tiny_tokenizer` makes them)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SDXL_UNET)
    torch.manual_seed(seed)
    vae = AutoencoderKL(**SDXL_VAE)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT))
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_2))
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER))


def build_tiny_controlnet(unet, seed: int = 0) -> ControlNetModel:
    """A ControlNet copied from `unet` (diffusers' from_unet) that visibly follows its control image: random zero
    convolutions, and a conditioning embedding with He-initialised convolutions and a 30x output (at its default
    initialisation a black and a white control image move the tiny output by about 1e-5)."""
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    generator = torch.Generator().manual_seed(seed)
    embedding = controlnet.controlnet_cond_embedding
    with torch.no_grad():
        for block in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block, embedding.conv_out]:
            block.weight.copy_(torch.randn(block.weight.shape, generator=generator) * 0.3)
        for conv in [embedding.conv_in, *embedding.blocks]:
            fan_in = conv.weight[0].numel()
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * (2 / fan_in) ** 0.5)
        embedding.conv_out.weight.mul_(30.0)
    return controlnet.eval()


def build_tiny_motion_adapter(seed: int = 0) -> MotionAdapter:
    """A random MotionAdapter for the tiny UNet whose temporal attention visibly mixes the frames (its zero-initialised
    output projections made random, so that frames folded into the batch in the wrong order show)."""
    torch.manual_seed(seed)
    adapter = MotionAdapter(**MOTION)
    with torch.no_grad():
        for param in adapter.parameters():
            if param.dim() >= 2 and param.abs().sum() == 0:
                param.normal_(0.0, 0.2)
    return adapter.eval()


def build_tiny_encoders(seed: int = 0) -> tuple[CLIPVisionModelWithProjection, Dinov2Model]:
    torch.manual_seed(seed)
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VISION))
    torch.manual_seed(seed)
    dino = Dinov2Model(Dinov2Config(**DINO))
    return clip.eval(), dino.eval()


def build_tiny_adapter(unet, preservation: str = "flexip_preservation", personalization: str = "flexip_personalization",
                       seed: int = 0) -> FlexIPAdapter:
    """Random adapter whose every branch visibly changes the output (zero-initialised layers made random)."""
    width = unet.config.cross_attention_dim
    config = AdapterConfig(tiny_branch(preservation, width), tiny_branch(personalization, width),
                           cross_attention_layers(unet))
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


def save_base(folder: str | Path, *, unet, vae, text_encoder, tokenizer, scheduler) -> None:
    """A base model in the diffusers StableDiffusionPipeline layout (what profiles' `base` loads)."""
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)


def save_sdxl_base(folder: str | Path, *, tokenizer, pipeline=StableDiffusionXLPipeline, **components) -> None:
    """An SDXL model in the diffusers StableDiffusionXLPipeline layout; both tokenizers are `tokenizer`."""
    pipeline(**components, tokenizer=tokenizer, tokenizer_2=tokenizer).save_pretrained(folder,
                                                                                      safe_serialization=True)


def write_tiny_sdxl_models(folder: str | Path, tokenizer, seed: int = 0) -> Path:
    """Under `folder`: an SDXL base, a 9-channel SDXL inpainting base, an SDXL ControlNet and a native adapter
    sized for the SDXL UNet (the image encoders are the SD1.5 set's, one folder up)."""
    folder = Path(folder)
    base = build_tiny_sdxl_base(seed)
    save_sdxl_base(folder / "base", tokenizer=tokenizer, **base)
    save_sdxl_base(folder / "inpainting", tokenizer=tokenizer, pipeline=StableDiffusionXLInpaintPipeline,
                   **dict(base, unet=build_tiny_inpainting_unet(seed, SDXL_UNET)))
    build_tiny_controlnet(base["unet"], seed).save_pretrained(folder / "controlnet", safe_serialization=True)
    save_adapter(build_tiny_adapter(base["unet"], seed=seed), folder / "flexip_adapter.safetensors")
    return folder


def write_tiny_models(folder: str | Path, seed: int = 0) -> Path:
    """Write base (diffusers layout), CLIP, DINOv2, a native adapter file, a 9-channel inpainting base, a
    ControlNet, an AnimateDiff motion adapter and a preview autoencoder (AutoencoderTiny, in preview_vae/) under
    `folder`, and the same (no motion adapter) for SDXL under `folder`/sdxl."""
    folder = Path(folder)
    base = build_tiny_base(seed)
    tokenizer = save_tiny_tokenizer(folder / "tokenizer_tmp")
    save_base(folder / "base", tokenizer=tokenizer, **base)
    clip, dino = build_tiny_encoders(seed)
    clip.save_pretrained(folder / "image_encoder", safe_serialization=True)
    dino.save_pretrained(folder / "dino", safe_serialization=True)
    save_adapter(build_tiny_adapter(base["unet"], seed=seed), folder / "flexip_adapter.safetensors")
    inpainting = dict(base, unet=build_tiny_inpainting_unet(seed))
    StableDiffusionInpaintPipeline(**inpainting, tokenizer=tokenizer, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False).save_pretrained(folder / "inpainting",
                                                                                  safe_serialization=True)
    build_tiny_controlnet(base["unet"], seed).save_pretrained(folder / "controlnet", safe_serialization=True)
    build_tiny_motion_adapter(seed).save_pretrained(folder / "motion_adapter", safe_serialization=True)
    torch.manual_seed(seed)
    AutoencoderTiny(**PREVIEW_VAE).save_pretrained(folder / "preview_vae", safe_serialization=True)
    write_tiny_sdxl_models(folder / "sdxl", tokenizer, seed)
    for leftover in sorted((folder / "tokenizer_tmp").iterdir()):
        leftover.unlink()
    (folder / "tokenizer_tmp").rmdir()
    (folder / "VERSION").write_text(TINY_VERSION)
    logger.info("wrote tiny random models to %s", folder)
    return folder


# --- synthetic IP-Adapter files in the published layout (h94/IP-Adapter) ---------------------------------
IP_ADAPTER_STEMS = {  # (family, layout) -> published file name without its suffix (models/, sdxl_models/)
    ("sd15", "plain"): "ip-adapter_sd15", ("sd15", "plus"): "ip-adapter-plus_sd15",
    ("sdxl", "plain"): "ip-adapter_sdxl_vit-h", ("sdxl", "plus"): "ip-adapter-plus_sdxl_vit-h",
}
IP_ADAPTER_FILE_NAMES = {  # SD1.5's (layout, format) -> published file name
    (layout, fmt): f"{IP_ADAPTER_STEMS[('sd15', layout)]}.{fmt}" for layout in ("plain", "plus")
    for fmt in ("safetensors", "bin")
}


def synthetic_ip_adapter_state(unet, layout: str, *, clip_embed_dim: int, clip_hidden_dim: int,
                               num_queries: int = 16, heads: int | None = None, resampler_dim: int | None = None,
                               kv_std: float | None = None, seed: int = 0) -> tuple[dict, dict]:
    """Random (image_proj, ip_adapter) dicts with the key names and shapes of the published files, for `unet`.

    Plain: `proj` (4 * C, E) and `norm` (C). Plus: the IP-Adapter repository's `Resampler` (`latents`,
    `proj_in`, 4 x [PerceiverAttention `norm1`, `norm2`, `to_q`, `to_kv`, `to_out`; FeedForward `0` LayerNorm,
    `1` and `3` Linear], `proj_out`, `norm_out`), 64-wide heads. `ip_adapter` holds N.to_k_ip/to_v_ip for every
    cross-attention processor, N its index among all of the UNet's attention processors.
    """
    gen = torch.Generator("cpu").manual_seed(seed)
    width = unet.config.cross_attention_dim  # C: token width
    randn = lambda *shape, std=1.0: torch.randn(*shape, generator=gen) * std
    linear = lambda rows, cols: randn(rows, cols, std=cols ** -0.5)
    norm = lambda dim: (1.0 + randn(dim, std=0.1), randn(dim, std=0.1))
    if layout == "plain":
        weight, bias = norm(width)
        image_proj = {"proj.weight": linear(4 * width, clip_embed_dim), "proj.bias": randn(4 * width, std=0.02),
                      "norm.weight": weight, "norm.bias": bias}
    elif layout == "plus":
        dim = resampler_dim or width  # D: resampler width (published: 768)
        heads = heads or max(1, dim // 64)
        inner = heads * 64
        image_proj = {"latents": randn(1, num_queries, dim, std=dim ** -0.5),
                      "proj_in.weight": linear(dim, clip_hidden_dim), "proj_in.bias": randn(dim, std=0.02)}
        for i in range(4):
            p = f"layers.{i}."
            for name in ("0.norm1", "0.norm2", "1.0"):
                image_proj[p + name + ".weight"], image_proj[p + name + ".bias"] = norm(dim)
            image_proj.update({p + "0.to_q.weight": linear(inner, dim), p + "0.to_kv.weight": linear(2 * inner, dim),
                               p + "0.to_out.weight": linear(dim, inner), p + "1.1.weight": linear(4 * dim, dim),
                               p + "1.3.weight": linear(dim, 4 * dim)})
        image_proj["proj_out.weight"], image_proj["proj_out.bias"] = linear(width, dim), randn(width, std=0.02)
        image_proj["norm_out.weight"], image_proj["norm_out.bias"] = norm(width)
    else:
        raise ValueError(f"layout must be 'plain' or 'plus', got {layout!r}")
    std = kv_std if kv_std is not None else 3.0 * width ** -0.5
    modules = dict(unet.named_modules())
    ip_adapter = {}
    for index, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            inner_width = modules[name.removesuffix(".processor")].to_k.out_features
            ip_adapter[f"{index}.to_k_ip.weight"] = randn(inner_width, width, std=std)
            ip_adapter[f"{index}.to_v_ip.weight"] = randn(inner_width, width, std=std)
    return image_proj, ip_adapter


def write_ip_adapter_file(path: str | Path, image_proj: dict, ip_adapter: dict) -> Path:
    """.safetensors: flat 'image_proj.*' / 'ip_adapter.*' keys; .bin: torch.save of the nested dict."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        flat = {f"image_proj.{k}": v.contiguous() for k, v in image_proj.items()}
        flat.update({f"ip_adapter.{k}": v.contiguous() for k, v in ip_adapter.items()})
        save_file(flat, str(path))
    else:
        torch.save({"image_proj": image_proj, "ip_adapter": ip_adapter}, str(path))
    return path


def write_synthetic_ip_adapter_files(unet, folder: str | Path, *, clip_embed_dim: int, clip_hidden_dim: int,
                                     seed: int = 0, family: str = "sd15", formats=("safetensors", "bin"), **sizes
                                     ) -> dict[tuple[str, str], Path]:
    """The published file names of `family` (plain/Plus x `formats`; SDXL: the ViT-H ones) with random weights for
    `unet`.

    Returns {(layout, format): path}; a file's .safetensors and .bin hold the same tensors.
    """
    folder = Path(folder)
    paths = {}
    for offset, layout in enumerate(("plain", "plus")):
        state = synthetic_ip_adapter_state(unet, layout, clip_embed_dim=clip_embed_dim,
                                           clip_hidden_dim=clip_hidden_dim, seed=seed + offset, **sizes)
        for fmt in formats:
            name = f"{IP_ADAPTER_STEMS[(family, layout)]}.{fmt}"
            paths[(layout, fmt)] = write_ip_adapter_file(folder / name, *state)
    return paths


# --- single-file checkpoints in the original (CompVis / LDM) layout ----------------------------------------
_RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                  "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _unet_prefixes(unet) -> list[tuple[str, str, bool]]:
    """(diffusers prefix, LDM prefix, is a resnet) for every block; the inverse of diffusers'
    `convert_ldm_unet_checkpoint`."""
    cfg, keys = unet.config, unet.state_dict().keys()
    per, blocks = cfg.layers_per_block, len(cfg.block_out_channels)
    out = [("mid_block.resnets.0.", "middle_block.0.", True), ("mid_block.attentions.0.", "middle_block.1.", False),
           ("mid_block.resnets.1.", "middle_block.2.", True)]
    for b in range(blocks):
        for j in range(per):
            out += [(f"down_blocks.{b}.resnets.{j}.", f"input_blocks.{1 + b * (per + 1) + j}.0.", True),
                    (f"down_blocks.{b}.attentions.{j}.", f"input_blocks.{1 + b * (per + 1) + j}.1.", False)]
        out.append((f"down_blocks.{b}.downsamplers.0.conv.", f"input_blocks.{1 + b * (per + 1) + per}.0.op.", False))
        has_attention = any(k.startswith(f"up_blocks.{b}.attentions.") for k in keys)
        for j in range(per + 1):
            out += [(f"up_blocks.{b}.resnets.{j}.", f"output_blocks.{b * (per + 1) + j}.0.", True),
                    (f"up_blocks.{b}.attentions.{j}.", f"output_blocks.{b * (per + 1) + j}.1.", False)]
        slot = 2 if has_attention else 1
        out.append((f"up_blocks.{b}.upsamplers.0.conv.", f"output_blocks.{b * (per + 1) + per}.{slot}.conv.", False))
    return out


def _rename(key: str, prefixes, inner: dict) -> str | None:
    for ours, theirs, renamed in prefixes:
        if key.startswith(ours):
            rest = key[len(ours):]
            if renamed:
                for old, new in inner.items():
                    if rest.startswith(old + "."):
                        rest = new + rest[len(old):]
                        break
            return theirs + rest
    return None


def ldm_state_dict(unet, vae, text_encoder, text_encoder_2=None) -> dict[str, torch.Tensor]:
    """A diffusers SD1.5- or SDXL-architecture model (SDXL: with `text_encoder_2`) as one original-layout state dict
    (what community checkpoints hold): SD1.5's text encoder under cond_stage_model.*, SDXL's two under
    conditioner.embedders.0 (CLIP ViT-L, as in SD1.5) and .1 (OpenCLIP, see `_open_clip_state`)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    out = {}
    top = {**DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"], **DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]}
    prefixes = _unet_prefixes(unet)
    for key, value in unet.state_dict().items():
        name = top.get(key) or _rename(key, prefixes, _RESNET_TO_LDM)
        if name is None:
            raise KeyError(f"no original-layout name for UNet key {key}")
        out["model.diffusion_model." + name] = value
    ups = len(vae.config.up_block_types)
    vae_prefixes = []
    for part in ("encoder", "decoder"):
        vae_prefixes += [(f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", True),
                         (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", True),
                         (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", True)]
    for i in range(len(vae.config.down_block_types)):
        vae_prefixes += [(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.", True),
                         (f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.", False)]
    for i in range(ups):
        vae_prefixes += [(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{ups - 1 - i}.block.", True),
                         (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{ups - 1 - i}.upsample.", False)]
    vae_top = DIFFUSERS_TO_LDM_MAPPING["vae"]
    for key, value in vae.state_dict().items():
        name = vae_top.get(key)
        if name is None:
            name = _rename(key, vae_prefixes, {})
            if name is None:
                raise KeyError(f"no original-layout name for VAE key {key}")
            name = name.replace("conv_shortcut", "nin_shortcut")
            if ".attn_1." in name:
                head, _, rest = name.partition(".attn_1.")
                for old, new in _VAE_ATTENTION_TO_LDM.items():
                    if rest.startswith(old + "."):
                        rest = new + rest[len(old):]
                        break
                name = f"{head}.attn_1.{rest}"
                if value.ndim == 2:
                    value = value[:, :, None, None]  # 1x1 convolutions in the original
        out["first_stage_model." + name] = value
    first = "cond_stage_model." if text_encoder_2 is None else "conditioner.embedders.0."
    for key, value in text_encoder.state_dict().items():  # transformers 5 drops the 'text_model.' prefix
        out[first + "transformer.text_model." + key.removeprefix("text_model.")] = value
    if text_encoder_2 is not None:
        out.update(_open_clip_state(text_encoder_2, "conditioner.embedders.1.model."))
    return {k: v.contiguous() for k, v in out.items()}


_CLIP_TO_OPEN_CLIP = {"self_attn.out_proj.": "attn.out_proj.", "layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.",
                      "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj."}


def _open_clip_state(model, prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModelWithProjection in OpenCLIP's layout (SDXL's second text encoder): q, k, v fused
    into in_proj, `text_projection` transposed; the inverse of diffusers' `convert_open_clip_checkpoint`."""
    state = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
    out = {prefix + "positional_embedding": state.pop("embeddings.position_embedding.weight"),
           prefix + "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
           prefix + "ln_final.weight": state.pop("final_layer_norm.weight"),
           prefix + "ln_final.bias": state.pop("final_layer_norm.bias"),
           prefix + "text_projection": state.pop("text_projection.weight").T}  # (hidden, projection)
    for i in range(model.config.num_hidden_layers):
        ours, theirs = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [state.pop(f"{ours}self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")]
            out[f"{theirs}attn.in_proj_{kind}"] = torch.cat(qkv)  # (3 * hidden, hidden) or (3 * hidden,)
        for key in [k for k in state if k.startswith(ours)]:
            rest = key[len(ours):]
            for old, new in _CLIP_TO_OPEN_CLIP.items():
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            else:
                raise KeyError(f"no OpenCLIP name for text encoder key {key}")
            out[theirs + rest] = state.pop(key)
    state.pop("embeddings.position_ids", None)
    if state:
        raise KeyError(f"no OpenCLIP name for text encoder keys {', '.join(sorted(state))}")
    return out


def write_single_file_checkpoint(base_folder: str | Path, path: str | Path) -> Path:
    """The diffusers model in `base_folder` (SD1.5 or SDXL) as one .safetensors or .ckpt file in the original
    layout."""
    base_folder, path = Path(base_folder), Path(path)
    unet = UNet2DConditionModel.from_pretrained(base_folder, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(base_folder, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(base_folder, subfolder="text_encoder")
    text_encoder_2 = None
    if (base_folder / "text_encoder_2").is_dir():
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(base_folder, subfolder="text_encoder_2")
    state = ldm_state_dict(unet, vae, text_encoder, text_encoder_2)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, str(path))
    return path


def write_lora(unet, path: str | Path, rank: int = 4, std: float = 0.3, seed: int = 0) -> Path:
    """A random LoRA on the UNet's attention projections, saved by diffusers' save_lora_weights."""
    import copy

    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    path = Path(path)
    model = copy.deepcopy(unet)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, std)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
    StableDiffusionPipeline.save_lora_weights(path.parent, unet_lora_layers=layers, weight_name=path.name)
    return path
