"""DreamBench metrics (DreamBooth, Ruiz et al., CVPR 2023): CLIP-I and DINO-I for identity, CLIP-T for the prompt.

- CLIP-I: cosine similarity of CLIP image embeddings, generated vs each real photo of the subject (averaged).
- DINO-I: the same with the [CLS] token of self-supervised DINO ViT-S/16 (which, unlike CLIP, separates
  subjects of one class).
- CLIP-T: cosine similarity of the generated image's and the prompt's CLIP embeddings.

Images are prepared by transformers' own image processors (PIL backend): CLIP's from the CLIP model's folder, DINO's
built with DreamBench's transform (bicubic resize of the short side to 256, centre crop 224, ImageNet statistics).
The embeddings equal `CLIPModel.get_image_features` / `get_text_features` and `ViTModel(...).last_hidden_state[:, 0]`
on those inputs (tests/test_metrics_evaluate.py checks it). The metric models are configurable and load through
`flexip_core.loading.sources` like every other model.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.nn import functional as F

from flexip_core.generation.encoders import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from flexip_core.generation.images import prepare_image

logger = logging.getLogger(__name__)

DINO_RESIZE = 256 / 224  # DreamBench's DINO transform: Resize(256, bicubic), CenterCrop(224), for a 224 model


@dataclass(frozen=True)
class MetricConfig:
    """Which models score images; the defaults are the ones DreamBench papers report with."""

    clip: str = "openai/clip-vit-large-patch14"  # CLIPModel with both towers (CLIP-I, CLIP-T): Hub id[:sub] or folder
    dino: str = "facebook/dino-vits16"  # DINO ViT-S/16 in transformers' ViTModel layout (DINO-I)
    batch_size: int = 16  # images per encoder pass


def dreambench_dino_processor(image_size: int = 224):
    """DreamBench's DINO transform as a transformers image processor: short side to 256/224 of the model's input
    size (bicubic), centre crop to the input size, ImageNet mean and standard deviation."""
    from transformers import BitImageProcessorPil

    return BitImageProcessorPil(size={"shortest_edge": round(image_size * DINO_RESIZE)},
                                crop_size={"height": image_size, "width": image_size}, resample=Image.BICUBIC,
                                image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))


def openai_clip_processor(image_size: int = 224):
    """OpenAI CLIP's preprocessing (short side to the input size, bicubic, centre crop, CLIP statistics): what
    `openai/clip-vit-*` ship as their processor, used for a CLIP folder that has none."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                 crop_size={"height": image_size, "width": image_size}, resample=Image.BICUBIC,
                                 image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(A, B) cosine similarities of the rows of a (A, D) and b (B, D), in float64."""
    return F.normalize(a.double(), dim=-1) @ F.normalize(b.double(), dim=-1).T


@dataclass(frozen=True)
class Embeddings:
    """Images embedded by both metric models (a subject's photos, or generated images)."""

    clip: torch.Tensor  # (N, E) projected CLIP image embeddings
    dino: torch.Tensor  # (N, D) DINO [CLS] features


class MetricModels:
    """CLIP (image and text towers) and DINO, frozen, each with its image processor."""

    def __init__(self, clip, tokenizer, dino, device: torch.device | str = "cpu", batch_size: int = 16,
                 clip_processor=None, dino_processor=None):
        """Args:
            clip: a transformers `CLIPModel` (both towers).
            tokenizer: its tokenizer.
            dino: a transformers `ViTModel` holding DINO weights.
            device: where both models run.
            batch_size: images per encoder pass.
            clip_processor: CLIP's image processor (default: OpenAI CLIP's at the model's input size).
            dino_processor: DINO's image processor (default: DreamBench's transform, `dreambench_dino_processor`).
        """
        self.device = torch.device(device)
        self.clip = clip.to(self.device).eval().requires_grad_(False)
        self.dino = dino.to(self.device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.clip_processor = clip_processor or openai_clip_processor(clip.config.vision_config.image_size)
        self.dino_processor = dino_processor or dreambench_dino_processor(dino.config.image_size)

    @classmethod
    def load(cls, config: MetricConfig = MetricConfig(), device=None) -> MetricModels:
        """Load both models (fp32: metrics are compared across runs, so no reduced precision) and CLIP's own
        tokenizer and image processor."""
        from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer, ViTModel

        from flexip_core.loading.sources import load_pretrained

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        clip = load_pretrained(CLIPModel, config.clip, torch.float32, part="clip_metric")
        dino = load_pretrained(ViTModel, config.dino, torch.float32, part="dino_metric", add_pooling_layer=False)
        try:
            tokenizer = _from_source(CLIPTokenizer, config.clip)
        except OSError as error:
            raise ValueError(f"clip metric {config.clip}: no CLIP tokenizer next to the model ({error})") from None
        # The PIL backend on purpose: transformers' default CLIP processor resizes tensors with torchvision when
        # it is installed, which differs slightly from the PIL resize of OpenAI's CLIP and DreamBench.
        try:
            processor = _from_source(CLIPImageProcessorPil, config.clip)
        except OSError:
            logger.info("clip metric %s has no preprocessor_config.json; using OpenAI CLIP's preprocessing",
                        config.clip)
            processor = None
        logger.info("metric models: CLIP %s, DINO %s on %s", config.clip, config.dino, device)
        return cls(clip, tokenizer, dino, device, config.batch_size, clip_processor=processor)

    @torch.no_grad()
    def _batched(self, images: list[Image.Image], processor, run) -> torch.Tensor:
        parts = []
        for i in range(0, len(images), self.batch_size):
            chunk = [prepare_image(image) for image in images[i:i + self.batch_size]]
            pixels = processor(images=chunk, return_tensors="pt").pixel_values.to(self.device)  # (b, 3, S, S)
            parts.append(run(pixels))
        return torch.cat(parts).float().cpu()

    def clip_image(self, images: list[Image.Image]) -> torch.Tensor:
        """(B, E) projected CLIP image embeddings (`CLIPModel.get_image_features`)."""
        def run(pixels):
            pooled = self.clip.vision_model(pixel_values=pixels).pooler_output  # (b, H)
            return self.clip.visual_projection(pooled)  # (b, E)
        return self._batched(images, self.clip_processor, run)

    def dino_image(self, images: list[Image.Image]) -> torch.Tensor:
        """(B, D) DINO [CLS] features of the last layer (after its final LayerNorm)."""
        def run(pixels):
            return self.dino(pixel_values=pixels).last_hidden_state[:, 0]  # (b, D)
        return self._batched(images, self.dino_processor, run)

    @torch.no_grad()
    def clip_text(self, texts: list[str]) -> torch.Tensor:
        """(B, E) projected CLIP text embeddings (`CLIPModel.get_text_features`; texts truncated to the text
        tower's length)."""
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=self.tokenizer.model_max_length,
                                return_tensors="pt").to(self.device)
        pooled = self.clip.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output
        return self.clip.text_projection(pooled).float().cpu()  # (B, E)

    def embed(self, images: list[Image.Image]) -> Embeddings:
        """CLIP and DINO embeddings of the images."""
        return Embeddings(self.clip_image(images), self.dino_image(images))

    def references(self, photos: list[Image.Image]) -> Embeddings:
        """Embed a subject's real photos once; every generated image is scored against them."""
        if not photos:
            raise ValueError("a subject needs at least one reference photo to score against")
        return self.embed(photos)

    def score(self, generated: list[Image.Image], references: Embeddings,
              prompt: str | list[str]) -> dict[str, list[float]]:
        """Per generated image: clip_i and dino_i (mean over the references) and clip_t (vs its prompt)."""
        return self.score_embedded(self.embed(generated), references, prompt)

    def score_embedded(self, generated: Embeddings, references: Embeddings,
                       prompt: str | list[str]) -> dict[str, list[float]]:
        """`score` for images already embedded with `embed` (whose DINO features the caller also uses)."""
        count = len(generated.clip)
        prompts = [prompt] * count if isinstance(prompt, str) else list(prompt)
        if len(prompts) != count:
            raise ValueError(f"got {len(prompts)} prompts for {count} images")
        text = self.clip_text(prompts)  # (G, E)
        return {
            "clip_i": cosine_matrix(generated.clip, references.clip).mean(dim=1).tolist(),
            "dino_i": cosine_matrix(generated.dino, references.dino).mean(dim=1).tolist(),
            "clip_t": torch.diagonal(cosine_matrix(generated.clip, text)).tolist(),
        }


def _from_source(cls, source: str):
    """cls.from_pretrained from the folder or 'repo/id[:subfolder]' a metric model came from."""
    from flexip_core.loading.sources import offline, split_source

    folder = Path(source).expanduser()
    if folder.is_dir():
        return cls.from_pretrained(str(folder))
    repo, sub = split_source(source)
    return cls.from_pretrained(repo, subfolder=sub or "", local_files_only=offline())


def clip_i(models: MetricModels, generated: list[Image.Image], references: list[Image.Image]) -> list[float]:
    """CLIP-I of each generated image: mean cosine similarity to the reference photos."""
    return cosine_matrix(models.clip_image(generated), models.clip_image(references)).mean(dim=1).tolist()


def dino_i(models: MetricModels, generated: list[Image.Image], references: list[Image.Image]) -> list[float]:
    """DINO-I of each generated image: mean cosine similarity of DINO [CLS] features to the references'."""
    return cosine_matrix(models.dino_image(generated), models.dino_image(references)).mean(dim=1).tolist()


def clip_t(models: MetricModels, generated: list[Image.Image], prompts: list[str]) -> list[float]:
    """CLIP-T of each generated image: cosine similarity to its prompt's CLIP text embedding."""
    return torch.diagonal(cosine_matrix(models.clip_image(generated), models.clip_text(prompts))).tolist()
