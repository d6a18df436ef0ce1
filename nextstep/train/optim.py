"""The optimiser both trainings share: AdamW with a short linear warm-up and a cosine decay."""

from __future__ import annotations

import math

import torch


def make_optimizer(parameters, lr: float, steps: int, weight_decay: float, warmup: float = 0.05):
    """(optimizer, scheduler); step the scheduler once per optimiser step."""
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    warmup_steps = max(1, int(warmup * steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
