"""Image tokens <-> VAE latents: each p x p latent patch is one token of C*p*p values.

Tokens are in raster order (rows top to bottom); inside a token the value index is
``channel * p*p + dy * p + dx``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def patchify(latents: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)*(W/p), C*p*p)."""
    b, c, hh, ww = latents.shape
    h, w = hh // patch, ww // patch
    x = latents.reshape(b, c, h, patch, w, patch).permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, p, p)
    return x.reshape(b, h * w, c * patch * patch)


def normalize_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """LayerNorm (no affine, eps 1e-6) of each token over its values: NextStep-1's ``use_norm`` on
    sampled tokens, and the f8ch16 encoder's normalisation of its posterior mean."""
    return F.layer_norm(tokens, tokens.shape[-1:], eps=1e-6)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int], patch: int) -> torch.Tensor:
    """(B, h*w, C*p*p) -> (B, C, h*p, w*p) for a token grid of h rows and w columns."""
    b, n, d = tokens.shape
    h, w = grid
    if n != h * w:
        raise ValueError(f"{n} tokens do not fill a {h}x{w} grid")
    c = d // (patch * patch)
    x = tokens.reshape(b, h, w, c, patch, patch).permute(0, 3, 1, 4, 2, 5)  # (B, C, h, p, w, p)
    return x.reshape(b, c, h * patch, w * patch)
