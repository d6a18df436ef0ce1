"""The flash-attn 2 path (CUDA only) is wired to the cache as SDPA is; without it, grouped KV
heads reach SDPA in a form its fused CUDA kernels take.

flash-attn cannot run here, so stand-in kernels compute what its two functions are documented to
compute (variable-length causal attention; attention over a KV cache read from ``cache_leftpad``
to ``cache_seqlens``) with plain tensor operations, registered as custom ops the way the flash
ones are (``nextstep.models.attention``). The backbone with them must give the hidden states it
gives with SDPA, padding and all, and a step compiled whole must take them (tests/engine/
test_compiled_step.py).
"""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from nextstep.models.attention import (
    AttentionKernels,
    attention_mask,
    grouped_attention,
)
from nextstep.models.backbone import StaticKVCache


def _attend(q, k, v, causal_offset):
    """q (Tq, nh, hd), k/v (Tk, nkv, hd); query i sees keys j <= i + causal_offset."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
    allowed = torch.arange(k.shape[0])[None, :] <= torch.arange(q.shape[0])[:, None] + causal_offset
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v)


@torch.library.custom_op("nextstep_test::prefill", mutates_args=())
def stand_in_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     longest: int) -> torch.Tensor:
    """flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, longest, longest, causal=True)."""
    out = torch.empty_like(q)
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        out[start:end] = _attend(q[start:end], k[start:end], v[start:end], 0)
    return out


@torch.library.custom_op("nextstep_test::decode", mutates_args=())
def stand_in_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                    left_padding: torch.Tensor) -> torch.Tensor:
    """flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, cache_leftpad=left_padding, causal=True)."""
    assert k_cache.stride(-1) == 1
    out = torch.empty_like(q)
    for row in range(q.shape[0]):
        first, end = int(left_padding[row]), int(lengths[row])
        keys, values = k_cache[row, first:end], v_cache[row, first:end]
        out[row] = _attend(q[row], keys, values, keys.shape[0] - q.shape[1])
    return out


stand_in_prefill.register_fake(lambda q, k, v, cu_seqlens, longest: torch.empty_like(q))
stand_in_decode.register_fake(lambda q, k_cache, v_cache, lengths, left_padding: torch.empty_like(q))
STAND_IN = AttentionKernels(torch.ops.nextstep_test.decode, torch.ops.nextstep_test.prefill)


def run_backbone(model, kernels):
    generator = torch.Generator().manual_seed(0)
    hidden = model.config.hidden_size
    embeds = torch.randn(3, 6, hidden, generator=generator)
    valid = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    cache = StaticKVCache(model.config, 3, 10, "cpu", torch.float32, kernels=kernels)
    with torch.no_grad():
        outputs = [model.forward_backbone(embeds, torch.arange(6), valid, cache, prompt_valid=valid)]
        for step in range(4):
            token = torch.randn(3, 1, hidden, generator=generator)
            outputs.append(model.forward_backbone(token, torch.tensor([6 + step]), torch.ones(3, 1, dtype=torch.bool), cache))
    return outputs, valid


def test_flash_path_matches_sdpa(tiny_pipe):
    reference, valid = run_backbone(tiny_pipe.model, None)
    flash, _ = run_backbone(tiny_pipe.model, STAND_IN)
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
