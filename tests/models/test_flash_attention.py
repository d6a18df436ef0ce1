"""The flash-attn 2 path (CUDA only) is wired to the cache as SDPA is; without it, grouped KV
heads reach SDPA in a form its fused CUDA kernels take.

flash-attn cannot run here, so a stand-in module computes what its two functions are
documented to compute (variable-length causal attention; attention over a KV cache read from
``cache_leftpad`` to ``cache_seqlens``) with plain tensor operations. The backbone with that
module must give the hidden states it gives with SDPA, padding and all.
"""

import types

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from nextstep.models.backbone import StaticKVCache, attention_mask, grouped_attention


def _attend(q, k, v, causal_offset):
    """q (Tq, nh, hd), k/v (Tk, nkv, hd); query i sees keys j <= i + causal_offset."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
    allowed = torch.arange(k.shape[0])[None, :] <= torch.arange(q.shape[0])[:, None] + causal_offset
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False):
    assert causal
    out = torch.empty_like(q)
    for start, end in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist()):
        out[start:end] = _attend(q[start:end], k[start:end], v[start:end], 0)
    return out


def flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=None, cache_leftpad=None, causal=False):
    assert causal and k_cache.stride(-1) == 1
    out = torch.empty_like(q)
    for row in range(q.shape[0]):
        first, end = int(cache_leftpad[row]), int(cache_seqlens[row])
        keys, values = k_cache[row, first:end], v_cache[row, first:end]
        out[row] = _attend(q[row], keys, values, keys.shape[0] - q.shape[1])
    return out


FAKE_FLASH = types.SimpleNamespace(
    flash_attn_varlen_func=flash_attn_varlen_func, flash_attn_with_kvcache=flash_attn_with_kvcache
)


def run_backbone(model, flash):
    generator = torch.Generator().manual_seed(0)
    hidden = model.config.hidden_size
    embeds = torch.randn(3, 6, hidden, generator=generator)
    valid = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    cache = StaticKVCache(model.config, 3, 10, "cpu", torch.float32, flash=flash)
    with torch.no_grad():
        outputs = [model.forward_backbone(embeds, torch.arange(6), valid, cache)]
        for step in range(4):
            token = torch.randn(3, 1, hidden, generator=generator)
            outputs.append(model.forward_backbone(token, torch.tensor([6 + step]), torch.ones(3, 1, dtype=torch.bool), cache))
    return outputs, valid


def test_flash_path_matches_sdpa(tiny_pipe):
    reference, valid = run_backbone(tiny_pipe.model, None)
    flash, _ = run_backbone(tiny_pipe.model, FAKE_FLASH)
    assert (flash[0] - reference[0])[valid].abs().max() <= 1e-5  # prefill: real tokens only
    for mine, expected in zip(flash[1:], reference[1:]):
        assert (mine - expected).abs().max() <= 1e-5


def grouped_inputs(device, dtype, queries):
    """q for 8 heads over 2 KV heads, a left-padded cache of 12 slots and the cache's mask."""
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(3, 8, queries, 16, generator=generator)
    k, v = (torch.randn(3, 2, 12, 16, generator=generator) for _ in range(2))
    valid = torch.ones(3, 12, dtype=torch.bool)
    valid[1, :3] = False
    slots = torch.arange(12 - queries, 12)
    mask = attention_mask(slots, torch.arange(12), valid)
    return [t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device) for t in (q, k, v, mask)]


@pytest.mark.parametrize("queries", [1, 5])  # a decode step, a prefill
def test_grouped_attention_equals_sdpa_with_enable_gqa(queries):
    q, k, v, mask = grouped_inputs("cpu", torch.float32, queries)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert (grouped_attention(q, k, v, mask) - expected).abs().max() <= 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("queries", [1, 5])
def test_grouped_attention_runs_on_the_memory_efficient_kernel(queries):
    """Only the memory-efficient kernel allowed: SDPA raises if it refuses these inputs (as it does
    ``enable_gqa`` with a mask), instead of silently taking the math fallback."""
    q, k, v, mask = grouped_inputs("cuda", torch.bfloat16, queries)
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        out = grouped_attention(q, k, v, mask)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
    assert (out.float() - expected).abs().max() <= 2e-2
