"""The per-token flow-matching head: an MLP of adaLN residual blocks predicting a velocity.

Parameter names follow the official checkpoints (``image_head.net.*``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

VelocityAt = Callable[[torch.Tensor, int], torch.Tensor]  # (x, index of a time on the grid) -> v


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) times in [0, 1] -> (B, dim) features ``cat([cos(t f), sin(t f)])`` (cos first)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = timestep_embedding(t, self.frequency_dim).to(self.mlp[0].weight.dtype)
        return self.mlp(features)


class ResBlock(nn.Module):
    """``x + gate * mlp(LN(x) * (1 + scale) + shift)``, modulation from the time+condition vector."""

    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def modulation(self, activated: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(shift, 1 + scale, gate) for the time+condition vectors, SiLU already applied (..., width)."""
        shift, scale, gate = self.adaLN_modulation[1](activated).chunk(3, dim=-1)
        return shift, 1 + scale, gate

    def modulated(self, x: torch.Tensor, shift: torch.Tensor, scale_plus_one: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        h = torch.addcmul(shift, self.in_ln(x), scale_plus_one)
        return torch.addcmul(x, gate, self.mlp(h))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.width = width
        self.linear = nn.Linear(width, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def modulation(self, activated: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(shift, 1 + scale) for the time+condition vectors, SiLU already applied (..., width)."""
        shift, scale = self.adaLN_modulation[1](activated).chunk(2, dim=-1)
        return shift, 1 + scale

    def modulated(self, x: torch.Tensor, shift: torch.Tensor, scale_plus_one: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.addcmul(shift, F.layer_norm(x, (self.width,), eps=1e-6), scale_plus_one))


Modulations = list[tuple[torch.Tensor, ...]]  # per res block, then the final layer


class VelocityNet(nn.Module):
    """``net(x, t, c)``: token x (B, token_dim), time t (B,), condition c (B, cond_dim) -> velocity.

    Time and condition enter only through the adaLN modulations (``modulations``), so a caller
    that evaluates the net at known times can compute them ahead and run ``forward_modulated``.
    """

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int):
        super().__init__()
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(token_dim, width)
        self.res_blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_layer = FinalLayer(width, token_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.forward_modulated(x, self.modulations(self.time_embed(t) + self.cond_embed(c)))

    def modulations(self, y: torch.Tensor) -> Modulations:
        """Every layer's modulation for the summed time and condition embeddings y (..., width).
        Each layer's ``adaLN_modulation`` is SiLU then a linear map: the SiLU, the same for all of
        them, is applied once."""
        activated = F.silu(y)
        return [block.modulation(activated) for block in self.res_blocks] + [self.final_layer.modulation(activated)]

    def forward_modulated(self, x: torch.Tensor, modulations: Modulations) -> torch.Tensor:
        """The velocity at x (B, token_dim) given ``modulations`` whose rows match x's."""
        *blocks, final = modulations
        x = self.input_proj(x)
        for block, parameters in zip(self.res_blocks, blocks):
            x = block.modulated(x, *parameters)
        return self.final_layer.modulated(x, *final)


class FlowMatchingHead(nn.Module):
    """Holds the velocity net under the official name ``image_head.net``; sampling is in ``sampling``."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int):
        super().__init__()
        self.net = VelocityNet(token_dim, cond_dim, width, depth)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.net(x, t, c)

    def velocity_field(self, cond: torch.Tensor, times: torch.Tensor) -> VelocityAt:
        """``v(x, i)``: the velocity at grid time ``times[i]`` for condition rows ``cond``.

        A token's sampling loop evaluates one condition at every time of a fixed grid, and time
        and condition reach the net only through its adaLN modulations: those of the whole grid
        are computed here in one batch per layer (a handful of operations per token instead of
        a dozen per evaluation), and each evaluation runs only the token's own path.
        """
        net = self.net
        dtype = net.input_proj.weight.dtype
        time_embeddings = net.time_embed(times)  # (steps, width)
        cond_embedding = net.cond_embed(cond.to(dtype))  # (rows, width)
        modulations = net.modulations(time_embeddings[:, None] + cond_embedding[None])  # each (steps, rows, width)
        unbound = [[part.unbind(0) for part in layer] for layer in modulations]  # one call per part, not per step
        per_step = [[tuple(part[i] for part in layer) for layer in unbound] for i in range(times.shape[0])]

        def velocity_at(x: torch.Tensor, i: int) -> torch.Tensor:
            return net.forward_modulated(x.to(dtype), per_step[i]).float()

        return velocity_at
