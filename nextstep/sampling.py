"""Flow-matching samplers for one image token, and classifier-free guidance.

A sampler integrates the head's velocity from noise (t = 0) towards data (t = 1). All noise is
drawn by the caller (in the reference's order) and handed in, so the samplers are pure
functions of their inputs: the same for one request or many, on any device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Velocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x, t, cond) -> v

# NextStep-1's sampler stops its shifted grid at 1 - LAST_STEP and ends with one plain Euler
# step of this length; with a time shift > 1 the trajectory therefore ends short of t = 1.
LAST_STEP = 0.04
SAMPLERS = ("v1",)


def guide(v: torch.Tensor, branches: int, cfg: torch.Tensor | float, cfg_img: torch.Tensor | float) -> torch.Tensor:
    """Combine branch-major velocities (branches*B, D) into (B, D).

    2 branches [cond | uncond]: ``u + cfg (c - u)``; 3 branches [cond | image-only | neither]:
    ``n + cfg_img (i - n) + cfg (c - i)``.
    """
    if branches == 1:
        return v
    if branches == 2:
        cond, uncond = v.chunk(2)
        return uncond + cfg * (cond - uncond)
    cond, image_only, neither = v.chunk(3)
    return neither + cfg_img * (image_only - neither) + cfg * (cond - image_only)


def time_grid_v1(steps: int, shift: float) -> torch.Tensor:
    """NextStep-1's grid: ``steps`` points over [0, 1 - LAST_STEP], shifted by t / (s - (s - 1) t)."""
    ts = torch.linspace(0, 1 - LAST_STEP, steps)
    return ts / (shift - (shift - 1) * ts)


def noise_draws(sampler: str, steps: int) -> int:
    """How many noise draws of (B, D) the sampler takes per token, in order."""
    return steps if sampler == "v1" else 1


def sample_token(
    sampler: str,
    velocity: Velocity,
    cond: torch.Tensor,
    noise: torch.Tensor,
    grid: torch.Tensor,
    branches: int,
    cfg: torch.Tensor | float,
    cfg_img: torch.Tensor | float,
) -> torch.Tensor:
    """Sample one token per image. cond: (branches*B, hidden); noise: (draws, B, D); grid: (steps,)."""

    def guided_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v = velocity(torch.cat([x] * branches), t.expand(cond.shape[0]), cond)
        return guide(v, branches, cfg, cfg_img)

    x = noise[0]
    steps = grid.shape[0]
    for i in range(steps - 1):
        t, dt = grid[i], grid[i + 1] - grid[i]
        v = guided_velocity(x, t)
        # Euler-Maruyama on the score-based SDE, written in the reference's operation order
        # (the simplified forms (1+t)v - x and (tv - x)/(1-t) agree only to float rounding).
        score = (t * v - x) / ((1 - t) ** 2 - t * (-1) * (1 - t))
        drift = v + (1 - t) * score
        x = (x + drift * dt) + torch.sqrt(2 * (1 - t)) * (noise[i + 1] * torch.sqrt(dt))
    return x + guided_velocity(x, grid[-1]) * LAST_STEP
