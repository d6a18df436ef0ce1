"""Weight-only quantization: linear layers whose weights are held packed for the kernels that read them.

Each scheme is a ``PackedLinear`` that takes an ``nn.Linear``'s place (the bias stays as loaded):

* ``int8`` (``Int8Linear``): one int8 per weight and a bfloat16 scale per output row (symmetric).
  On the CPU the matmul is PyTorch's packed int8 kernel (``_weight_int8pack_mm``) on bfloat16
  activations. Elsewhere the weight is converted to the activations' dtype at every call: a
  full-size copy, slower than unquantized in eager mode. ``torch.compile`` (``--step compiled``) can fuse
  the conversion into the matmul, so that only the int8 bytes are read (whether it does for the
  token loop's few rows on a GPU is not measured yet).
* ``int4`` (``Int4Linear``): 4-bit values with a scale and a zero point per group of 128 input
  values (64 or 32 for a narrower layer), in tinygemm's layout, read by PyTorch's int4 kernels on
  bfloat16 activations: ``_weight_int4pack_mm`` on CUDA (compute capability 8.0 or later) and
  ``_weight_int4pack_mm_for_cpu``. Also what a checkpoint stored in 4 bits loads into
  (``Int4Linear.from_integers``).
* ``fp8`` (``Fp8Linear``): float8 e4m3 weights with a float32 scale per row; activations are
  quantized to e4m3 per row at each call and multiplied by ``torch._scaled_mm``: FP8 tensor cores
  on compute capability 8.9 or later, PyTorch's (slow) CPU version elsewhere, to check quality
  on a machine without a GPU.

These are the kernels torchao's int4 and float8 configurations call; they are called here
directly because a checkpoint stored in 4 bits must go into the packed layout with its integers
unchanged (torchao 0.18 builds int4 weights from float weights only, and its CPU int4 layout is a
prototype API), and because torchao's int8 weight-only matmul converts the whole weight per call
on the CPU as well.

What is quantized (``quantized_linears``): the seven linear layers of every decoder layer
(``layers.N.self_attn.*_proj``, ``layers.N.mlp.*_proj``), 13.2 B of the 14.2 B parameters
NextStep-1-Large loads, where their shape fits the scheme's kernel (``fits``). The rest stays as
loaded: ``embed_tokens``, the projectors and norms (small), and the flow head (0.16 B parameters,
evaluated dozens of times per token on a few rows; a checkpoint that stores it in 4 bits loads
it so).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

QUANTIZATIONS = ("int8", "int4", "fp8")
# The packed int8 (CPU) and int4 kernels take bfloat16 activations (tinygemm on CUDA takes only
# bfloat16; on the CPU their float32 versions are 10 to 50 times slower than bfloat16).
KERNEL_DTYPE = torch.bfloat16
INT4_GROUP_SIZES = (128, 64, 32)  # the widest that divides a layer's input width
# tinygemm's bfloat16 tensor-core kernel needs Ampere (8.0); FP8 matrix units arrived with Ada (8.9).
MIN_CAPABILITY = {"int4": (8, 0), "fp8": (8, 9)}
_GPUS = {"int4": "Ampere or newer: A100, A10G, RTX 30xx/40xx, L4, H100", "fp8": "Ada, Hopper, Blackwell: L4, RTX 40xx, H100"}
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


def check_quantization(quantize: str | None, device: torch.device | str, what: str = "") -> None:
    """Raise ValueError for an unknown choice, or one whose kernels ``device`` lacks (named, with
    what it needs). ``what`` introduces the message (a checkpoint stored quantized says so)."""
    if quantize is None:
        return
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZATIONS)} or None, got {quantize!r}")
    device = torch.device(device)
    if not supported(quantize, device):
        major, minor = MIN_CAPABILITY[quantize]
        others = " or ".join(q for q in QUANTIZATIONS if q != quantize and supported(q, device))
        raise ValueError(
            f"{what}{quantize} needs a GPU of compute capability {major}.{minor} or later ({_GPUS[quantize]}) "
            f"or the CPU; {_describe(device)} has none" + (f": use quantize={others}" if others else "")
        )


def supported(quantize: str, device: torch.device | str) -> bool:
    """Whether ``device`` runs ``quantize``'s kernels: int8 everywhere; int4 and fp8 on the CPU and
    on CUDA GPUs of the compute capability they need."""
    device = torch.device(device)
    if quantize not in MIN_CAPABILITY or device.type == "cpu":
        return True
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= MIN_CAPABILITY[quantize]


def _describe(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
    return f"device {device}"


class PackedLinear(nn.Module):
    """A linear layer whose weight a subclass holds packed; ``matmul`` multiplies (M, in) rows by it."""

    def __init__(self, in_features: int, out_features: int, bias: nn.Parameter | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x.reshape(-1, self.in_features)).to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(PackedLinear):
    """int8 weights (out, in), a scale per output row in the CPU kernel's dtype (bfloat16: stored so,
    as a conversion inside a compiled graph would not lower to the kernel)."""

    def __init__(self, qdata: torch.Tensor, scales: torch.Tensor, bias: nn.Parameter | None):
        super().__init__(qdata.shape[1], qdata.shape[0], bias)
        self.register_buffer("qdata", qdata)
        self.register_buffer("scales", scales)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        weight = linear.weight.detach().float()
        scales = (weight.abs().amax(dim=1).clamp(min=1e-12) / 127).to(KERNEL_DTYPE)
        qdata = (weight / scales.float()[:, None]).round().clamp(-128, 127).to(torch.int8)
        return cls(qdata, scales, linear.bias)

    @staticmethod
    def stored_bytes(out_features: int, in_features: int) -> int:
        return out_features * in_features + 2 * out_features

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.qdata.device.type == "cpu":
            return torch.ops.aten._weight_int8pack_mm(x.to(KERNEL_DTYPE).contiguous(), self.qdata, self.scales)
        return F.linear(x, self.qdata.to(x.dtype)) * self.scales.to(x.dtype)


class Int4Linear(PackedLinear):
    """4-bit weights in tinygemm's layout: weight = (q - 8) * scale + zero, per group of input values.

    ``packed``: the kernel's layout of the (out, in) values (uint8 (out, in/2) on the CPU, int32
    tiles on CUDA, half a byte a weight either way); ``scale_and_zero``: bfloat16 (in/group, out, 2).
    """

    def __init__(self, packed: torch.Tensor, scale_and_zero: torch.Tensor, group_size: int, in_features: int,
                 bias: nn.Parameter | None):
        super().__init__(in_features, scale_and_zero.shape[1], bias)
        self.group_size = group_size
        self.register_buffer("packed", packed)
        self.register_buffer("scale_and_zero", scale_and_zero)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int4Linear:
        """Round ``linear``'s weight to 16 levels spanning each group's range (tinygemm's scheme)."""
        out_features, in_features = linear.weight.shape
        group_size = int4_group_size(in_features)
        groups = linear.weight.detach().float().reshape(out_features, in_features // group_size, group_size)
        low, high = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
        scales = (high - low).clamp(min=1e-6) / 15
        values = ((groups - low) / scales).round().clamp(0, 15).to(torch.int32).reshape(out_features, in_features)
        return cls.from_integers(values, scales[..., 0], (low + 8 * scales)[..., 0], group_size, linear.bias)

    @classmethod
    def from_integers(cls, values: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                      bias: nn.Parameter | None) -> Int4Linear:
        """Pack ``values`` (out, in) in 0..15 with ``scales`` and ``zeros`` (out, in/group), the
        weight being ``(values - 8) * scale + zero``, for the kernel of the device they are on."""
        in_features = values.shape[1]
        scale_and_zero = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().to(KERNEL_DTYPE)
        if values.device.type == "cpu":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values.to(torch.int32).contiguous(), 1)
        else:  # two values a byte, the first in the high half, then tinygemm's tiles
            pairs = (values[:, ::2] << 4 | values[:, 1::2]).to(torch.uint8).contiguous()
            inner_k_tiles = next(t for t in (8, 4, 2) if in_features % (16 * t) == 0)
            packed = torch.ops.aten._convert_weight_to_int4pack(pairs, inner_k_tiles)
        return cls(packed, scale_and_zero, group_size, in_features, bias)

    @staticmethod
    def stored_bytes(out_features: int, in_features: int, group_size: int | None = None) -> int:
        group_size = group_size or int4_group_size(in_features)
        return out_features * in_features // 2 + 4 * out_features * (in_features // group_size)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(KERNEL_DTYPE).contiguous()
        if self.packed.device.type == "cpu":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scale_and_zero)
        return torch.ops.aten._weight_int4pack_mm(x, self.packed, self.group_size, self.scale_and_zero)


class Fp8Linear(PackedLinear):
    """float8 e4m3 weights (out, in) with a float32 scale per row; activations quantized per row."""

    def __init__(self, qdata: torch.Tensor, scales: torch.Tensor, bias: nn.Parameter | None):
        super().__init__(qdata.shape[1], qdata.shape[0], bias)
        self.register_buffer("qdata", qdata)
        self.register_buffer("scales", scales)  # (1, out), as _scaled_mm takes them

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        qdata, scales = _to_fp8(linear.weight.detach())
        return cls(qdata, scales.t().contiguous(), linear.bias)

    @staticmethod
    def stored_bytes(out_features: int, in_features: int) -> int:
        return out_features * in_features + 4 * out_features

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        xq, x_scales = _to_fp8(x)
        # bfloat16 out: what the rowwise-scaled FP8 kernel on CUDA gives, on the CPU alike.
        return torch._scaled_mm(xq, self.qdata.t(), x_scales, self.scales, out_dtype=torch.bfloat16)


def _to_fp8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows as float8 e4m3, their float32 scales (rows, 1)): each row's largest value maps to e4m3's."""
    scales = t.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (t.float() / scales).clamp(-FP8_MAX, FP8_MAX).to(FP8), scales


SCHEMES: dict[str, type[PackedLinear]] = {"int8": Int8Linear, "int4": Int4Linear, "fp8": Fp8Linear}


def int4_group_size(in_features: int) -> int:
    return next((g for g in INT4_GROUP_SIZES if in_features % g == 0), INT4_GROUP_SIZES[-1])


def fits(quantize: str, out_features: int, in_features: int) -> bool:
    """Whether a (out, in) weight fits ``quantize``'s kernels (int4: whole groups, and rows in
    multiples of 16 for the CPU's layout; fp8: multiples of 16 both ways for ``_scaled_mm``)."""
    if quantize == "int4":
        return in_features % INT4_GROUP_SIZES[-1] == 0 and out_features % 16 == 0
    if quantize == "fp8":
        return in_features % 16 == 0 and out_features % 16 == 0
    return True


def quantized_weight_bytes(out_features: int, in_features: int, quantize: str, group_size: int | None = None) -> int:
    """Bytes one (out, in) weight holds once packed by ``quantize`` (int4: in groups of ``group_size``,
    by default the scheme's own choice)."""
    if quantize == "int4":
        return Int4Linear.stored_bytes(out_features, in_features, group_size)
    return SCHEMES[quantize].stored_bytes(out_features, in_features)


def quantized_linears(model: nn.Module, quantize: str | None = None) -> dict[str, nn.Linear]:
    """The linear layers that quantization replaces, by module name (all inside ``layers``): with
    ``quantize`` given, those whose shape fits its kernels."""
    return {
        name: module
        for name, module in model.named_modules()
        if name.startswith("layers.") and isinstance(module, nn.Linear)
        and (quantize is None or fits(quantize, module.out_features, module.in_features))
    }


def quantize_linear(model: nn.Module, name: str, quantize: str) -> None:
    """Put the packed form of the linear ``name`` (its weight already on its device) in its place."""
    model.set_submodule(name, SCHEMES[quantize].from_linear(model.get_submodule(name)))


def held_weights(module: nn.Module) -> tuple[int, int]:
    """(parameters, bytes) of ``module``'s weights as held: a packed layer's weight counts as its
    in x out parameters and the bytes of its packed tensors."""
    count = sum(p.numel() for p in module.parameters())
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    for layer in module.modules():
        if isinstance(layer, PackedLinear):
            count += layer.in_features * layer.out_features
            size += sum(b.numel() * b.element_size() for b in layer.buffers())
    return count, size


def is_quantized(model: nn.Module) -> bool:
    """Whether any layer of ``model`` holds a packed weight."""
    return any(isinstance(module, PackedLinear) for module in model.modules())
