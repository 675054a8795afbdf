"""Training FlexIP-mini's base text-to-image model on the toy world: a small AutoencoderKL (8x down), then a CLIP
text encoder and UNet2DConditionModel trained together with the v-prediction loss on a zero-terminal-SNR schedule
(Lin et al. 2023) with Min-SNR weighting (Hang et al. 2023), shipped as the exponential moving average."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from PIL import Image
from torch.nn import functional as F
from transformers import CLIPTextConfig, CLIPTextModel

from toyworld import world as tw
from toyworld.oracle import identity_score, prompt_score

from . import models, world

logger = logging.getLogger(__name__)

N_CODE = len(tw.PATTERNS)  # last latent channels holding the pattern code, one per pattern


@dataclass(frozen=True)
class BaseConfig:
    """Sizes and schedule of the base-model stages (defaults: the shipped build)."""

    seed: int = 0  # seeds every draw of both stages
    vae_images: int = 1536  # distinct renders the VAE trains on
    vae_steps: int = 3600  # VAE optimizer steps
    vae_batch: int = 16  # VAE batch size
    vae_crop: int = 32  # side of the random crops the VAE trains on (64: whole renders)
    vae_lr: float = 2e-3  # VAE AdamW learning rate
    vae_kl: float = 1e-6  # weight of the KL term (near-deterministic latents)
    decoder_steps: int = 600  # decoder-only steps on whole renders (encoder frozen: latents do not change)
    decoder_batch: int = 8  # batch size of those steps
    decoder_lr: float = 1e-3  # their AdamW learning rate
    pattern_code: float = 6.0  # amplitude of the pattern's code on the last latent channels (0: no code)
    pattern_code_weight: float = 10.0  # weight of the encoder's code error (over the amplitude squared)
    pattern_swap: float = 0.5  # share of VAE samples decoded from another pattern's latent with this one's code
    base_images: int = 8000  # distinct renders (subject, scene) the UNet trains on, encoded once
    base_steps: int = 9000  # UNet + text encoder optimizer steps
    base_batch: int = 32  # UNet batch size
    base_lr: float = 1e-3  # peak AdamW learning rate (warm-up, then cosine to a tenth)
    warmup: int = 100  # warm-up steps
    keep_p: float = 0.85  # probability that a caption names each scene attribute
    identity_p: float = 0.5  # probability that a caption names the subject's identity
    identity_warmup: int = 2000  # first base steps in which every caption names the identity
    drop_caption: float = 0.1  # share of empty captions (classifier-free guidance)
    min_snr: float = 5.0  # Min-SNR-gamma loss weighting (of the x0 error: min(SNR + 1, gamma) / (SNR + 1) on v)
    ema_decay: float = 0.999  # the shipped UNet and text encoder are this exponential moving average of the weights


def render_pool(n: int, seed: int) -> tuple[torch.Tensor, list[tuple[tw.Subject, tw.Scene]]]:
    """(n, 3, 64, 64) renders in [-1, 1] of training subjects in training scenes, and what each shows."""
    rng = np.random.default_rng((seed, 21))
    subjects = tw.sample_subjects(n, seed, "train")
    scenes = world.scenes_in("train")
    items = [(s, scenes[rng.integers(len(scenes))]) for s in subjects]
    return renders(items), items


def body_masks(items: list[tuple[tw.Subject, tw.Scene]]) -> torch.Tensor:
    """(n, 1, 64, 64) fraction of each pixel covered by the subject's body."""
    size = world.NATIVE_SIZE
    return torch.from_numpy(np.stack([tw.shape_coverage(s.shape, size, *tw.layout(c, size))
                                      for s, c in items])).float()[:, None]


def pattern_code(masks: torch.Tensor, patterns: torch.Tensor, amplitude) -> torch.Tensor:
    """(n, P, h, w): on each latent cell, `amplitude` times the body's share of the cell on the channel of the
    subject's pattern (P = number of patterns), 0 elsewhere. masks (n, 1, H, W), patterns (n,) indices."""
    cover = F.avg_pool2d(masks, models.LATENT_CELL)
    onehot = F.one_hot(patterns, N_CODE).float()[:, :, None, None]
    return amplitude * cover * onehot


def swapped_items(items: list[tuple[tw.Subject, tw.Scene]], seed: int) -> list[tuple[tw.Subject, tw.Scene]]:
    """Each item with its subject given another pattern (same shape, colour and scene)."""
    rng = np.random.default_rng((seed, 51))
    out = []
    for subject, scene in items:
        k = tw.PATTERNS.index(subject.pattern)
        other = tw.PATTERNS[(k + 1 + rng.integers(len(tw.PATTERNS) - 1)) % len(tw.PATTERNS)]
        out.append((tw.Subject(subject.shape, subject.colour, other), scene))
    return out


def pattern_index(items: list[tuple[tw.Subject, tw.Scene]]) -> torch.Tensor:
    """(n,) index of each subject's pattern in toyworld.PATTERNS."""
    return torch.tensor([tw.PATTERNS.index(s.pattern) for s, _ in items])


def renders(items: list[tuple[tw.Subject, tw.Scene]]) -> torch.Tensor:
    """(n, 3, 64, 64) renders in [-1, 1] of (subject, scene) items."""
    pixels = np.stack([np.asarray(tw.render(s, c, world.NATIVE_SIZE)) for s, c in items])  # (n, 64, 64, 3)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _lr_lambda(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def train_vae(config: BaseConfig) -> AutoencoderKL:
    """An 8x-down AutoencoderKL fitted to renders of the world (reconstruction MSE + a small KL).

    With `pattern_code` > 0 the last len(PATTERNS) latent channels hold the body's pattern as a code: on each cell,
    the amplitude times the body's share of the cell, on the pattern's channel. Left to the reconstruction loss, the
    pattern moves the latents about a fifth as much as the colour does, and a base model, whose loss is on latents,
    draws it at chance for held-out subjects. At amplitude 6 the pattern moves them about as much as the colour (at 2,
    a fifth again), and one code per cell, independent of the shape, composes with shape and colour as the colour
    does (with the identity warm-up of `base_loop`; see docs/mini_findings.md). The encoder learns to write the code of
    the pattern it sees; the decoder draws the pattern from it, because half the time the other channels come from a
    render of the same subject with another pattern (decoded to the true render: only the code tells which)."""
    torch.manual_seed(config.seed)
    vae = AutoencoderKL(**models.VAE)
    pixels, items = render_pool(config.vae_images, config.seed + 1)
    coded = config.pattern_code > 0
    if coded:
        others = swapped_items(items, config.seed)
        swapped, masks = renders(others), body_masks(items)
        patterns, other_patterns = pattern_index(items), pattern_index(others)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(50, config.vae_steps))
    gen = torch.Generator().manual_seed(config.seed + 2)
    started = time.time()
    for step in range(config.vae_steps):
        index = torch.randint(len(pixels), (config.vae_batch,), generator=gen)
        x = pixels[index]  # (B, 3, 64, 64)
        if coded:
            swap = torch.rand(len(index), generator=gen) < config.pattern_swap
            x_in = torch.where(swap[:, None, None, None], swapped[index], x)
            m = masks[index]
        else:
            x_in = x
        if config.vae_crop < x.shape[-1]:  # random crops: the VAE is convolutional, crops cost a fraction
            # crops on the latent grid: the patterns are fixed to the image's tiles, one tile a latent cell
            cell = models.LATENT_CELL
            top, left = (cell * torch.randint(0, (x.shape[-1] - config.vae_crop) // cell + 1, (2,),
                                              generator=gen)).tolist()
            x, x_in = (t[:, :, top:top + config.vae_crop, left:left + config.vae_crop] for t in (x, x_in))
            if coded:
                m = m[:, :, top:top + config.vae_crop, left:left + config.vae_crop]
        posterior = vae.encode(x_in).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        loss = config.vae_kl * posterior.kl().mean()
        if coded:  # the encoder learns to write the code of what it sees; the decoder draws the true pattern
            seen = torch.where(swap, other_patterns[index], patterns[index])
            code_error = F.mse_loss(posterior.mean[:, -N_CODE:], pattern_code(m, seen, config.pattern_code))
            aux = config.pattern_code_weight * code_error / config.pattern_code**2
            loss = loss + aux
            z = torch.cat([z[:, :-N_CODE], pattern_code(m, patterns[index], config.pattern_code)], dim=1)
        recon = vae.decode(z).sample
        loss = loss + F.mse_loss(recon, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == config.vae_steps - 1:
            logger.info("vae step %d/%d loss %.5f%s (%.0f s)", step + 1, config.vae_steps, loss.item(),
                        f" code {aux.item():.4f}" if coded else "", time.time() - started)
    vae.eval().requires_grad_(False)
    with torch.no_grad():  # latents scaled to unit variance, as SD's 0.18215 does for its VAE
        std = torch.cat([vae.encode(pixels[i:i + 64]).latent_dist.mean for i in range(0, 256, 64)]).std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    logger.info("vae scaling_factor %.4f", 1.0 / std)
    return vae


def train_decoder(config: BaseConfig, vae: AutoencoderKL) -> AutoencoderKL:
    """Fine-tune the decoder on whole renders (the crops leave a frame at the borders and dull colours).

    The encoder stays frozen, so latents, and hence the UNet trained on them, are unchanged by this stage. With a
    pattern code, half the latents are again another pattern's with this render's code."""
    pixels, items = render_pool(config.vae_images // 2, config.seed + 7)
    means, stds = _posteriors(vae, pixels)
    coded = config.pattern_code > 0
    if coded:  # latents of the same renders with another pattern, whose code is replaced by the true one
        other_means, other_stds = _posteriors(vae, renders(swapped_items(items, config.seed + 7)))
        other_means[:, -N_CODE:], other_stds[:, -N_CODE:] = means[:, -N_CODE:], stds[:, -N_CODE:]
    decoder = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    vae.requires_grad_(False)
    for param in decoder:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(decoder, lr=config.decoder_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(20, config.decoder_steps))
    gen = torch.Generator().manual_seed(config.seed + 8)
    started = time.time()
    for step in range(config.decoder_steps):
        index = torch.randint(len(pixels), (config.decoder_batch,), generator=gen)
        mean, std = means[index], stds[index]
        if coded:
            swap = (torch.rand(len(index), generator=gen) < config.pattern_swap)[:, None, None, None]
            mean, std = torch.where(swap, other_means[index], mean), torch.where(swap, other_stds[index], std)
        z = mean + std * torch.randn(mean.shape, generator=gen)
        loss = F.mse_loss(vae.decode(z).sample, pixels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == config.decoder_steps - 1:
            logger.info("decoder step %d/%d loss %.5f (%.0f s)", step + 1, config.decoder_steps, loss.item(),
                        time.time() - started)
    vae.eval().requires_grad_(False)
    return vae


def _posteriors(vae: AutoencoderKL, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior means and standard deviations of renders, encoded 64 at a time."""
    with torch.no_grad():
        posteriors = [vae.encode(pixels[i:i + 64]).latent_dist for i in range(0, len(pixels), 64)]
    return torch.cat([p.mean for p in posteriors]), torch.cat([p.std for p in posteriors])


def reconstruction_scores(vae: AutoencoderKL, n: int = 64, seed: int = 0) -> dict[str, float]:
    """Oracle identity and scene scores of VAE round trips of held-out subjects in random scenes (the ceiling of
    what the base model can be scored at)."""
    rng = np.random.default_rng((seed, 41))
    items = [(subject, tw.sample_scene(rng)) for subject in tw.sample_subjects(n, seed, "heldout")]
    with torch.no_grad():
        x = renders(items)
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample
    images = ((recon.permute(0, 2, 3, 1) + 1.0) * 127.5).clamp(0, 255).round().byte().numpy()
    identity = [identity_score(Image.fromarray(im), s) for im, (s, _) in zip(images, items)]
    scene = [prompt_score(Image.fromarray(im), asdict(c)) for im, (_, c) in zip(images, items)]
    return {"identity": round(float(np.mean(identity)), 3), "scene": round(float(np.mean(scene)), 3)}


def base_latents(config: BaseConfig, vae: AutoencoderKL) -> tuple[torch.Tensor, list]:
    """(N, 32, 8, 8) scaled latents of the base model's renders (VAE posterior means), and what each shows."""
    pixels, items = render_pool(config.base_images, config.seed + 3)
    means, _ = _posteriors(vae, pixels)
    return means * vae.config.scaling_factor, items


def train_base(config: BaseConfig, vae: AutoencoderKL, tokenizer) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """Text encoder + UNet trained from scratch on captioned renders (latents from the frozen VAE); the returned
    weights are the exponential moving average."""
    latents, items = base_latents(config, vae)
    torch.manual_seed(config.seed + 4)
    text_config = CLIPTextConfig(**models.TEXT, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    text_encoder = CLIPTextModel(text_config)
    torch.manual_seed(config.seed + 5)
    unet = UNet2DConditionModel(**models.UNET)
    ema = Ema(list(unet.parameters()) + list(text_encoder.parameters()), config.ema_decay)
    base_loop(config, unet, text_encoder, tokenizer, latents, items, ema)
    ema.copy_to_params()
    return unet, text_encoder


class Ema:
    """Exponential moving average of parameters, with the usual warm-up of the decay (1 + n) / (10 + n)."""

    def __init__(self, params: list[torch.Tensor], decay: float):
        self.params, self.decay, self.updates = params, decay, 0
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - decay)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for shadow, param in zip(self.shadow, self.params):
            param.copy_(shadow)


def base_loop(config: BaseConfig, unet, text_encoder, tokenizer, latents, items, ema: Ema) -> None:
    """The v-prediction training loop of the base model (zero terminal SNR, Min-SNR weighting).

    For its first `identity_warmup` steps every caption names the subject, later only with probability identity_p.
    Named half the time from the start, the pattern words are never bound (probe ratio 0.02 after 3000 steps, while
    colour words are: 0.92); named every time they are within 1000 steps (0.99), and stay bound once the captions
    without the subject ('a small toy ...') join in. Why half the time keeps them unbound was not found."""
    steps, seed = config.base_steps, config.seed
    noise_scheduler = DDPMScheduler.from_config(models.SCHEDULER)
    alphas = noise_scheduler.alphas_cumprod
    unet.requires_grad_(True)
    text_encoder.requires_grad_(True)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.base_lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config.warmup, steps))
    rng = np.random.default_rng((seed, 31))
    gen = torch.Generator().manual_seed(seed + 6)
    unet.train()
    text_encoder.train()
    started = time.time()
    for step in range(steps):
        index = torch.randint(len(latents), (config.base_batch,), generator=gen)
        identity_p = 1.0 if step < config.identity_warmup else config.identity_p
        captions = ["" if rng.random() < config.drop_caption else
                    world.random_caption(rng, *items[i], config.keep_p, identity_p) for i in index.tolist()]
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        text = text_encoder(ids)[0]  # (B, MAX_TOKENS, C)
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(index),), generator=gen)
        noisy = noise_scheduler.add_noise(x0, noise, t)
        prediction = unet(noisy, t, encoder_hidden_states=text).sample
        target = noise_scheduler.get_velocity(x0, noise, t)
        snr = alphas[t] / (1 - alphas[t])  # (B,) 0 at t = T
        weight = torch.clamp(snr + 1, max=config.min_snr) / (snr + 1)  # (B,) Min-SNR-gamma for v-prediction
        loss = (weight * F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        ema.update()
        if step % 50 == 0 or step == steps - 1:
            logger.info("base step %d/%d loss %.4f (%.0f s)", step + 1, steps, loss.item(),
                        time.time() - started)
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
