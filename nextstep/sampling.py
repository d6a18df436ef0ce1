"""Flow-matching samplers for one image token, and classifier-free guidance.

A sampler integrates the head's velocity from noise (t = 0) towards data (t = 1). All noise is
drawn by the caller (in the reference's order) and handed in, so the samplers are pure
functions of their inputs: the same for one request or many, on any device.

Samplers: ``"v1"`` is NextStep-1's (an Euler-Maruyama SDE on a grid that stops at
1 - LAST_STEP, then one plain Euler step). ``"sde"``, ``"cps"`` and ``"ode"`` are
NextStep-1.1's: a grid that ends exactly at t = 1, and at each step the velocity's predicted
noise x0 and predicted image x1 are recombined at the next time, with fresh noise (``sde``,
``cps``) or without (``ode``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

VelocityAt = Callable[[torch.Tensor, int], torch.Tensor]  # (x, grid index) -> v
Ramp = Callable[[float, int, int], float]  # (guidance, token index, token count) -> this token's guidance

# NextStep-1's sampler stops its shifted grid at 1 - LAST_STEP and ends with one plain Euler
# step of this length; with a time shift > 1 the trajectory therefore ends short of t = 1.
LAST_STEP = 0.04
# NextStep-1.1's noise level a: the sde step's std is a * sqrt(sigma / (1 - sigma)); cps mixes in
# fresh noise with weight (1 - t) * sin(a * pi / 2).
NOISE_LEVEL = 0.8
CPS_NOISE_WEIGHT = math.sin(NOISE_LEVEL * math.pi / 2)
SAMPLERS = ("v1", "sde", "cps", "ode")
CFG_SCHEDULES = ("constant", "linear")


# ---- guidance ------------------------------------------------------------------------------


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


def falling_ramp(guidance: float, k: int, total: int) -> float:
    """NextStep-1's linear schedule: the set value at the first token, falling towards 1."""
    return 1 + (guidance - 1) * (total - k) / total


def rising_ramp(guidance: float, k: int, total: int) -> float:
    """NextStep-1.1's linear schedule: max(w/2, 1) at the first token, rising towards the set value."""
    return max(guidance / 2, 1 + (guidance - 1) * k / total)


def guidance_schedule(
    cfg: float, cfg_img: float, schedule: str, total: int, ramp: Ramp
) -> tuple[list[float], list[float]]:
    """Text and image guidance for each of ``total`` tokens: constant, or ``ramp`` when linear."""
    if schedule == "linear":
        return [ramp(cfg, k, total) for k in range(total)], [ramp(cfg_img, k, total) for k in range(total)]
    return [cfg] * total, [cfg_img] * total


# ---- time grids and noise ------------------------------------------------------------------


def shifted(t: torch.Tensor, shift: float) -> torch.Tensor:
    """``t / (s - (s - 1) t)``: with s > 1 more of the grid lies near the noise end."""
    return t / (shift - (shift - 1) * t)


def time_grid_v1(steps: int, shift: float) -> torch.Tensor:
    """NextStep-1's grid: ``steps`` points over [0, 1 - LAST_STEP], shifted."""
    return shifted(torch.linspace(0, 1 - LAST_STEP, steps), shift)


def time_grid_to_one(steps: int, shift: float) -> torch.Tensor:
    """NextStep-1.1's grid: the first ``steps`` points of linspace(0, 1, steps + 1), shifted,
    then exactly 1.0 (``steps + 1`` points, ``steps`` velocity evaluations)."""
    return torch.cat([shifted(torch.linspace(0, 1, steps + 1)[:steps], shift), torch.ones(1)])


def time_grid(sampler: str, steps: int, shift: float) -> torch.Tensor:
    return time_grid_v1(steps, shift) if sampler == "v1" else time_grid_to_one(steps, shift)


def noise_draws(sampler: str, steps: int) -> int:
    """How many noise draws of (B, D) the sampler takes per token, in order: the start noise,
    then one per stochastic step (v1 has steps - 1 of them; sde and cps draw after every step)."""
    return {"v1": steps, "sde": steps + 1, "cps": steps + 1, "ode": 1}[sampler]


# ---- NextStep-1.1's updates: from (x0, x1) at time ti to time tj -----------------------------
# Each keeps the reference's operation order, which the fixtures pin to the last bit.


def _ode_update(x0, x1, ti, tj, eps, t_before_one):
    return x0 * (1 - tj) + x1 * tj


def _cps_update(x0, x1, ti, tj, eps, t_before_one):
    # At tj = 1 the noise weight is 0: the last step lands exactly on x1 (its noise is still drawn).
    sd = (1 - tj) * CPS_NOISE_WEIGHT
    return (x0 * torch.sqrt((1 - tj) ** 2 - sd**2) + x1 * tj) + sd * eps


def _sde_update(x0, x1, ti, tj, eps, t_before_one):
    sigma = 1 - ti
    dt = tj - ti
    # At ti = 0 (sigma = 1) the std would divide by zero; the last grid time below 1 stands in.
    sd = torch.sqrt(sigma / (1 - torch.where(sigma == 1, t_before_one, sigma))) * NOISE_LEVEL
    x = (x0 * (1 - tj) + x1 * tj) - ((sd**2 * dt) / (2 * sigma)) * x0
    return x + (sd * torch.sqrt(dt)) * eps


_UPDATES = {"ode": _ode_update, "cps": _cps_update, "sde": _sde_update}


def step_to(
    sampler: str, x: torch.Tensor, v: torch.Tensor, ti: torch.Tensor, tj: torch.Tensor,
    eps: torch.Tensor | None, t_before_one: torch.Tensor,
) -> torch.Tensor:
    """One step of a NextStep-1.1 sampler from time ti to tj, given the guided velocity v at (x, ti).

    eps: this step's noise (None for ode); t_before_one: the grid's last time below 1.
    """
    x0 = x - v * ti  # predicted noise
    x1 = x + v * (1 - ti)  # predicted image
    return _UPDATES[sampler](x0, x1, ti, tj, eps, t_before_one)


# ---- sampling one token --------------------------------------------------------------------


def sample_token(
    sampler: str,
    velocity_at: VelocityAt,
    noise: torch.Tensor,
    grid: torch.Tensor,
    branches: int,
    cfg: torch.Tensor | float,
    cfg_img: torch.Tensor | float,
) -> torch.Tensor:
    """Sample one token per image.

    velocity_at(x, i): branch-major rows (branches*B, D) at grid time ``grid[i]`` -> velocities
    (``FlowMatchingHead.velocity_field``); noise: (noise_draws, B, D); grid: ``time_grid(sampler, ...)``;
    cfg, cfg_img: floats, or (B, 1) tensors for per-image guidance.
    """

    def guided_velocity(x: torch.Tensor, i: int) -> torch.Tensor:
        return guide(velocity_at(torch.cat([x] * branches), i), branches, cfg, cfg_img)

    if sampler == "v1":
        return _sample_v1(guided_velocity, noise, grid)
    x, stochastic = noise[0], noise.shape[0] > 1
    steps = grid.shape[0] - 1
    t_before_one = grid[steps - 1]
    for i in range(steps):
        ti, tj = grid[i], grid[i + 1]
        eps = noise[i + 1] if stochastic else None  # ode draws only the start noise
        x = step_to(sampler, x, guided_velocity(x, i), ti, tj, eps, t_before_one)
    return x


def _sample_v1(guided_velocity, noise: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    # Euler-Maruyama on the score-based SDE, written in the reference's operation order (the
    # simplified forms (1+t)v - x and (tv - x)/(1-t) agree only to float rounding). The per-step
    # scalars depend on the grid alone: computed for all steps at once, they round the same way
    # and spare the loop a dozen tiny tensor operations per step.
    t, dt = grid[:-1], grid[1:] - grid[:-1]
    times = t.unbind()
    denominators = ((1 - t) ** 2 - t * (-1) * (1 - t)).unbind()
    remaining = (1 - t).unbind()
    dts = dt.unbind()
    noise_scales = torch.sqrt(2 * (1 - t)).unbind()
    sqrt_dts = torch.sqrt(dt).unbind()
    draws = noise.unbind()
    x = draws[0]
    for i in range(grid.shape[0] - 1):
        v = guided_velocity(x, i)
        score = (times[i] * v - x) / denominators[i]
        drift = v + remaining[i] * score
        x = (x + drift * dts[i]) + noise_scales[i] * (draws[i + 1] * sqrt_dts[i])
    return x + guided_velocity(x, grid.shape[0] - 1) * LAST_STEP
