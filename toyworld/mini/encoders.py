"""FlexIP-mini's frozen image encoders: a pretrained mini DINOv2 and a random 8 px CLIP.

The real FlexIP stands on pretrained encoders whose pooled features already tell objects apart. A random ViT
does not: its patch tokens hold the picture, but pooled they give colour and little else (a linear probe of
mean-pooled random tokens reads shape 45% and pattern 32% of held-out subjects), and the adapters, trained only
through the diffusion loss, then learn colour alone. So the mini DINOv2 is pretrained on renders of training
subjects in training scenes to read every attribute from its mean patch token (the stand-in for DINOv2's
self-supervised pretraining), then frozen as the real one is. CLIP stays random and sees 8 px (colour and rough
layout), so the personalization branch cannot carry the whole identity.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, Dinov2Config, Dinov2Model

from flexip_core.generation.encoders import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from toyworld import world as tw

from . import models, world

logger = logging.getLogger(__name__)

ATTRIBUTES = {**tw.IDENTITY_ATTRIBUTES, **tw.EDITABLE_ATTRIBUTES}  # name -> values, identity first


@dataclass(frozen=True)
class EncoderConfig:
    """Pretraining of the mini DINOv2 (defaults: the shipped build)."""

    seed: int = 0
    images: int = 6000  # renders of training subjects in training scenes (a third of them cut out)
    steps: int = 1500  # AdamW steps
    batch: int = 64
    lr: float = 1e-3


def sample_items(n: int, seed: int, split: str) -> list[tuple[tw.Subject, tw.Scene]]:
    """n (subject, scene) pairs of a split ('train' or 'heldout'): subjects and scenes from it, a third of them
    cut out on the neutral background as invariant references are."""
    rng = np.random.default_rng((seed, 31))
    scenes = world.scenes_in("train" if split == "train" else "heldout")
    items = []
    for subject in tw.sample_subjects(n, seed, split):
        scene = scenes[rng.integers(len(scenes))]
        items.append((subject, tw.cutout_scene(scene) if rng.random() < 1 / 3 else scene))
    return items


def dino_pixels(items: list[tuple[tw.Subject, tw.Scene]]) -> torch.Tensor:
    """(N, 3, S, S) DINOv2 input, preprocessed exactly as the pipeline and the trainer do it."""
    preprocess = Preprocess(models.DINO["image_size"], IMAGENET_MEAN, IMAGENET_STD)
    return preprocess([tw.render(subject, scene, world.NATIVE_SIZE) for subject, scene in items])


def attribute_labels(items: list[tuple[tw.Subject, tw.Scene]]) -> torch.Tensor:
    """(N, A) index of each attribute's value, attributes in ATTRIBUTES order."""
    return torch.tensor([[values.index(getattr(subject if name in tw.IDENTITY_ATTRIBUTES else scene, name))
                          for name, values in ATTRIBUTES.items()] for subject, scene in items])


class _Readout(nn.Module):
    """One linear head per attribute over the mean patch token (what the pretraining asks to be readable)."""

    def __init__(self, width: int):
        super().__init__()
        self.heads = nn.ModuleList([nn.Linear(width, len(values)) for values in ATTRIBUTES.values()])

    def forward(self, dino: Dinov2Model, pixels: torch.Tensor) -> list[torch.Tensor]:
        pooled = dino(pixels).last_hidden_state[:, 1:].mean(1)  # (B, D): the patch tokens the adapter reads
        return [head(pooled) for head in self.heads]


def pretrain_dino(config: EncoderConfig) -> tuple[Dinov2Model, dict[str, float]]:
    """The pretrained mini DINOv2 and its readout accuracy per attribute on held-out subjects in held-out scenes."""
    torch.manual_seed(config.seed)
    dino = Dinov2Model(Dinov2Config(**models.DINO))
    readout = _Readout(dino.config.hidden_size)
    items = sample_items(config.images, config.seed, "train")
    pixels, labels = dino_pixels(items), attribute_labels(items)
    params = [*dino.parameters(), *readout.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=config.steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(config.seed)
    dino.train()
    for step in range(config.steps):
        index = torch.randint(0, len(items), (config.batch,), generator=generator)
        logits = readout(dino, pixels[index])
        loss = sum(F.cross_entropy(out, labels[index, k]) for k, out in enumerate(logits)) / len(logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == config.steps - 1:
            logger.info("dino pretraining step %d/%d loss %.4f", step + 1, config.steps, loss.item())
    dino.eval().requires_grad_(False)
    held = sample_items(400, config.seed + 1, "heldout")
    with torch.no_grad():
        logits = readout(dino, dino_pixels(held))
    truth = attribute_labels(held)
    scores = {name: round(float((out.argmax(1) == truth[:, k]).float().mean()), 3)
              for k, (name, out) in enumerate(zip(ATTRIBUTES, logits))}
    logger.info("mini DINOv2 readout on held-out subjects and scenes: %s", scores)
    return dino, scores


def random_clip(seed: int) -> CLIPVisionModelWithProjection:
    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**models.CLIP_VISION))
