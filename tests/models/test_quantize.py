"""Quantization of the backbone (int8, int4, fp8): applied layer by layer while loading, held packed
for its kernels, and generation within a stated distance of the unquantized model on both fixture
families and the embedded model (CPU, float32 model; the packed int8 and int4 kernels take
bfloat16 activations, fp8 quantizes them to e4m3)."""

import pytest
import torch

from nextstep import NextStepPipeline
from nextstep.loading import checkpoints
from nextstep.loading.checkpoints import load_model, save_model
from nextstep.models.quantize import (
    Fp8Linear,
    Int4Linear,
    Int8Linear,
    check_quantization,
    is_quantized,
    quantized_linears,
)
from nextstep.serving.reservation import ModelCost
from nextstep.serving.service import describe
from nextstep.tools.schemes import image_psnr

from ..conftest import ROOT, TINY, TINY11, api_kwargs, load_case

SHAPES = ROOT / "assets" / "shapes-model"
# (max |token difference|, min image PSNR in dB) allowed against the unquantized model. Measured when
# written (worst case of the cases below): fixtures int8 0.0021 / 65.2 dB, int4 0.070 / 52.9 dB,
# fp8 0.035 / 56.6 dB; the embedded model int8 0.042 / 59.3 dB, int4 0.40 / 41.5 dB, fp8 0.30 / 44.6 dB.
FIXTURE_TOLERANCE = {"int8": (0.01, 55.0), "int4": (0.2, 45.0), "fp8": (0.1, 50.0)}
EMBEDDED_TOLERANCE = {"int8": (0.1, 50.0), "int4": (0.8, 36.0), "fp8": (0.6, 40.0)}


def quantized(pipe: NextStepPipeline, quantize: str) -> NextStepPipeline:
    """The same checkpoint and VAE with the backbone quantized while loading."""
    model = load_model(pipe.directory, quantize=quantize)
    return NextStepPipeline(
        model, pipe.vae, pipe.tokenizer, name=pipe.name, family=pipe.family, directory=pipe.directory
    )


def assert_close(base, quant, tolerance):
    max_token, min_psnr = tolerance
    assert (base.tokens - quant.tokens).abs().max() <= max_token
    assert image_psnr(base.images, quant.images) >= min_psnr


@pytest.mark.parametrize("quantize", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("directory, case", [(TINY, "t2i_cfg"), (TINY, "edit"), (TINY11, "t2i_sde"), (TINY11, "edit")])
def test_quantized_fixture_generation_stays_close(tiny_pipe, tiny11_pipe, quantize, directory, case):
    pipe = tiny_pipe if directory == TINY else tiny11_pipe
    args, _, image = load_case(directory, case)
    kwargs = api_kwargs(args) | ({"sampler": args["sde_type"]} if directory == TINY11 else {})
    base = pipe.generate(args["captions"], image, **kwargs)
    quant = quantized(pipe, quantize).generate(args["captions"], image, **kwargs)
    assert_close(base, quant, FIXTURE_TOLERANCE[quantize])
    assert not torch.equal(base.tokens, quant.tokens)  # the quantized weights are the ones used
    assert quant.parameters["quantization"] == quantize and "quantization" not in base.parameters


@pytest.fixture(scope="module")
def shapes_pipe():
    return NextStepPipeline.from_pretrained(SHAPES)


@pytest.mark.parametrize("quantize", ["int8", "int4", "fp8"])
def test_quantized_embedded_model_stays_close(shapes_pipe, quantize):
    """The trained shapes model with its stored settings: a picture, then an edit of it."""
    pipe = quantized(shapes_pipe, quantize)
    prompt = "a large red circle in the center on a white background"
    base, quant = (p.generate(prompt, seed=3) for p in (shapes_pipe, pipe))
    assert_close(base, quant, EMBEDDED_TOLERANCE[quantize])
    source = base.images[0]
    base, quant = (p.generate("make the background blue", source, seed=4) for p in (shapes_pipe, pipe))
    assert_close(base, quant, EMBEDDED_TOLERANCE[quantize])


@pytest.mark.parametrize("quantize, kind, tensors", [
    ("int8", Int8Linear, {"qdata": (torch.int8, (64, 128)), "scales": (torch.bfloat16, (64,))}),
    # 4 bits a weight in the CPU kernel's layout; a bfloat16 scale and zero per group of 128 inputs.
    ("int4", Int4Linear, {"packed": (torch.uint8, (64, 64)), "scale_and_zero": (torch.bfloat16, (1, 64, 2))}),
    ("fp8", Fp8Linear, {"qdata": (torch.float8_e4m3fn, (64, 128)), "scales": (torch.float32, (1, 64))}),
])
def test_backbone_weights_are_held_packed(quantize, kind, tensors):
    model = load_model(TINY / "model", quantize=quantize)
    assert is_quantized(model) and model.quantization == quantize
    layer = model.layers[1].mlp.down_proj
    assert type(layer) is kind
    assert {name: (t.dtype, tuple(t.shape)) for name, t in layer.named_buffers()} == tensors
    assert len(quantized_linears(load_model(TINY / "model"))) == 14  # every backbone linear fits every scheme
    assert model.image_head.net.input_proj.weight.dtype == torch.float32  # the flow head is left as loaded
    assert model.embed_tokens.weight.dtype == torch.float32
    assert not is_quantized(load_model(TINY / "model"))


@pytest.mark.parametrize("quantize", ["int8", "int4", "fp8"])
def test_the_model_panel_and_the_gpu_estimate_count_packed_weights(tiny_pipe, quantize):
    pipe = quantized(tiny_pipe, quantize)
    info = describe(pipe)
    assert info["quantization"] == quantize and info["parameters"] == describe(tiny_pipe)["parameters"]
    plain, packed = ModelCost.of(tiny_pipe.model), ModelCost.of(pipe.model)
    assert packed.backbone_params == plain.backbone_params
    assert (packed.reads.head_token, packed.reads.head_step) == (plain.reads.head_token, plain.reads.head_step)
    assert packed.reads.held < plain.reads.held
    if quantize == "int8":  # on a GPU, uncompiled (ZeroGPU), converted at every call: written, then read
        assert packed.reads.backbone > plain.reads.backbone
    else:
        assert packed.reads.backbone < plain.reads.backbone


def test_int4_groups_follow_the_input_width():
    model = load_model(TINY / "model", quantize="int4")
    assert model.layers[0].self_attn.q_proj.group_size == 64  # 64 inputs: one group of 64
    assert model.layers[0].mlp.down_proj.group_size == 128


@pytest.mark.parametrize("quantize", ["int8", "int4", "fp8"])
def test_each_weight_is_packed_before_the_next_is_read(monkeypatch, quantize):
    """Never two full-precision backbone weights loaded at once: a 14B backbone is never on the device in bf16."""
    quantize_linear = checkpoints.quantize_linear
    most = []

    def counting(model, name, scheme):
        loaded = [lin for lin in quantized_linears(model).values() if lin.weight.device.type != "meta"]
        most.append(len(loaded))
        quantize_linear(model, name, scheme)

    monkeypatch.setattr(checkpoints, "quantize_linear", counting)
    load_model(TINY / "model", quantize=quantize)
    assert len(most) == 14 and max(most) == 1  # 2 layers x 7 linears, each alone in full precision


def test_unsupported_choices_are_refused():
    with pytest.raises(ValueError, match="quantize must be one of int8, int4, fp8"):
        load_model(TINY / "model", quantize="int2")
    # No CUDA device on this machine, so none with the kernels: the message names what they need.
    with pytest.raises(ValueError, match="fp8 needs a GPU of compute capability 8.9 or later .*use quantize=int8"):
        check_quantization("fp8", "cuda")
    with pytest.raises(ValueError, match="int4 needs a GPU of compute capability 8.0 or later \\(Ampere"):
        NextStepPipeline.from_pretrained(TINY / "model", vae=TINY / "vae", device="cuda", quantize="int4")
    with pytest.raises(ValueError, match="int4 needs"):
        check_quantization("int4", "mps")


def test_a_quantized_model_is_not_saved(tmp_path):
    with pytest.raises(ValueError, match="quantized model cannot be saved"):
        save_model(load_model(TINY / "model", quantize="int4"), tmp_path)
