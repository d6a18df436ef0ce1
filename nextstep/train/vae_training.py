"""Training the small image tokenizer: the official VAE architecture at narrow widths.

The encoder's output is LayerNorm-ed per 2x2 latent patch (``encoder_norm``, ``psz=2``) and used
as it is (``deterministic``, scale 1, shift 0), so every image token is a unit-normalised
64-vector: the same space the sampler's ``use_norm`` puts generated tokens in.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..loading.checkpoints import save_vae
from ..models.vae import AutoencoderKL, VAEConfig
from .optim import make_optimizer
from .world import random_scene, render

VAE_CONFIG = VAEConfig(
    resolution=128,
    # GroupNorm(32) over 64 channels: two channels per group. With one (ch=32) a flat-coloured
    # region normalises to exactly zero and its colour is lost before the output convolution.
    ch=64,
    ch_mult=[1, 1, 1, 1],
    num_res_blocks=0,  # the decoder still has one residual block per level (num_res_blocks + 1)
    z_channels=16,
    scaling_factor=1.0,
    shift_factor=0.0,
    encoder_norm=True,
    psz=2,
    deterministic=True,
)
# Noise added to the latents the decoder sees in training, so that it tolerates the small
# errors of generated tokens.
LATENT_NOISE = 0.03
# Pixels next to a colour change weigh 1 + EDGE_WEIGHT in the loss. Nearly all of the error is
# there (outlines are about 6 % of a picture), and outlines are what tells a square from a circle.
EDGE_WEIGHT = 8.0


def to_pixels(images) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) in [-1, 1]."""
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1


def crop_batch(rng: random.Random, batch_size: int, size: int, crop: int) -> torch.Tensor:
    """Random ``crop``-pixel squares of training scenes, cut on the 16-pixel token grid so that
    every crop sees the strides of the encoder the way the whole picture does."""
    crops = []
    for _ in range(batch_size):
        x, y = (16 * rng.randrange((size - crop) // 16 + 1) for _ in range(2))
        crops.append(render(random_scene(rng, split="train"), size).crop((x, y, x + crop, y + crop)))
    return to_pixels(crops)


def encode(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels -> normalised latents (the tokens' space)."""
    mean, _ = vae.posterior(pixels)
    return vae.normalize(mean)


def reconstruct(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    return vae.decode(vae.denormalize(encode(vae, pixels)))


def edge_mask(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W): 1 within two pixels of a change of colour in ``pixels`` (B, 3, H, W), else 0."""
    step_x = (pixels[..., :, 1:] - pixels[..., :, :-1]).abs().amax(1, keepdim=True) > 0.02
    step_y = (pixels[..., 1:, :] - pixels[..., :-1, :]).abs().amax(1, keepdim=True) > 0.02
    changes = torch.zeros_like(pixels[:, :1], dtype=torch.bool)
    changes[..., :, 1:] |= step_x
    changes[..., :, :-1] |= step_x
    changes[..., 1:, :] |= step_y
    changes[..., :-1, :] |= step_y
    return F.max_pool2d(changes.float(), 3, stride=1, padding=1)


def reconstruction_loss(decoded: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """Squared plus absolute error (MSE is what PSNR measures; L1 keeps edges sharp), averaged
    over the pixels with edges weighted by 1 + EDGE_WEIGHT."""
    weights = 1 + EDGE_WEIGHT * edge_mask(pixels)
    error = decoded - pixels
    return (weights * (error**2 + error.abs())).mean(1, keepdim=True).sum() / weights.sum()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(a.clamp(-1, 1), b.clamp(-1, 1)).item()
    return 10 * np.log10(4 / max(mse, 1e-12))


def train_vae(
    out: Path, steps: int, batch_size: int = 4, size: int = 128, crop: int = 64, lr: float = 2.5e-4, seed: int = 0,
    save_every: int = 100, config: VAEConfig = VAE_CONFIG,
) -> AutoencoderKL:
    """Train encoder and decoder on crops (a quarter of the cost of whole pictures; the network
    is convolutional). Higher learning rates stall this narrow network for hundreds of steps."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(config)
    fit(vae, vae.parameters(), out, steps, batch_size, size, crop, lr, random.Random(seed), save_every, "vae")
    return vae.eval()


def finetune_decoder(
    vae: AutoencoderKL, out: Path, steps: int, batch_size: int = 4, size: int = 128, crop: int = 64,
    lr: float = 5e-4, seed: int = 10, save_every: int = 100,
) -> AutoencoderKL:
    """Sharpen the decoder with the encoder frozen: the latents, and so the NextStep trained on
    them, stay exactly as they are. With the encoder trained, the decoder alone gains more from
    twice the VAE's learning rate (see the VAE's model card)."""
    torch.manual_seed(seed)
    vae.encoder.requires_grad_(False)
    fit(vae, vae.decoder.parameters(), out, steps, batch_size, size, crop, lr, random.Random(seed), save_every, "decoder")
    vae.encoder.requires_grad_(True)
    return vae.eval()


def fit(vae, parameters, out, steps, batch_size, size, crop, lr, rng, save_every, name) -> None:
    parameters = list(parameters)
    optimizer, schedule = make_optimizer(parameters, lr, steps, weight_decay=0.0)
    vae.train()
    bar = tqdm(range(steps), desc=name, mininterval=2.0)
    for step in bar:
        pixels = crop_batch(rng, batch_size, size, crop)
        latents = encode(vae, pixels)
        decoded = vae.decode(vae.denormalize(latents + LATENT_NOISE * torch.randn_like(latents)))
        loss = reconstruction_loss(decoded, pixels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{psnr(decoded.detach(), pixels):.1f}")
        if (step + 1) % save_every == 0 or step + 1 == steps:
            save_vae(vae, out)
