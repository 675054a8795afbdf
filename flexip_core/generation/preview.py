"""Previews of SD1.5 and SDXL latents: diffusers' AutoencoderTiny (TAESD, madebyollin/taesd and taesdxl) when a
profile names one, else a fixed linear latent->RGB projection per family, no extra model."""
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
    rgb = (_projected(latents, family).permute(0, 2, 3, 1) + 1.0) * 127.5  # (B, h, w, 3)
    return [Image.fromarray(np.ascontiguousarray(frame)) for frame in rgb.clamp(0, 255).to(torch.uint8).numpy()]


def _projected(latents: torch.Tensor, family: str) -> torch.Tensor:
    """(B, 4, h, w) latents -> (B, 3, h, w) RGB in about [-1, 1] by the family's linear projection, on the CPU."""
    return torch.einsum("bchw,cr->brhw", latents.detach().float().cpu()[:, :4], LATENT_RGB[family])


class PreviewDecoder:
    """Step previews and fast decodes of a pipeline's latents: its tiny autoencoder (TAESD: full-size images from a
    ~1 M-parameter decoder) when it has one, else the linear projection."""

    def __init__(self, family: str = "sd15", autoencoder=None, scale: int = 8):
        if family not in LATENT_RGB:
            raise ValueError(f"no preview factors for model family {family!r}; one of {', '.join(LATENT_RGB)}")
        self.family = family
        self.autoencoder = autoencoder  # diffusers AutoencoderTiny on the pipeline's device, or None
        self.scale = scale  # the VAE's pixels per latent (8): the linear projection's fast decode is upsampled by it

    @property
    def kind(self) -> str:
        return "tiny autoencoder" if self.autoencoder is not None else "linear projection"

    @torch.no_grad()
    def _tiny(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, 4, h, w) latents -> (B, 3, 8h, 8w) in [0, 1] through the tiny autoencoder."""
        vae = self.autoencoder
        # TAESD reads the latents as the UNet sees them: its scaling_factor is 1 (diffusers' own decode formula)
        images = vae.decode(latents[:, :4].to(vae.device, vae.dtype) / vae.config.scaling_factor).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)  # (B, 3, H, W)

    def previews(self, latents: torch.Tensor) -> list[Image.Image]:
        """B preview images: full size from the tiny autoencoder, latent size (h x w) from the linear projection."""
        if self.autoencoder is None:
            return latents_to_previews(latents, self.family)
        rgb = (self._tiny(latents) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
        return [Image.fromarray(np.ascontiguousarray(frame)) for frame in rgb]

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """(B, 4, h, w) latents -> (B, 8h, 8w, 3) floats in [0, 1], fast: the tiny autoencoder, else the linear
        projection upsampled (bilinear) to the image size."""
        if self.autoencoder is not None:
            return self._tiny(latents).permute(0, 2, 3, 1).cpu().numpy()
        rgb = torch.nn.functional.interpolate(_projected(latents, self.family), scale_factor=self.scale,
                                              mode="bilinear", align_corners=False)
        return ((rgb + 1.0) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()  # (B, H, W, 3)
