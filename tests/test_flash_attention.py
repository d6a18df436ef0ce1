"""The flash-attn 2 path (CUDA only) is wired to the cache as SDPA is.

flash-attn cannot run here, so a stand-in module computes what its two functions are
documented to compute (variable-length causal attention; attention over a KV cache read from
``cache_leftpad`` to ``cache_seqlens``) with plain tensor operations. The backbone with that
module must give the hidden states it gives with SDPA, padding and all.
"""

import types

import torch

from nextstep.backbone import StaticKVCache


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
