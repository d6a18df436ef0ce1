"""Bytes read from memory per image token, counted on the meta device as the memory plan is: what
bounds the token loop's speed where memory bandwidth does (a GPU decoding a few rows at a time).

Per token the loop reads the backbone once for all its rows (every decoder layer, the final norm
and the two image projectors; image tokens read no text embedding), quantized linear weights at
their packed size; the flow head's time and condition layers (embedders, adaLN modulations) once,
and the rest of it (input projection, residual MLPs and norms, final linear) at every sampling
step; and the keys and values of every cached token, at the middle token's context. int8 off the
CPU in eager mode also writes and reads a converted copy of each weight (``converts``); compiled,
it is counted as fused into the matmul (what torch.compile can do; not measured on a GPU).
Activations are small and left out. Bytes divided by a GPU's memory bandwidth are a lower bound on
its time per token: kernel launches and matmuls too small to saturate the bandwidth add to it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..models.config import NextStepConfig
from ..models.model import NextStepModel
from ..models.quantize import held_weights, quantized_linears
from .autoround import stored_quantization
from .memory import tensor_bytes

BACKBONE = ("layers.", "norm.", "image_in_projector.", "image_out_projector.")
# Flow-head tensors read at every sampling step; the rest of the head is read once per token.
PER_STEP = re.compile(r"image_head\.net\.(input_proj|res_blocks\.\d+\.(mlp|in_ln)|final_layer\.linear)\.")
# Memory bandwidth of an H100 SXM, bytes per second: the bench's default for the GPU estimate.
H100_BANDWIDTH = 3.35e12


@dataclass(frozen=True)
class TokenTraffic:
    """Bytes one image token reads, by part."""

    backbone: int
    head: int
    kv_cache: int

    @property
    def total(self) -> int:
        return self.backbone + self.head + self.kv_cache

    def seconds(self, bandwidth: float = H100_BANDWIDTH) -> float:
        """The least time a token takes where reading memory at ``bandwidth`` (bytes/s) is the bound."""
        return self.total / bandwidth

    def to_dict(self) -> dict:
        return {"backbone_mb": self.backbone / 1e6, "head_mb": self.head / 1e6, "kv_cache_mb": self.kv_cache / 1e6,
                "total_mb": self.total / 1e6}

    def describe(self) -> str:
        return (f"{self.total / 1e6:,.1f} MB read per token (backbone {self.backbone / 1e6:,.1f} + flow head "
                f"{self.head / 1e6:,.1f} + KV cache {self.kv_cache / 1e6:,.1f})")


@dataclass(frozen=True)
class WeightReads:
    """What a model's token loop reads, by what it is read per: the backbone once per token (for all
    rows), the flow head's time and condition layers once per token and the rest of it once per
    sampling step, and the keys and values of each cached slot of each row."""

    backbone: int
    head_token: int
    head_step: int
    kv_slot: int
    held: int  # every weight the model holds: what a fresh worker moves in

    @classmethod
    def of(cls, config: NextStepConfig, dtype: torch.dtype, quantize: str | None, converts: bool = False) -> WeightReads:
        """Counted on a meta-built model held as ``quantize`` says (a checkpoint stored in 4 bits: as
        stored). ``converts``: int8 weights are converted to ``dtype`` at every call (eager mode off
        the CPU): the converted copy is written, then read."""
        stored = stored_quantization(getattr(config, "quantization_config", None))
        with torch.device("meta"):
            network = NextStepModel(config)
        counted = tensor_bytes(network, dtype, None if stored else quantize, stored)
        head = {key: n for key, n in counted.items() if key.startswith("image_head.")}
        per_step = sum(n for key, n in head.items() if PER_STEP.match(key))
        size = torch.empty((), dtype=dtype).element_size()
        copies = 0
        if converts and quantize == "int8" and not stored:
            copies = sum(2 * size * linear.weight.numel() for linear in quantized_linears(network, quantize).values())
        return cls(
            backbone=sum(n for key, n in counted.items() if key.startswith(BACKBONE)) + copies,
            head_token=sum(head.values()) - per_step,
            head_step=per_step,
            kv_slot=2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * size,
            held=sum(counted.values()),
        )

    def token(self, rows: int, context: int, sampling_steps: int) -> TokenTraffic:
        """What one token of a ``rows``-row batch reads with ``context`` tokens cached."""
        return TokenTraffic(backbone=self.backbone, head=self.head_token + sampling_steps * self.head_step,
                            kv_cache=rows * context * self.kv_slot)


def token_traffic(config: NextStepConfig, dtype: torch.dtype, quantize: str | None, rows: int, context: int,
                  sampling_steps: int, converts: bool = False) -> TokenTraffic:
    """What one token of a ``rows``-row batch reads, ``context`` tokens cached (``WeightReads``)."""
    return WeightReads.of(config, dtype, quantize, converts).token(rows, context, sampling_steps)


def held_parameters(model: NextStepModel) -> tuple[int, int]:
    """(backbone, flow head per sampling step) parameters of ``model`` as held (``held_weights``),
    of the same parts ``WeightReads`` counts the bytes of: what one token's matrix work multiplies."""
    parts = dict(model.named_modules())
    backbone = [parts[prefix.rstrip(".")] for prefix in BACKBONE]
    per_step = [module for name, module in parts.items() if PER_STEP.fullmatch(name + ".")]
    return sum(held_weights(part)[0] for part in backbone), sum(held_weights(part)[0] for part in per_step)
