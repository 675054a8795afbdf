"""Image encoders (CLIP ViT-H/14 and DINOv2 in transformers) with per-photo caching by content."""
from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from flexip_core.generation.adapters import ImageFeatures
from flexip_core.generation.images import prepare_image, square_view

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """How a photo becomes encoder input."""

    size: int  # square side the encoder sees, in pixels
    mean: tuple[float, float, float]  # per-channel normalisation mean
    std: tuple[float, float, float]  # per-channel normalisation std
    aspect: str = "crop"  # "crop": centre square; "pad": whole photo padded to a square

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        arrays = [np.asarray(square_view(im, self.size, self.aspect), dtype=np.float32) / 255.0 for im in images]
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, 3, S, S)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (pixels - mean) / std


@dataclass(frozen=True)
class SubjectEmbedding:
    """One subject's photos as a set: the [CLS] embedding by their weighted mean, token features kept per photo."""

    features: ImageFeatures  # clip_embeds (1, E) weighted mean; clip_hidden (P, 1+S, H) and dino (P, S, D) per photo
    uncond: ImageFeatures  # (1, ...) features standing for "no image"
    key: str  # content hash of the photos and weights: equal subjects have equal keys, in any order
    num_images: int  # how many photos were given
    photo_weights: tuple[float, ...] = (1.0,)  # per distinct photo kept (P), summing to 1: how much each one counts


def content_hash(image: Image.Image) -> str:
    digest = hashlib.sha256(f"{image.mode}{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


class SubjectEncoder:
    """Runs CLIP (and DINOv2 when an adapter needs it) once per distinct photo per process."""

    def __init__(self, clip, clip_preprocess: Preprocess, dino=None, dino_preprocess: Preprocess | None = None,
                 needs: frozenset[str] = frozenset({"clip_embeds"}), cache_size: int = 256):
        if "dino" in needs and dino is None:
            raise ValueError("an adapter needs DINOv2 features but no DINOv2 encoder was given")
        self.clip, self.clip_preprocess = clip, clip_preprocess
        self.dino, self.dino_preprocess = dino, dino_preprocess
        self.needs = needs
        self.cache_size = cache_size
        self.calls = 0  # encoder passes over subject photos so far (tests and benchmarks count these)
        self.score_calls = 0  # passes over generated images, for identity scores
        self._cache: OrderedDict[str, ImageFeatures] = OrderedDict()
        self._uncond: ImageFeatures | None = None
        self._lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        return next(self.clip.parameters()).device

    @torch.no_grad()
    def _run(self, clip_pixels: torch.Tensor, dino_pixels: torch.Tensor | None, zero_embeds: bool) -> ImageFeatures:
        self.calls += 1
        dtype = next(self.clip.parameters()).dtype
        out = self.clip(clip_pixels.to(self.device, dtype), output_hidden_states="clip_hidden" in self.needs)
        embeds = out.image_embeds.float().cpu()  # (B, E)
        hidden = out.hidden_states[-2].float().cpu() if "clip_hidden" in self.needs else None  # (B, 1+P, H)
        dino = None
        if dino_pixels is not None:
            dino_dtype = next(self.dino.parameters()).dtype
            dino_out = self.dino(dino_pixels.to(self.device, dino_dtype))
            dino = dino_out.last_hidden_state[:, 1:].float().cpu()  # (B, P, D): patch tokens without [CLS]
        return ImageFeatures(torch.zeros_like(embeds) if zero_embeds else embeds, hidden, dino)

    def features_from_pixels(self, clip_pixels: torch.Tensor, dino_pixels: torch.Tensor | None = None) -> ImageFeatures:
        """Uncached features (B, ...) of a batch already run through clip_preprocess / dino_preprocess (training)."""
        return self._run(clip_pixels, dino_pixels if "dino" in self.needs else None, zero_embeds=False)

    def _encode_one(self, image: Image.Image) -> ImageFeatures:
        key = content_hash(image)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
            dino_pixels = self.dino_preprocess([image]) if "dino" in self.needs else None
            features = self._run(self.clip_preprocess([image]), dino_pixels, zero_embeds=False)
            self._cache[key] = features
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return features

    def uncond(self) -> ImageFeatures:
        """diffusers' convention: zero [CLS] embeddings, hidden states of an all-zero input."""
        with self._lock:
            if self._uncond is None:
                zeros = torch.zeros(1, 3, self.clip_preprocess.size, self.clip_preprocess.size)
                dino_zeros = None
                if "dino" in self.needs:
                    dino_zeros = torch.zeros(1, 3, self.dino_preprocess.size, self.dino_preprocess.size)
                self._uncond = self._run(zeros, dino_zeros, zero_embeds=True)
            return self._uncond

    def encode_subject(self, images: list[Image.Image], weights: list[float] | None = None) -> SubjectEmbedding:
        """Encode each photo (cached) and combine them as a set (spec: Encoders).

        The [CLS] embeddings, which have no positions, are averaged with the weights; patch and hidden-state tokens
        stay per photo (as diffusers keeps each IP-Adapter image's tokens), and the pipeline weighs each photo's
        tokens in attention. The same photo twice counts once with the weights added; weight 0 leaves a photo out;
        the order of the photos does not matter.
        """
        if images is None or len(images) == 0:
            raise ValueError("no subject photos given; pass at least one PIL image")
        images = [prepare_image(im, f"subject photo {i + 1}") for i, im in enumerate(images)]
        weights = _check_weights(weights, len(images))
        distinct: dict[str, tuple[Image.Image, float]] = {}
        for image, weight in zip(images, weights):
            if weight > 0:
                key = content_hash(image)
                distinct[key] = (image, distinct.get(key, (image, 0.0))[1] + weight)
        keys = sorted(distinct)  # a fixed order: permutations of the photos give the same subject
        total = sum(distinct[k][1] for k in keys)
        shares = tuple(distinct[k][1] / total for k in keys)
        per_photo = [self._encode_one(distinct[k][0]) for k in keys]
        w = torch.tensor(shares, dtype=torch.float32).view(-1, 1)  # (P, 1)
        embeds = (torch.cat([f.clip_embeds for f in per_photo]) * w).sum(0, keepdim=True)  # (1, E)
        hidden = torch.cat([f.clip_hidden for f in per_photo]) if per_photo[0].clip_hidden is not None else None
        dino = torch.cat([f.dino for f in per_photo]) if per_photo[0].dino is not None else None
        digest = hashlib.sha256()
        for key, share in zip(keys, shares):
            digest.update(f"{key}:{share:.6g}".encode())
        return SubjectEmbedding(ImageFeatures(embeds, hidden, dino), self.uncond(), digest.hexdigest()[:16],
                                len(images), shares)

    @torch.no_grad()
    def image_embeds(self, images: list[Image.Image]) -> torch.Tensor:
        """Projected CLIP [CLS] embeddings (B, E) of generated images, uncached (for identity scores)."""
        self.score_calls += 1
        pixels = self.clip_preprocess([prepare_image(im) for im in images])
        dtype = next(self.clip.parameters()).dtype
        return self.clip(pixels.to(self.device, dtype)).image_embeds.float().cpu()


def _check_weights(weights, count: int) -> list[float]:
    if weights is None:
        return [1.0] * count
    weights = list(weights)
    if len(weights) != count:
        raise ValueError(f"got {len(weights)} photo weights for {count} photos; give one weight per photo or none")
    for value in weights:
        if not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
            raise ValueError(f"photo weights must be finite numbers >= 0, got {value!r}")
    if sum(weights) <= 0:
        raise ValueError("photo weights must not all be 0")
    return [float(v) for v in weights]
