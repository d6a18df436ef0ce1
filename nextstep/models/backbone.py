"""Decoder-only transformer pieces of the NextStep backbone, with a preallocated KV cache.

A Llama/Qwen2 block written out in a few lines (RMSNorm, rotary positions, grouped-query attention,
a SwiGLU MLP), numerically as transformers' Llama modules compute them, so that the model depends
on transformers' configuration only; the attention reads and writes a static cache by position,
the way the token loop needs it (fixed shapes, no tensor growth per token).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionKernels, AttentionPlan, Packing, attend, attention_mask
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


class StaticKVCache:
    """Keys and values for every layer, allocated once for ``max_len`` slots.

    ``key_valid`` marks which slots hold real (non-padding) tokens of each row. A slot is where a
    token is stored; its rotary position is the caller's business (rows of a batch that were
    padded to a common length keep their own positions). ``kernels``: flash-attn's (or a
    stand-in's) to attend with, None for SDPA.
    """

    def __init__(self, config: NextStepConfig, batch_size: int, max_len: int, device, dtype,
                 kernels: AttentionKernels | None = None):
        self.kernels = kernels
        # One tensor per layer, not a view of one big one: a compiled step then writes each layer's
        # new slot in place (a write through a view of a graph input copies the whole layer).
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.key_valid = torch.zeros(batch_size, max_len, device=device, dtype=torch.bool)
        self.key_slots = torch.arange(max_len, device=device)

    def plan(self, slots: torch.Tensor, valid: torch.Tensor, prompt_valid: torch.Tensor | None = None) -> AttentionPlan:
        """Record which of the incoming cache ``slots`` (T,) hold real tokens (``valid``: (B, T)
        bool) and return what every layer of this forward attends with: SDPA's mask (causal over
        real keys, and always the query's own slot, so padding rows stay finite), or the flash
        kernels' lengths. ``prompt_valid``: ``valid`` read on the host, for a prefill from slot 0
        (flash packs its real tokens by it without reading the device)."""
        self.key_valid.index_copy_(1, slots, valid)
        if self.kernels is not None and slots.shape[0] == 1:  # a decode step
            lengths = (slots + 1).to(torch.int32).expand(valid.shape[0]).contiguous()
            left_padding = self.key_valid.int().argmax(dim=1).int()  # rows are left padded
            return AttentionPlan(kernels=self.kernels, lengths=lengths, left_padding=left_padding)
        if self.kernels is not None and prompt_valid is not None:
            return AttentionPlan(kernels=self.kernels, packing=Packing.of(prompt_valid, self.key_valid.device))
        return AttentionPlan(mask=attention_mask(slots, self.key_slots, self.key_valid))

    def update(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, kv_heads, T, head_dim) at ``slots``; return the whole cache of ``layer``."""
        self.keys[layer].index_copy_(2, slots, k)
        self.values[layer].index_copy_(2, slots, v)
        return self.keys[layer], self.values[layer]


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

    def forward(self, x, cos, sin, plan: AttentionPlan, slots, cache: StaticKVCache | None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, k, cos, sin)
        # Without a cache (training) the keys are just this sequence's.
        cached = cache.update(self.layer_idx, slots, k, v) if cache is not None else (k, v)  # (B, nkv, S, hd)
        out = attend(plan, q, (k, v), cached)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class DecoderLayer(nn.Module):
    """Pre-norm block: ``h = x + attn(norm(x))``, ``out = h + mlp(norm(h))``."""

    def __init__(self, config: NextStepConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, plan: AttentionPlan, slots, cache: StaticKVCache | None):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, plan, slots, cache)
        return h + self.mlp(self.post_attention_layernorm(h))
