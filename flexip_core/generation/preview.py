"""Cheap previews of SD1.5 and SDXL latents: a fixed linear latent->RGB projection per family, no extra model."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

# Least-squares fits of each family's VAE latents (as the UNet sees them, scaled) to RGB, rows: latent channels.
# SD1.5: the widely used community coefficients; SDXL: ComfyUI's (comfy/latent_formats.py, class SDXL), since SDXL's
# VAE arranges colour differently (channel 0 is brightness) and SD1.5's factors tint its previews.
LATENT_RGB = {
    "sd15": torch.tensor(
        [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]]),
    "sdxl": torch.tensor(
        [[0.3920, 0.4054, 0.4549], [-0.2634, -0.0196, 0.0653], [0.0568, 0.1687, -0.0755], [-0.3112, -0.2359, -0.2076]]),
}


def latents_to_previews(latents: torch.Tensor, family: str = "sd15") -> list[Image.Image]:
    """(B, 4, h, w) latents of the model family `family` ("sd15" or "sdxl") -> B small RGB images (h x w)."""
    if family not in LATENT_RGB:
        raise ValueError(f"no preview factors for model family {family!r}; one of {', '.join(LATENT_RGB)}")
    rgb = torch.einsum("bchw,cr->bhwr", latents.detach().float().cpu()[:, :4], LATENT_RGB[family])  # (B, h, w, 3)
    rgb = ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    return [Image.fromarray(np.ascontiguousarray(frame)) for frame in rgb]
