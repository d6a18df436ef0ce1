"""Bytes read per image token: the backbone once, the flow head's per-step part once per step, the KV cache."""

import pytest
import torch

from nextstep.loading.checkpoints import load_model
from nextstep.loading.traffic import token_traffic
from nextstep.models.quantize import held_weights

from ..conftest import TINY


@pytest.mark.parametrize("quantize", [None, "int8", "int4", "fp8"])
def test_one_step_reads_the_loaded_weights_once(quantize):
    model = load_model(TINY / "model", quantize=quantize)
    traffic = token_traffic(model.config, torch.float32, quantize, rows=2, context=10, sampling_steps=1)
    parts = [model.layers, model.norm, model.image_in_projector, model.image_out_projector]
    assert traffic.backbone == sum(held_weights(part)[1] for part in parts)
    assert traffic.head == held_weights(model.image_head)[1]
    config = model.config
    assert traffic.kv_cache == 2 * 10 * 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4


def test_the_head_is_read_at_every_step_but_its_modulations_once():
    config = load_model(TINY / "model").config
    one, ten = (token_traffic(config, torch.float32, None, 2, 10, steps) for steps in (1, 10))
    per_step = (ten.head - one.head) / 9
    assert 0 < per_step < one.head and ten.backbone == one.backbone


def test_int8_converted_per_call_reads_its_copy_too():
    config = load_model(TINY / "model").config
    plain, packed, converted = (token_traffic(config, torch.bfloat16, q, 2, 10, 1, converts=c)
                                for q, c in ((None, False), ("int8", False), ("int8", True)))
    assert packed.backbone < plain.backbone < converted.backbone
