"""Attention for the backbone: a plan worked out once per forward, SDPA everywhere, and flash-attn
2's kernels where that CUDA-only package is installed.

A plan holds what every layer of one forward attends with: SDPA's mask, or the flash kernels'
lengths (a decode step: each row's slots read and its left padding; a prefill: the real tokens
packed, with their sequence boundaries worked out on the host from the prompt rows, so a prefill
reads nothing back from the device).

The flash kernels are ``torch.library`` custom ops with fake implementations, so that a step
compiled whole (``fullgraph=True``) takes them as single operations; ``AttentionKernels`` lets
another pair of ops stand in for them (the tests use plain-torch ones on the CPU).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AttentionKernels:
    """decode(q (B, 1, nh, hd), k_cache, v_cache (B, S, nkv, hd), lengths (B,) int32, left_padding
    (B,) int32) -> (B, 1, nh, hd): attention over each row's slots ``left_padding .. lengths - 1``.
    prefill(q (n, nh, hd), k, v (n, nkv, hd), cu_seqlens (B + 1,) int32, longest) -> (n, nh, hd):
    causal attention within each row of ``n`` packed real tokens."""

    decode: Callable
    prefill: Callable


@torch.library.custom_op("nextstep::flash_decode", mutates_args=())
def flash_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                 left_padding: torch.Tensor) -> torch.Tensor:
    flash = importlib.import_module("flash_attn")
    return flash.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, cache_leftpad=left_padding,
                                         causal=True)


@flash_decode.register_fake
def _(q, k_cache, v_cache, lengths, left_padding):
    return torch.empty_like(q)


@torch.library.custom_op("nextstep::flash_prefill", mutates_args=())
def flash_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                  longest: int) -> torch.Tensor:
    flash = importlib.import_module("flash_attn")
    return flash.flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, longest, longest, causal=True)


@flash_prefill.register_fake
def _(q, k, v, cu_seqlens, longest):
    return torch.empty_like(q)


FLASH = AttentionKernels(torch.ops.nextstep.flash_decode, torch.ops.nextstep.flash_prefill)


def flash_kernels(device: torch.device, dtype: torch.dtype) -> AttentionKernels | None:
    """flash-attn 2's kernels where the package is installed and serves this device and dtype
    (CUDA, half precision), else None: SDPA serves."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return None
    return FLASH if importlib.util.find_spec("flash_attn") is not None else None


def attention_mask(query_slots: torch.Tensor, key_slots: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """(T,) query slots, (S,) key slots, (B, S) real keys -> (B, 1, T, S) bool: causal over real
    keys, plus each query's own slot (so that rows of pure padding stay finite)."""
    causal = key_slots[None, :] <= query_slots[:, None]  # (T, S)
    own = key_slots[None, :] == query_slots[:, None]
    return ((causal & key_valid[:, None, :]) | own)[:, None]


def causal_mask(valid: torch.Tensor) -> torch.Tensor:
    """Mask for a whole sequence without a cache: (B, T) real tokens -> (B, 1, T, T)."""
    slots = torch.arange(valid.shape[1], device=valid.device)
    return attention_mask(slots, slots, valid)


@dataclass
class Packing:
    """A left-padded prefill's real tokens, packed for variable-length attention."""

    real: torch.Tensor  # (n,) indices of the real tokens among B * T, on the device
    cu_seqlens: torch.Tensor  # (B + 1,) int32 boundaries of each row's run, on the device
    longest: int

    @classmethod
    def of(cls, valid: torch.Tensor, device) -> Packing:
        """From the prompt rows' (B, T) bool mask, read on the host (where the prompt was built)."""
        lengths = valid.sum(dim=1, dtype=torch.int32)
        cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        real = valid.reshape(-1).nonzero().squeeze(1)
        return cls(real.to(device), cu_seqlens.to(device), int(lengths.max()))


@dataclass
class AttentionPlan:
    """What every layer of one forward attends with (one of the three)."""

    mask: torch.Tensor | None = None  # (B, 1, T, S) for SDPA
    kernels: AttentionKernels | None = None
    lengths: torch.Tensor | None = None  # a flash decode step: (B,) slots read per row
    left_padding: torch.Tensor | None = None  # and (B,) the padding before each row's first real slot
    packing: Packing | None = None  # a flash prefill


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SDPA of q (B, nh, T, hd) over k, v (B, nkv, S, hd) with a bool mask (B, 1, T, S).

    With grouped KV heads, the query heads of each KV head (heads j*g .. j*g+g-1) are folded into
    its query rows instead of passing ``enable_gqa``: with a mask, CUDA's fused kernels refuse
    ``enable_gqa`` and SDPA falls back to its unfused math, while the folded form is plain
    attention with a mask, which the memory-efficient kernel takes. A one-token step folds as a
    view; a prefill copies q and the mask once.
    """
    b, heads, t, head_dim = q.shape
    groups = heads // k.shape[1]
    if groups == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    q = q.reshape(b, k.shape[1], groups * t, head_dim)  # (B, nkv, g*T, hd)
    mask = mask[:, :, None].expand(-1, -1, groups, -1, -1).reshape(b, 1, groups * t, mask.shape[-1])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.reshape(b, heads, t, head_dim)  # SDPA may hand back a transposed layout


def attend(plan: AttentionPlan, q: torch.Tensor, chunk: tuple[torch.Tensor, torch.Tensor],
           cached: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """q (B, nh, T, hd) over this forward's keys and values ``chunk`` (B, nkv, T, hd), already
    written into ``cached`` (the layer's whole cache, (B, nkv, S, hd)), as ``plan`` says."""
    if plan.lengths is not None:  # a flash decode step reads the cache in place
        keys, values = (part.transpose(1, 2) for part in cached)
        out = plan.kernels.decode(q.transpose(1, 2), keys, values, plan.lengths, plan.left_padding)
        return out.transpose(1, 2)
    if plan.packing is not None:  # a flash prefill packs the real tokens
        b, heads, t, head_dim = q.shape

        def packed(x):  # (B, heads, T, hd) -> (real tokens, heads, hd)
            return x.transpose(1, 2).reshape(b * t, x.shape[1], head_dim)[plan.packing.real]

        out = plan.kernels.prefill(packed(q), *(packed(part) for part in chunk), plan.packing.cu_seqlens,
                                   plan.packing.longest)
        full = q.new_zeros(b * t, heads, head_dim)
        full[plan.packing.real] = out
        return full.reshape(b, t, heads, head_dim).transpose(1, 2)
    return grouped_attention(q, *cached, plan.mask)
