"""The CUDA kernels of each quantization scheme, where a GPU with them is present (skipped elsewhere):
each packed layer close to its float layer at NextStep-1-Large's shapes, and the int4 layout built
from a checkpoint's integers (CUDA tiles) giving what the CPU layout gives."""

import pytest
import torch

from nextstep.models.quantize import SCHEMES, Int4Linear, supported

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# Largest error relative to the output's largest value, per scheme, at 5120 -> 13824 with weights
# of standard deviation 0.02: about twice what the CPU kernels give (int8 0.0086, int4 0.094, fp8 0.037).
RELATIVE = {"int8": 0.02, "int4": 0.2, "fp8": 0.08}


@pytest.mark.parametrize("quantize", list(SCHEMES))
def test_packed_layer_is_close_to_its_float_layer(quantize):
    if not supported(quantize, "cuda"):
        pytest.skip(f"this GPU has no {quantize} kernels")
    torch.manual_seed(0)
    linear = torch.nn.Linear(5120, 13824, device="cuda", dtype=torch.bfloat16)
    torch.nn.init.normal_(linear.weight, std=0.02)
    x = torch.randn(3, 5120, device="cuda", dtype=torch.bfloat16)
    expected = linear(x).float()
    got = SCHEMES[quantize].from_linear(linear)(x).float()
    assert (got - expected).abs().max() <= RELATIVE[quantize] * expected.abs().max()


def test_int4_from_integers_gives_the_cpu_layouts_result():
    if not supported("int4", "cuda"):
        pytest.skip("this GPU has no int4 kernels")
    torch.manual_seed(0)
    out_features, in_features, group = 1024, 5120, 128
    values = torch.randint(0, 16, (out_features, in_features), dtype=torch.int32)
    scales = torch.rand(out_features, in_features // group) * 0.01
    zeros = torch.randn(out_features, in_features // group) * 0.01
    x = torch.randn(2, in_features)
    cpu = Int4Linear.from_integers(values, scales, zeros, group, None)(x)
    gpu = Int4Linear.from_integers(values.cuda(), scales.cuda(), zeros.cuda(), group, None)(x.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=2**-6, atol=2**-6 * cpu.abs().max().item())
