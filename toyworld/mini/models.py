"""FlexIP-mini model sizes (config dicts, as in flexip_core.loading.tiny) and its word-level CLIP tokenizer."""
from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTokenizer

from flexip_core.loading.tiny import SCHEDULER as SD15_SCHEDULER
from flexip_core.loading.tiny_tokenizer import _bytes_to_unicode, _merge
from toyworld import world as tw

# 64 px images -> 8 x 8 x 32 latents (4 VAE levels: 8x down). The VAE decoder draws edges and patterns; the UNet
# only places codes on an 8 x 8 grid: convolutions at 8, convolutions and attention at 4 and in the middle block,
# where text and both adapter branches enter through the cross-attention layers.
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=32, block_out_channels=(16, 32, 64, 64), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8,
    sample_size=64, mid_block_add_attention=False,
)
LATENT_CELL = 2 ** (len(VAE["block_out_channels"]) - 1)  # px per latent cell side (8)
UNET = dict(
    sample_size=8, in_channels=32, out_channels=32, layers_per_block=1, block_out_channels=(64, 128),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32,
)
TEXT = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
            max_position_embeddings=77, projection_dim=64)  # vocab and special ids come from the tokenizer
# Frozen random image encoders. CLIP sees the reference at 8 px (colour and rough layout survive, shape and
# pattern do not), so the personalization branch, fed by CLIP alone, cannot carry the whole identity;
# DINOv2 sees 32 px in 4 px patches (everything survives), so the preservation branch can.
CLIP_VISION = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2, image_size=8,
                   patch_size=4, projection_dim=32)
DINO = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, mlp_ratio=2, image_size=32, patch_size=4)
# SD1.5's betas rescaled to zero terminal SNR, v-prediction, trailing timesteps (Lin et al. 2023): at t = T the
# model sees pure noise in training as in sampling, so background, size and place come from the prompt; with
# SD1.5's own schedule a tiny latent leaks its mean colour at t = T, and the model learns to read it from the noise.
SCHEDULER = dict(
    **{k: SD15_SCHEDULER[k] for k in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps")},
    prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=False,
    set_alpha_to_one=False,
)
MAX_TOKENS = 32  # the longest world caption is 20 tokens with its start and end tokens
ADAPTER_SIZES = dict(num_tokens=4, num_queries=8, resampler_dim=64, depth=1, heads=4, dim_head=16)

WORDS = sorted(tw.CAPTION_WORDS)


def save_mini_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """A CLIP BPE tokenizer in which every word of the toy world's captions is one token (byte fallback otherwise)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    words = [list(w[:-1]) + [w[-1] + "</w>"] for w in WORDS]
    while any(len(w) > 1 for w in words):  # merge left to right until every world word is a single symbol
        word = next(w for w in words if len(w) > 1)
        a, b = word[0], word[1]
        if f"{a} {b}" not in merges:
            merges.append(f"{a} {b}")
            if a + b not in vocab:
                vocab.append(a + b)
        words = [_merge(w, a, b) for w in words]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"),
                              model_max_length=MAX_TOKENS)
    tokenizer.save_pretrained(folder)
    return tokenizer
