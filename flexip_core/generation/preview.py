"""Cheap previews of SD1.5 latents: a fixed linear latent->RGB projection, no extra model."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

# Least-squares fit of SD1.5 VAE latents to RGB (widely used community coefficients), rows: latent channels.
LATENT_RGB = torch.tensor(
    [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]]
)


def latents_to_previews(latents: torch.Tensor) -> list[Image.Image]:
    """(B, 4, h, w) latents -> B small RGB images (h x w)."""
    rgb = torch.einsum("bchw,cr->bhwr", latents.detach().float().cpu()[:, :4], LATENT_RGB)  # (B, h, w, 3)
    rgb = ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    return [Image.fromarray(np.ascontiguousarray(frame)) for frame in rgb]
