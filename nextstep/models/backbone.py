"""Decoder-only transformer pieces of the NextStep backbone, with a preallocated KV cache.

A Llama/Qwen2 block written out in a few lines (RMSNorm, rotary positions, grouped-query attention,
a SwiGLU MLP), numerically as transformers' Llama modules compute them, so that the model depends
on transformers' configuration only; the attention reads and writes a static cache by position,
the way the token loop needs it (fixed shapes, no tensor growth per token).
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import nn

from .config import NextStepConfig


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, computed in float32."""

    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: NextStepConfig):
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"the backbone's MLP takes hidden_act 'silu', this config has {config.hidden_act!r}")
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(hidden, inner, bias=bias)
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RotaryEmbedding(nn.Module):
    """Plain RoPE (the releases' ``rope_type: default``): cos and sin of ``position * inv_freq``,
    each frequency twice, in the input's dtype."""

    def __init__(self, config: NextStepConfig):
        super().__init__()
        rope = config.rope_parameters
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"the backbone takes plain RoPE (rope_type 'default'), this config has {rope!r}")
        dim = config.head_dim
        inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) -> cos, sin (B, T, head_dim)."""
        freqs = positions[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(x.dtype), angles.sin().to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q, k (B, heads, T, hd) rotated by cos, sin (B, T, hd)."""
    cos, sin = cos[:, None], sin[:, None]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


# Cache lengths are rounded up to a multiple of this, so that one compiled step serves prompts
# of nearby lengths (unused slots are masked out like padding).
CACHE_SLOTS_MULTIPLE = 128


def cache_slots(needed: int) -> int:
    """The cache length a batch needing ``needed`` slots gets: rounded up to CACHE_SLOTS_MULTIPLE."""
    return -(-needed // CACHE_SLOTS_MULTIPLE) * CACHE_SLOTS_MULTIPLE


class StaticKVCache:
    """Keys and values for every layer, allocated once for ``max_len`` slots.

    ``key_valid`` marks which slots hold real (non-padding) tokens of each row. A slot is where a
    token is stored; its rotary position is the caller's business (rows of a batch that were
    padded to a common length keep their own positions).
    """

    def __init__(self, config: NextStepConfig, batch_size: int, max_len: int, device, dtype, flash=None):
        self.flash = flash  # the flash-attn 2 module to attend with (``flash_attn_module``), or None for SDPA
        # One tensor per layer, not a view of one big one: a compiled step then writes each layer's
        # new slot in place (a write through a view of a graph input copies the whole layer).
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.key_valid = torch.zeros(batch_size, max_len, device=device, dtype=torch.bool)
        self.key_slots = torch.arange(max_len, device=device)

    def mark(self, slots: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Record which of the incoming cache ``slots`` hold real tokens and return the attention mask.

        valid: (B, T) bool. Returns (B, 1, T, max_len) bool, True where a query may attend a key:
        causal over real keys, and always the query's own slot, so that padding rows stay
        finite (their outputs are never used).
        """
        self.key_valid.index_copy_(1, slots, valid)
        return attention_mask(slots, self.key_slots, self.key_valid)

    def update(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, kv_heads, T, head_dim) at ``slots``; return the whole cache of ``layer``."""
        self.keys[layer].index_copy_(2, slots, k)
        self.values[layer].index_copy_(2, slots, v)
        return self.keys[layer], self.values[layer]

    def left_padding(self) -> torch.Tensor:
        """(B,) int32: padding slots before each row's first real token (rows are left padded)."""
        return self.key_valid.int().argmax(dim=1).int()


def attention_mask(query_slots: torch.Tensor, key_slots: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """(T,) query slots, (S,) key slots, (B, S) real keys -> (B, 1, T, S) bool: causal over real
    keys, plus each query's own slot (so that rows of pure padding stay finite)."""
    causal = key_slots[None, :] <= query_slots[:, None]  # (T, S)
    own = key_slots[None, :] == query_slots[:, None]
    return ((causal & key_valid[:, None, :]) | own)[:, None]


def flash_attn_module(device: torch.device, dtype: torch.dtype):
    """The flash-attn 2 package when it is installed and can serve this device and dtype, else None.

    It is optional (a CUDA-only extra); SDPA serves everywhere else."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return None
    try:
        return importlib.import_module("flash_attn")
    except ImportError:
        return None


def flash_attention(flash, q, k, v, cache: StaticKVCache, layer: int, slots: torch.Tensor) -> torch.Tensor | None:
    """Attention with flash-attn 2 for the two shapes the token loop uses, else None.

    q: (B, nh, T, hd); k, v: this chunk's keys and values (B, nkv, T, hd), already in the cache.
    A prefill from slot 0 drops the left padding and runs variable-length causal attention; a
    one-token step reads the cache in place, from each row's first real slot.
    """
    b, _, t, _ = q.shape
    if t == 1:
        seqlens = (slots + 1).to(torch.int32).expand(b).contiguous()
        out = flash.flash_attn_with_kvcache(
            q.transpose(1, 2), cache.keys[layer].transpose(1, 2), cache.values[layer].transpose(1, 2),
            cache_seqlens=seqlens, cache_leftpad=cache.left_padding(), causal=True,
        )  # (B, 1, nh, hd)
        return out.transpose(1, 2)
    if int(slots[0]) != 0:
        return None
    valid = cache.key_valid[:, :t].reshape(-1)
    lengths = cache.key_valid[:, :t].sum(dim=1, dtype=torch.int32)
    starts = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    real = valid.nonzero().squeeze(1)

    def packed(x):  # (B, heads, T, hd) -> (real tokens, heads, hd)
        return x.transpose(1, 2).reshape(b * t, x.shape[1], x.shape[3])[real]

    longest = int(lengths.max())
    out = flash.flash_attn_varlen_func(packed(q), packed(k), packed(v), starts, starts, longest, longest, causal=True)
    full = q.new_zeros(b * t, q.shape[1], q.shape[3])
    full[real] = out
    return full.reshape(b, t, q.shape[1], q.shape[3]).transpose(1, 2)


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


def causal_mask(valid: torch.Tensor) -> torch.Tensor:
    """Mask for a whole sequence without a cache: (B, T) real tokens -> (B, 1, T, T)."""
    slots = torch.arange(valid.shape[1], device=valid.device)
    return attention_mask(slots, slots, valid)


class Attention(nn.Module):
    def __init__(self, config: NextStepConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=config.o_attention_bias)

    def forward(self, x, cos, sin, mask, slots, cache: StaticKVCache | None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, k, cos, sin)
        out = None
        if cache is not None:  # without a cache (training) the keys are just this sequence's
            chunk_k, chunk_v = k, v
            k, v = cache.update(self.layer_idx, slots, k, v)  # (B, nkv, max_len, hd)
            if cache.flash is not None:
                out = flash_attention(cache.flash, q, chunk_k, chunk_v, cache, self.layer_idx, slots)
        if out is None:
            out = grouped_attention(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class DecoderLayer(nn.Module):
    """Pre-norm block: ``h = x + attn(norm(x))``, ``out = h + mlp(norm(h))``."""

    def __init__(self, config: NextStepConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, slots, cache: StaticKVCache | None):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, slots, cache)
        return h + self.mlp(self.post_attention_layernorm(h))
