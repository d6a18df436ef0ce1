"""Flow-matching samplers for one image token, and classifier-free guidance.

A sampler integrates the head's velocity from noise (t = 0) towards data (t = 1). All noise is
drawn by the caller (in the reference's order) and handed in, so the samplers are pure
functions of their inputs: the same for one request or many, on any device.

Samplers: ``"v1"`` is NextStep-1's (an Euler-Maruyama SDE on a grid that stops at
1 - LAST_STEP, then one plain Euler step). ``"sde"``, ``"cps"`` and ``"ode"`` are
NextStep-1.1's: a grid that ends exactly at t = 1, and at each step the velocity's predicted
noise x0 and predicted image x1 are recombined at the next time, with fresh noise (``sde``,
``cps``) or without (``ode``). Each is one ``Sampler`` record in ``SAMPLERS``: its time grid,
its noise draws and its update; ``integrate`` runs any of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..models.flow_head import VelocityAt

Ramp = Callable[[float, int, int], float]  # (guidance, token index, token count) -> this token's guidance

# NextStep-1's sampler stops its shifted grid at 1 - LAST_STEP and ends with one plain Euler
# step of this length; with a time shift > 1 the trajectory therefore ends short of t = 1.
LAST_STEP = 0.04
# NextStep-1.1's noise level a: the sde step's std is a * sqrt(sigma / (1 - sigma)); cps mixes in
# fresh noise with weight (1 - t) * sin(a * pi / 2).
NOISE_LEVEL = 0.8
CPS_NOISE_WEIGHT = math.sin(NOISE_LEVEL * math.pi / 2)
CFG_SCHEDULES = {"constant": "Constant", "linear": "Linear"}  # guidance over the tokens: value -> label


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
        return _plus_times(uncond, cfg, cond - uncond)
    cond, image_only, neither = v.chunk(3)
    return _plus_times(_plus_times(neither, cfg_img, image_only - neither), cfg, cond - image_only)


def _plus_times(base: torch.Tensor, weight: torch.Tensor | float, term: torch.Tensor) -> torch.Tensor:
    """``base + weight * term`` as one operation (a kernel launch on a GPU, not two)."""
    if isinstance(weight, torch.Tensor):
        return torch.addcmul(base, weight, term)
    return torch.add(base, term, alpha=weight)


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


# ---- time grids ----------------------------------------------------------------------------


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


# ---- per-step scalars and updates ------------------------------------------------------------
# A step's scalars depend on the grid alone: a sampler's ``schedule`` computes them once per grid,
# each with the reference's float32 operations on 0-d tensors (bit for bit what the reference
# computes inside its loop), and leaves the per-step update only the tensor operations. Each
# update keeps the reference's operations in their order, a product and the sum it feeds taken in
# one ``addcmul`` (one kernel where there were two; the fixtures agree to their tolerance).

Coefficients = tuple[torch.Tensor, ...]


def _v1_scalars(t, t_next, t_before_one):
    dt = t_next - t
    denominator = (1 - t) ** 2 - t * (-1) * (1 - t)
    return t, denominator, 1 - t, dt, torch.sqrt(2 * (1 - t)), torch.sqrt(dt)


def _v1_update(x, v, eps, c: Coefficients):
    # Euler-Maruyama on the score-based SDE; the simplified forms (1+t)v - x and (tv - x)/(1-t)
    # agree only to float rounding. No scalars: the final plain Euler step of LAST_STEP.
    if not c:
        return x + v * LAST_STEP
    t, denominator, remaining, dt, noise_scale, sqrt_dt = c
    score = (t * v - x) / denominator
    drift = torch.addcmul(v, remaining, score)
    return torch.addcmul(torch.addcmul(x, drift, dt), noise_scale, eps * sqrt_dt)


# NextStep-1.1's steps go from ti to tj through the velocity's predicted noise x0 = x - v ti and
# predicted image x1 = x + v (1 - ti); their scalars start with (ti, 1 - ti).


def _ode_scalars(ti, tj, t_before_one):
    return ti, 1 - ti, 1 - tj, tj


def _cps_scalars(ti, tj, t_before_one):
    # At tj = 1 the noise weight is 0: the last step lands exactly on x1 (its noise is still drawn).
    sd = (1 - tj) * CPS_NOISE_WEIGHT
    return ti, 1 - ti, torch.sqrt((1 - tj) ** 2 - sd**2), tj, sd


def _sde_scalars(ti, tj, t_before_one):
    sigma = 1 - ti
    dt = tj - ti
    # At ti = 0 (sigma = 1) the std would divide by zero; the last grid time below 1 stands in.
    sd = torch.sqrt(sigma / (1 - torch.where(sigma == 1, t_before_one, sigma))) * NOISE_LEVEL
    return ti, sigma, 1 - tj, tj, (sd**2 * dt) / (2 * sigma), sd * torch.sqrt(dt)


def _predictions(x, v, ti, one_minus_ti) -> tuple[torch.Tensor, torch.Tensor]:
    """The predicted noise x0 = x - v ti and image x1 = x + v (1 - ti)."""
    return torch.addcmul(x, v, ti, value=-1), torch.addcmul(x, v, one_minus_ti)


def _ode_update(x, v, eps, c: Coefficients):
    ti, one_minus_ti, one_minus_tj, tj = c
    x0, x1 = _predictions(x, v, ti, one_minus_ti)
    return torch.addcmul(x0 * one_minus_tj, x1, tj)


def _cps_update(x, v, eps, c: Coefficients):
    ti, one_minus_ti, x0_weight, tj, sd = c
    x0, x1 = _predictions(x, v, ti, one_minus_ti)
    return torch.addcmul(torch.addcmul(x0 * x0_weight, x1, tj), sd, eps)


def _sde_update(x, v, eps, c: Coefficients):
    ti, one_minus_ti, one_minus_tj, tj, x0_drift, noise_scale = c
    x0, x1 = _predictions(x, v, ti, one_minus_ti)
    x = torch.addcmul(torch.addcmul(x0 * one_minus_tj, x1, tj), x0_drift, x0, value=-1)
    return torch.addcmul(x, noise_scale, eps)


# ---- the registry --------------------------------------------------------------------------


@dataclass(frozen=True)
class Sampler:
    """One sampler: its time grid, its noise draws and its update.

    Evaluation i of the velocity is at ``times[i]`` and steps to ``times[i + 1]``; with
    ``final_euler_step`` one more evaluation at the grid's last point takes a plain Euler step of
    LAST_STEP. Noise draw 0 is the start noise and draw i + 1 belongs to step i; steps past the
    last draw get ``eps=None``.
    """

    name: str
    time_grid: Callable[[int, float], torch.Tensor]  # (steps, shift) -> grid times
    noise_draws: Callable[[int], int]  # steps -> draws of (B, D) per token
    scalars: Callable[..., Coefficients]  # (ti, tj, the grid's last time below 1) -> the step's scalars
    update: Callable[..., torch.Tensor]  # (x, guided v, eps or None, scalars) -> next x
    final_euler_step: bool = False

    def schedule(self, times: torch.Tensor) -> list[Coefficients]:
        """Each velocity evaluation's scalars, in order, for the time grid ``times``."""
        points = times.unbind()
        t_before_one = points[-2] if len(points) > 1 else None  # used only by grids that end at 1
        steps = [self.scalars(ti, tj, t_before_one) for ti, tj in zip(points, points[1:])]
        return steps + [()] if self.final_euler_step else steps


SAMPLERS = {  # by name; v1 draws no noise for its last step, ode none after the start
    "v1": Sampler("v1", time_grid_v1, lambda steps: steps, _v1_scalars, _v1_update, final_euler_step=True),
    "sde": Sampler("sde", time_grid_to_one, lambda steps: steps + 1, _sde_scalars, _sde_update),
    "cps": Sampler("cps", time_grid_to_one, lambda steps: steps + 1, _cps_scalars, _cps_update),
    "ode": Sampler("ode", time_grid_to_one, lambda steps: 1, _ode_scalars, _ode_update),
}


def time_grid(sampler: str, steps: int, shift: float) -> torch.Tensor:
    return SAMPLERS[sampler].time_grid(steps, shift)


def noise_draws(sampler: str, steps: int) -> int:
    """How many noise draws of (B, D) the sampler takes per token (see ``Sampler``)."""
    return SAMPLERS[sampler].noise_draws(steps)


def step_to(
    sampler: str, x: torch.Tensor, v: torch.Tensor, ti: torch.Tensor, tj: torch.Tensor,
    eps: torch.Tensor | None, t_before_one: torch.Tensor,
) -> torch.Tensor:
    """One step from time ti to tj, given the guided velocity v at (x, ti).

    eps: this step's noise (None for ode); t_before_one: the grid's last time below 1.
    """
    record = SAMPLERS[sampler]
    return record.update(x, v, eps, record.scalars(ti, tj, t_before_one))


# ---- sampling one token --------------------------------------------------------------------


def guided(velocity_at: VelocityAt, branches: int, cfg, cfg_img) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """``(x, i) -> v``: the guided velocity (B, D) at x (B, D) and grid time i, every branch's rows
    evaluated in one batch; cfg, cfg_img: floats, or (B, 1) tensors for per-image guidance."""

    def guided_velocity(x: torch.Tensor, i: int) -> torch.Tensor:
        return guide(velocity_at(torch.cat([x] * branches), i), branches, cfg, cfg_img)

    return guided_velocity


def integrate(
    sampler: Sampler, schedule: list[Coefficients], guided_velocity: Callable[[torch.Tensor, int], torch.Tensor],
    noise: torch.Tensor,
) -> torch.Tensor:
    """Sample one token per image with ``sampler``'s update: ``guided_velocity`` as ``guided``'s,
    schedule: ``sampler.schedule(times)``; noise: (draws, B, D)."""
    draws = noise.unbind()
    x = draws[0]
    for i, coefficients in enumerate(schedule):
        eps = draws[i + 1] if i + 1 < len(draws) else None
        x = sampler.update(x, guided_velocity(x, i), eps, coefficients)
    return x


def sample_token(
    sampler: str,
    velocity_at: VelocityAt,
    noise: torch.Tensor,
    times: torch.Tensor,
    branches: int,
    cfg: torch.Tensor | float,
    cfg_img: torch.Tensor | float,
) -> torch.Tensor:
    """Sample one token per image.

    velocity_at(x, i): branch-major rows (branches*B, D) at time ``times[i]`` -> velocities
    (``FlowMatchingHead.velocity_field``); noise: (noise_draws, B, D); times: ``time_grid(sampler, ...)``;
    cfg, cfg_img: floats, or (B, 1) tensors for per-image guidance.
    """
    record = SAMPLERS[sampler]
    return integrate(record, record.schedule(times), guided(velocity_at, branches, cfg, cfg_img), noise)
