"""How many operations one eager token dispatches, counted on the meta device (nothing is
allocated, so the 14B shape counts on any machine): each is a kernel launch on a GPU unless it
only reshapes a view. Split by where it comes from: the backbone's one-token decode, the flow
head's evaluations (and the modulations computed once per token), and the rest of the step (the
sampler's updates, guidance, the token's projection and normalisation).
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..models.config import NextStepConfig
from ..models.model import NextStepModel
from .sampling import SAMPLERS, noise_draws, time_grid
from .token_loop import decode_step, new_state

# Where an operation comes from, by the file of the innermost package frame that issued it.
_PARTS = {"backbone.py": "backbone", "attention.py": "backbone", "model.py": "backbone", "flow_head.py": "head"}
# Operations that launch nothing on a GPU (metadata, or a fresh buffer left unwritten).
_FREE = {"aten::empty", "aten::empty_strided", "aten::detach", "aten::lift_fresh", "aten::alias",
         "aten::_unsafe_view"}


@dataclass(frozen=True)
class OpCount:
    """Operations one token dispatches, by part."""

    backbone: int
    head: int
    sampler: int

    @property
    def total(self) -> int:
        return self.backbone + self.head + self.sampler

    def to_dict(self) -> dict:
        return dict(backbone=self.backbone, head=self.head, sampler=self.sampler, total=self.total)


class _Counting(TorchDispatchMode):
    """Counts the launching operations dispatched while active, by the part that issued them."""

    def __init__(self):
        super().__init__()
        self.parts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if not func.is_view and name not in _FREE:
            self.parts[_part_of_caller()] += 1
        return func(*args, **(kwargs or {}))


def _part_of_caller() -> str:
    frame = sys._getframe(2)
    while frame is not None:
        filename = frame.f_code.co_filename
        if "/nextstep/" in filename:
            part = _PARTS.get(filename.rsplit("/", 1)[-1])
            if part == "backbone" and frame.f_code.co_name in ("condition", "embed"):
                part = None  # the condition's projection is the step's own work
            if part is not None:
                return part
            if filename.endswith("token_loop.py") or filename.endswith("sampling.py"):
                return "sampler"
        frame = frame.f_back
    return "sampler"


def count_token_ops(config: NextStepConfig, sampler: str = "v1", steps: int = 50, branches: int = 2,
                    images: int = 1, use_norm: bool = True, position_table: bool = False,
                    dtype: torch.dtype = torch.bfloat16) -> OpCount:
    """The operations of one eager ``decode_step`` of the model ``config`` describes, for a batch of
    ``images`` with ``branches`` guidance rows each, counted on the meta device."""
    with torch.device("meta"):
        model = NextStepModel(config).to(dtype)
    model.build_computed_buffers("meta", keep_loaded=False)
    record = SAMPLERS[sampler]
    times = time_grid(sampler, steps, 1.0).to("meta")
    schedule = record.schedule(times)
    with torch.inference_mode():
        state, _ = new_state(model, branches * images, images, 4, noise_draws(sampler, steps), 128, times, schedule)
        counting = _Counting()
        with counting:
            decode_step(model, state, record, branches, use_norm, position_table)
    return OpCount(counting.parts["backbone"], counting.parts["head"], counting.parts["sampler"])
