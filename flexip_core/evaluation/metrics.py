"""DreamBench metrics (DreamBooth, Ruiz et al., CVPR 2023): CLIP-I and DINO-I for identity, CLIP-T for the prompt.

- CLIP-I: cosine similarity of CLIP image embeddings, generated vs each real photo of the subject (averaged).
- DINO-I: the same with the [CLS] token of self-supervised DINO ViT-S/16 (which, unlike CLIP, separates
  subjects of one class).
- CLIP-T: cosine similarity of the generated image's and the prompt's CLIP embeddings.

The metric models are configurable and load through `flexip_core.loading.sources` like every other model.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from flexip_core.generation.encoders import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from flexip_core.generation.images import prepare_image, square_view

logger = logging.getLogger(__name__)

DINO_RESIZE = 256 / 224  # DINO's evaluation transform: resize to 256, centre-crop 224


@dataclass(frozen=True)
class MetricConfig:
    """Which models score images; the defaults are the ones DreamBench papers report with."""

    clip: str = "openai/clip-vit-large-patch14"  # CLIPModel with both towers (CLIP-I, CLIP-T): Hub id[:sub] or folder
    dino: str = "facebook/dino-vits16"  # DINO ViT-S/16 in transformers' ViTModel layout (DINO-I)
    batch_size: int = 16  # images per encoder pass


def _pixels(images: list[Image.Image], size: int, resize: int, mean, std) -> torch.Tensor:
    """(B, 3, size, size): short side resized to `resize` (bicubic), centre-cropped to `size`, normalised."""
    arrays = []
    for image in images:
        view = square_view(prepare_image(image), resize)
        offset = (resize - size) // 2
        view = view.crop((offset, offset, offset + size, offset + size))
        arrays.append(np.asarray(view, dtype=np.float32) / 255.0)
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, 3, S, S)
    return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(A, B) cosine similarities of the rows of a (A, D) and b (B, D), in float64."""
    return F.normalize(a.double(), dim=-1) @ F.normalize(b.double(), dim=-1).T


class MetricModels:
    """CLIP (image and text towers) and DINO, frozen, with DreamBench's preprocessing."""

    def __init__(self, clip, tokenizer, dino, device: torch.device | str = "cpu", batch_size: int = 16):
        self.device = torch.device(device)
        self.clip = clip.to(self.device).eval().requires_grad_(False)
        self.dino = dino.to(self.device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.clip_size = clip.config.vision_config.image_size
        self.dino_size = dino.config.image_size

    @classmethod
    def load(cls, config: MetricConfig = MetricConfig(), device=None) -> MetricModels:
        """Load both models (fp32: metrics are compared across runs, so no reduced precision)."""
        from transformers import CLIPModel, CLIPTokenizer, ViTModel

        from flexip_core.loading.sources import load_pretrained, offline, split_source

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        clip = load_pretrained(CLIPModel, config.clip, torch.float32, part="clip_metric")
        dino = load_pretrained(ViTModel, config.dino, torch.float32, part="dino_metric", add_pooling_layer=False)
        try:
            if Path(config.clip).expanduser().is_dir():
                tokenizer = CLIPTokenizer.from_pretrained(str(Path(config.clip).expanduser()))
            else:
                repo, sub = split_source(config.clip)
                tokenizer = CLIPTokenizer.from_pretrained(repo, subfolder=sub or "", local_files_only=offline())
        except OSError as error:
            raise ValueError(f"clip metric {config.clip}: no CLIP tokenizer next to the model ({error})") from None
        logger.info("metric models: CLIP %s, DINO %s on %s", config.clip, config.dino, device)
        return cls(clip, tokenizer, dino, device, config.batch_size)

    @torch.no_grad()
    def _batched(self, images: list[Image.Image], run) -> torch.Tensor:
        parts = [run(images[i:i + self.batch_size]) for i in range(0, len(images), self.batch_size)]
        return torch.cat(parts).float().cpu()

    def clip_image(self, images: list[Image.Image]) -> torch.Tensor:
        """(B, E) projected CLIP image embeddings."""
        def run(chunk):
            pixels = _pixels(chunk, self.clip_size, self.clip_size, CLIP_MEAN, CLIP_STD).to(self.device)
            pooled = self.clip.vision_model(pixel_values=pixels).pooler_output  # (b, H)
            return self.clip.visual_projection(pooled)  # (b, E)
        return self._batched(images, run)

    def dino_image(self, images: list[Image.Image]) -> torch.Tensor:
        """(B, D) DINO [CLS] features of the last layer (after its final LayerNorm)."""
        resize = round(self.dino_size * DINO_RESIZE)

        def run(chunk):
            pixels = _pixels(chunk, self.dino_size, resize, IMAGENET_MEAN, IMAGENET_STD).to(self.device)
            return self.dino(pixel_values=pixels).last_hidden_state[:, 0]  # (b, D)
        return self._batched(images, run)

    @torch.no_grad()
    def clip_text(self, texts: list[str]) -> torch.Tensor:
        """(B, E) projected CLIP text embeddings (texts truncated to the text tower's length)."""
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=self.tokenizer.model_max_length,
                                return_tensors="pt").to(self.device)
        pooled = self.clip.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output
        return self.clip.text_projection(pooled).float().cpu()  # (B, E)

    def references(self, photos: list[Image.Image]) -> References:
        """Embed a subject's real photos once; every generated image is scored against them."""
        if not photos:
            raise ValueError("a subject needs at least one reference photo to score against")
        return References(self.clip_image(photos), self.dino_image(photos))

    def score(self, generated: list[Image.Image], references: References,
              prompt: str | list[str]) -> dict[str, list[float]]:
        """Per generated image: clip_i and dino_i (mean over the references) and clip_t (vs its prompt)."""
        prompts = [prompt] * len(generated) if isinstance(prompt, str) else list(prompt)
        if len(prompts) != len(generated):
            raise ValueError(f"got {len(prompts)} prompts for {len(generated)} images")
        clip = self.clip_image(generated)  # (G, E)
        dino = self.dino_image(generated)  # (G, D)
        text = self.clip_text(prompts)  # (G, E)
        return {
            "clip_i": cosine_matrix(clip, references.clip).mean(dim=1).tolist(),
            "dino_i": cosine_matrix(dino, references.dino).mean(dim=1).tolist(),
            "clip_t": torch.diagonal(cosine_matrix(clip, text)).tolist(),
        }


@dataclass(frozen=True)
class References:
    """A subject's real photos, embedded."""

    clip: torch.Tensor  # (R, E) CLIP image embeddings
    dino: torch.Tensor  # (R, D) DINO [CLS] features


def clip_i(models: MetricModels, generated: list[Image.Image], references: list[Image.Image]) -> list[float]:
    """CLIP-I of each generated image: mean cosine similarity to the reference photos."""
    return cosine_matrix(models.clip_image(generated), models.clip_image(references)).mean(dim=1).tolist()


def dino_i(models: MetricModels, generated: list[Image.Image], references: list[Image.Image]) -> list[float]:
    """DINO-I of each generated image: mean cosine similarity of DINO [CLS] features to the references'."""
    return cosine_matrix(models.dino_image(generated), models.dino_image(references)).mean(dim=1).tolist()


def clip_t(models: MetricModels, generated: list[Image.Image], prompts: list[str]) -> list[float]:
    """CLIP-T of each generated image: cosine similarity to its prompt's CLIP text embedding."""
    return torch.diagonal(cosine_matrix(models.clip_image(generated), models.clip_text(prompts))).tolist()
