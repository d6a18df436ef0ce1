"""Checkpoints that Intel's auto-round stored in 4 bits (W4A16): their ``quantization_config`` and tensors.

auto-round's ``save_quantized(format="auto_round")`` replaces each linear layer ``X`` it quantized
(every linear of the blocks ``block_name_to_quantize`` names: for NextStep, ``layers`` and the flow
head's ``image_head.net.res_blocks``) by ``X.qweight`` and ``X.qzeros`` (int32 words of eight
4-bit fields, the first field in the lowest bits), ``X.scales`` (float16, (in / group, out)) and
``X.bias`` as it was. A weight is ``scale * (value - zero point)``. Its ``packing_format`` says how
the words are laid out (auto-round 0.16 writes the first for symmetric quantization, its default,
the second for asymmetric):

* "auto_round:auto_gptq" (``auto_round_extension/torch/qlinear_torch_zp.py``): ``qweight`` (in / 8,
  out), a word holding eight inputs in order; ``qzeros`` (in / group, out / 8), a word holding eight
  outputs in order, each the zero point less one (AutoGPTQ's first format);
* "auto_round:auto_awq" (``export/export_to_awq/utils.py``): ``qweight`` (in, out / 8) and
  ``qzeros`` (in / group, out / 8), a word holding eight outputs interleaved as AutoAWQ's
  (output j in field ``AWQ_ORDER[j]``), zero points as they are.

The integers go unchanged into ``Int4Linear``'s packed layout. Anything else (other bit widths,
formats, act-order, quantized activations, per-layer settings other than full precision) is
refused from ``config.json`` before a tensor is read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..models.quantize import Int4Linear

QUANT_METHODS = ("auto-round", "intel/auto-round")
PACKING_FORMATS = {"auto_round:auto_gptq": "gptq", "auto_round:auto_awq": "awq"}
AWQ_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]
GROUP_SIZES = (32, 64, 128, 256)  # what the int4 kernels take
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)  # eight 4-bit fields of an int32


@dataclass(frozen=True)
class StoredInt4:
    """A checkpoint's 4-bit weights as its ``quantization_config`` describes them."""

    group_size: int
    layout: str  # "gptq" or "awq" (``PACKING_FORMATS``)
    blocks: tuple[str, ...]  # module names whose linear layers are stored packed
    full_precision: frozenset[str]  # linear layers inside those blocks kept unquantized

    @property
    def label(self) -> str:
        """How the Model panel and a result's parameters name it."""
        return f"int4 (auto-round W4A16, group {self.group_size})"

    def linears(self, model: nn.Module) -> list[str]:
        """The linear layers of ``model`` this describes as stored packed (for the memory plan: the
        loader follows the checkpoint's tensors)."""
        return [name for name, module in model.named_modules()
                if isinstance(module, nn.Linear) and name not in self.full_precision
                and any(name.startswith(block + ".") for block in self.blocks)]


def stored_quantization(config: dict | None) -> StoredInt4 | None:
    """What a checkpoint's ``quantization_config`` (None: not quantized) stores; ValueError naming
    the field for anything this loader cannot run."""
    if config is None:
        return None

    def refuse(why: str) -> ValueError:
        return ValueError(f"unsupported quantization_config ({why}); this loads auto-round's 4-bit weight-only "
                          f"checkpoints (bits 4, packing_format {' or '.join(PACKING_FORMATS)})")

    method, packing = config.get("quant_method"), config.get("packing_format")
    if method not in QUANT_METHODS:
        raise refuse(f"quant_method {method!r}")
    if packing not in PACKING_FORMATS:
        raise refuse(f"packing_format {packing!r}")
    if config.get("bits") != 4:
        raise refuse(f"bits {config.get('bits')!r}")
    if config.get("data_type", "int") != "int":
        raise refuse(f"data_type {config['data_type']!r}")
    if config.get("group_size") not in GROUP_SIZES:
        raise refuse(f"group_size {config.get('group_size')!r}, not one of {', '.join(map(str, GROUP_SIZES))}")
    if config.get("act_bits", 16) < 16:
        raise refuse(f"act_bits {config['act_bits']}: quantized activations")
    if config.get("desc_act") or config.get("act_order"):
        raise refuse("act-order")
    blocks = config.get("block_name_to_quantize") or ""
    blocks = tuple(b.strip() for b in (blocks.split(",") if isinstance(blocks, str) else blocks) if b.strip())
    if not blocks:
        raise refuse("no block_name_to_quantize")
    return StoredInt4(config["group_size"], PACKING_FORMATS[packing], blocks,
                      _full_precision(config.get("extra_config") or {}, refuse))


def _full_precision(extra: dict, refuse) -> frozenset[str]:
    """The layers ``extra_config`` keeps unquantized; any other per-layer setting is refused."""
    kept = set()
    for name, settings in extra.items():
        if settings.get("bits", 16) < 16:
            raise refuse(f"extra_config sets {name!r} apart: {settings}")
        kept.add(name)
    return frozenset(kept)


class StoredInt4Linear(nn.Module):
    """A linear layer's tensors as the checkpoint stores them, until all are read: the loader
    builds one on the meta device in each packed layer's place, so that the checkpoint's keys and
    shapes are checked before a tensor is read, then packs it (``to_packed``) as soon as it is full."""

    def __init__(self, linear: nn.Linear, stored: StoredInt4):
        super().__init__()
        out_features, in_features = linear.weight.shape
        groups = in_features // stored.group_size
        words = (in_features // 8, out_features) if stored.layout == "gptq" else (in_features, out_features // 8)
        meta = torch.device("meta")
        self.register_buffer("qweight", torch.empty(words, dtype=torch.int32, device=meta))
        self.register_buffer("qzeros", torch.empty(groups, out_features // 8, dtype=torch.int32, device=meta))
        self.register_buffer("scales", torch.empty(groups, out_features, dtype=torch.float16, device=meta))
        self.bias = linear.bias
        self.stored = stored

    def to_packed(self) -> Int4Linear:
        values, scales, zeros = unpack(self.qweight, self.qzeros, self.scales, self.stored.layout)
        # (value - zero) * scale == (value - 8) * scale + (8 - zero) * scale: tinygemm's form.
        return Int4Linear.from_integers(values, scales, (8 - zeros) * scales, self.stored.group_size, self.bias)


def unpack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
           layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values (out, in) int32 in 0..15, scales (out, groups) float32, zero points (out, groups)
    float32) from auto-round's tensors in ``layout``: a weight is ``scales * (values - zero points)``."""
    shifts = _SHIFTS.to(qweight.device)

    def fields(words: torch.Tensor) -> torch.Tensor:  # (..., n) -> (..., n, 8)
        return (words[..., None] >> shifts) & 15

    groups, out_features = scales.shape
    if layout == "gptq":
        values = fields(qweight.t()).reshape(out_features, -1)  # input k = 8 * word + field
        zeros = fields(qzeros).reshape(groups, out_features) + 1
    else:  # awq: output 8 * word + j in field AWQ_ORDER[j]
        values = fields(qweight)[..., AWQ_ORDER].reshape(-1, out_features).t()
        zeros = fields(qzeros)[..., AWQ_ORDER].reshape(groups, out_features)
    return values.contiguous(), scales.float().t().contiguous(), zeros.float().t().contiguous()
