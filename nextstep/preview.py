"""Pictures of a partly sampled token grid, for live previews.

Tokens not sampled yet are zero (the mean of the normalised token space). ``"vae"`` runs the
VAE decoder on that latent; ``"fast"`` applies a per-VAE linear map from latent channels to
RGB and upsamples, at almost no cost.

The fast map is fitted once per VAE, lazily on first use: a handful of smooth synthetic
pictures are encoded and least squares relates each latent pixel to the mean colour of the
8x8 pixels it covers. Deriving it at load time makes it work for any VAE, the official one
included, with nothing extra to ship or keep in step with the weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from .tokens import unpatchify
from .vae import AutoencoderKL

PREVIEW_MODES = ("vae", "fast", "none")


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) pixels in [-1, 1] -> RGB images; ``round(clamp(x/2 + 0.5, 0, 1) * 255)``."""
    values = torch.round((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).to(torch.uint8)
    return [Image.fromarray(v.permute(1, 2, 0).cpu().numpy()) for v in values]


def decode_tokens(vae: AutoencoderKL, tokens: torch.Tensor, grid: tuple[int, int], patch: int) -> torch.Tensor:
    """Image tokens (B, N, D) -> VAE pixels (B, 3, H, W), unclamped."""
    latents = vae.denormalize(unpatchify(tokens.to(vae.dtype), grid, patch))
    return vae.decode(latents)


def fit_fast_preview(vae: AutoencoderKL, size: int = 64, count: int = 24, seed: int = 0) -> torch.Tensor:
    """Least-squares (z + 1, 3) map from normalised latent channels (plus a bias) to RGB in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 4, 4, generator=generator) * 2 - 1
    pictures = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    device = vae.encoder.conv_in.weight.device
    mean, _ = vae.posterior(pictures.to(device))
    latents = vae.normalize(mean).float().cpu()  # (count, z, size/f, size/f)
    colours = F.avg_pool2d(pictures, vae.config.downsample_factor)  # (count, 3, size/f, size/f)
    inputs = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    inputs = torch.cat([inputs, torch.ones(inputs.shape[0], 1)], dim=1)
    targets = colours.permute(0, 2, 3, 1).reshape(-1, 3)
    return torch.linalg.lstsq(inputs, targets).solution


class Previewer:
    def __init__(self, vae: AutoencoderKL, patch: int):
        self.vae = vae
        self.patch = patch
        self._fast_map: torch.Tensor | None = None

    def __call__(self, tokens: torch.Tensor, grid: tuple[int, int], mode: str) -> list[Image.Image]:
        if mode == "vae":
            return to_pil(decode_tokens(self.vae, tokens, grid, self.patch))
        if self._fast_map is None:
            self._fast_map = fit_fast_preview(self.vae)
        latents = unpatchify(tokens.float().cpu(), grid, self.patch)  # (B, z, h*p, w*p)
        rgb = torch.einsum("bchw,cd->bdhw", latents, self._fast_map[:-1]) + self._fast_map[-1][None, :, None, None]
        return to_pil(F.interpolate(rgb, scale_factor=self.vae.config.downsample_factor, mode="nearest"))
