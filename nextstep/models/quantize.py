"""Weight-only quantization of the backbone's linear layers with torchao, applied while loading.

``int8``: each weight row becomes int8 with one float32 scale (torchao ``Int8WeightOnlyConfig``,
per-row granularity). ``fp8``: float8 e4m3 values with one float32 scale per row
(``Float8WeightOnlyConfig``). Activations stay in the model's dtype: every matmul dequantizes its
weight, so memory shrinks (1 byte a weight instead of 2) and the numbers change by the rounding
of the weights only.

What is quantized: the seven linear layers of every decoder layer (``layers.N.self_attn.*_proj``,
``layers.N.mlp.*_proj``), 13.2 B of the 14.2 B parameters NextStep-1-Large loads. The rest stays as
loaded: ``embed_tokens`` (torchao would dequantize the whole table for every lookup), the
projectors and norms (small), and the flow head: 0.16 B parameters (0.15 GiB saved in int8), but
evaluated dozens of times per token on a few rows, each time dequantizing every weight (at full
size on the CPU, one token of 50 steps took 1.5x as long with an int8 head).
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

QUANTIZATIONS = ("int8", "fp8")
# An optional install: on a CPU-only torch, importing it prints warnings about its CUDA kernels,
# so the plain install (the embedded model on a CPU) goes without it.
TORCHAO = "torchao==0.18.0"
# Native FP8 conversion arrived with Ada (8.9) and Hopper (9.0); older GPUs would emulate it.
FP8_MIN_CAPABILITY = (8, 9)


def check_quantization(quantize: str | None, device: torch.device | str) -> None:
    """Raise ValueError for an unknown choice, without torchao installed, or for fp8 on a device
    without FP8 support."""
    if quantize is None:
        return
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZATIONS)} or None, got {quantize!r}")
    if importlib.util.find_spec("torchao") is None:
        raise ValueError(f"quantize={quantize!r} needs torchao: pip install {TORCHAO} (listed in requirements-gpu.txt)")
    device = torch.device(device)
    if quantize == "fp8" and not fp8_supported(device):
        raise ValueError(
            f"fp8 needs {_fp8_requirement()}; {_describe(device)} has none: use quantize='int8' (same memory)"
        )


def fp8_supported(device: torch.device | str) -> bool:
    """FP8 weights on this device: CUDA of compute capability 8.9 or later, or the CPU (torch's
    CPU kernels convert float8, slowly: for checking quality on machines without a GPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= FP8_MIN_CAPABILITY
    return device.type == "cpu"


def _fp8_requirement() -> str:
    major, minor = FP8_MIN_CAPABILITY
    return f"a GPU with native FP8 (compute capability {major}.{minor} or later: Ada, Hopper, Blackwell) or the CPU"


def _describe(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
    return f"device {device}"


def quantized_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers that quantization replaces, by module name (all inside ``layers``)."""
    return {
        name: module
        for name, module in model.named_modules()
        if name.startswith("layers.") and isinstance(module, nn.Linear)
    }


def quantize_linear(linear: nn.Linear, quantize: str) -> None:
    """Replace ``linear.weight`` (already on its device) by its quantized form, in place."""
    from torchao.quantization import (
        Float8WeightOnlyConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )

    # set_inductor_config=False: torchao would otherwise change process-wide torch.compile settings.
    config = (
        Int8WeightOnlyConfig(set_inductor_config=False)
        if quantize == "int8"
        else Float8WeightOnlyConfig(set_inductor_config=False)
    )
    quantize_(linear, config)


def quantized_weight_bytes(out_features: int, in_features: int, quantize: str) -> int:
    """Bytes one quantized (out, in) weight holds: 1 byte a value, a float32 scale per row, and
    for int8 an int8 zero point per row (torchao stores one even for symmetric quantization)."""
    per_row = 4 + (1 if quantize == "int8" else 0)
    return out_features * in_features + out_features * per_row


def is_quantized(model: nn.Module) -> bool:
    """Whether any backbone linear holds a quantized weight (a torchao tensor subclass)."""
    return any(type(linear.weight) not in (torch.Tensor, nn.Parameter) for linear in quantized_linears(model).values())
