"""Weight-only int8 / fp8 quantization of the backbone: applied tensor by tensor while loading, and
generation within a stated distance of the unquantized model on both fixture families and the
embedded model (CPU, float32 activations)."""

import importlib.util
import math

import pytest
import torch

from nextstep import NextStepPipeline
from nextstep.loading import checkpoints
from nextstep.loading.checkpoints import load_model, save_model
from nextstep.models.quantize import check_quantization, is_quantized, quantized_linears

from ..conftest import ROOT, TINY, TINY11, api_kwargs, images_as_array, load_case

SHAPES = ROOT / "assets" / "shapes-model"
# (max |token difference|, min image PSNR in dB) allowed against the unquantized model. Measured when
# written (worst case of the cases below): fixtures int8 0.0033 / 64.6 dB, fp8 0.019 / 58.7 dB;
# the embedded model int8 0.035 / 60.2 dB, fp8 0.087 / 51.2 dB.
FIXTURE_TOLERANCE = {"int8": (0.01, 55.0), "fp8": (0.05, 50.0)}
EMBEDDED_TOLERANCE = {"int8": (0.1, 50.0), "fp8": (0.25, 45.0)}


def quantized(pipe: NextStepPipeline, quantize: str) -> NextStepPipeline:
    """The same checkpoint and VAE with the backbone quantized while loading."""
    model = load_model(pipe.directory, quantize=quantize)
    return NextStepPipeline(
        model, pipe.vae, pipe.tokenizer, name=pipe.name, family=pipe.family, directory=pipe.directory
    )


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.float() - b.float()) ** 2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def assert_close(base, quant, tolerance):
    max_token, min_psnr = tolerance
    assert (base.tokens - quant.tokens).abs().max() <= max_token
    assert psnr(images_as_array(base.images), images_as_array(quant.images)) >= min_psnr


@pytest.mark.parametrize("quantize", ["int8", "fp8"])
@pytest.mark.parametrize("directory, case", [(TINY, "t2i_cfg"), (TINY, "edit"), (TINY11, "t2i_sde"), (TINY11, "edit")])
def test_quantized_fixture_generation_stays_close(tiny_pipe, tiny11_pipe, quantize, directory, case):
    pipe = tiny_pipe if directory == TINY else tiny11_pipe
    args, _, image = load_case(directory, case)
    kwargs = api_kwargs(args) | ({"sampler": args["sde_type"]} if directory == TINY11 else {})
    base = pipe.generate(args["captions"], image, **kwargs)
    quant = quantized(pipe, quantize).generate(args["captions"], image, **kwargs)
    assert_close(base, quant, FIXTURE_TOLERANCE[quantize])
    assert not torch.equal(base.tokens, quant.tokens)  # the quantized weights are the ones used


@pytest.fixture(scope="module")
def shapes_pipe():
    return NextStepPipeline.from_pretrained(SHAPES)


@pytest.mark.parametrize("quantize", ["int8", "fp8"])
def test_quantized_embedded_model_stays_close(shapes_pipe, quantize):
    """The trained shapes model with its stored settings: a picture, then an edit of it."""
    pipe = quantized(shapes_pipe, quantize)
    prompt = "a large red circle in the center on a white background"
    base, quant = (p.generate(prompt, seed=3) for p in (shapes_pipe, pipe))
    assert_close(base, quant, EMBEDDED_TOLERANCE[quantize])
    source = base.images[0]
    base, quant = (p.generate("make the background blue", source, seed=4) for p in (shapes_pipe, pipe))
    assert_close(base, quant, EMBEDDED_TOLERANCE[quantize])


@pytest.mark.parametrize("quantize, stored", [("int8", torch.int8), ("fp8", torch.float8_e4m3fn)])
def test_backbone_weights_are_held_quantized(quantize, stored):
    model = load_model(TINY / "model", quantize=quantize)
    assert is_quantized(model)
    weight = model.layers[1].mlp.down_proj.weight
    assert weight.qdata.dtype == stored and weight.qdata.shape == (64, 128)
    assert model.image_head.net.input_proj.weight.dtype == torch.float32  # the flow head is left as loaded
    assert model.embed_tokens.weight.dtype == torch.float32
    assert not is_quantized(load_model(TINY / "model"))


def test_each_weight_is_quantized_before_the_next_is_read(monkeypatch):
    """Never two full-precision backbone weights loaded at once: a 14B backbone is never on the device in bf16."""
    quantize_linear = checkpoints.quantize_linear
    linears, most = [], []

    def capture(model):
        found = quantized_linears(model)
        linears.extend(found.values())
        return found

    def counting(linear, quantize):
        loaded = [lin for lin in linears if lin.weight.device.type != "meta"]
        most.append(sum(1 for lin in loaded if type(lin.weight.data) is torch.Tensor))
        quantize_linear(linear, quantize)

    monkeypatch.setattr(checkpoints, "quantized_linears", capture)
    monkeypatch.setattr(checkpoints, "quantize_linear", counting)
    load_model(TINY / "model", quantize="int8")
    assert len(most) == 14 and max(most) == 1  # 2 layers x 7 linears, each alone in full precision


def test_unsupported_choices_are_refused():
    with pytest.raises(ValueError, match="quantize must be one of int8, fp8"):
        load_model(TINY / "model", quantize="int4")
    with pytest.raises(ValueError, match="fp8 needs a GPU with native FP8.*use quantize='int8'"):
        check_quantization("fp8", "cuda")  # no CUDA device on this machine, so none with FP8
    with pytest.raises(ValueError, match="fp8 needs"):
        check_quantization("fp8", "mps")


def test_a_quantized_model_is_not_saved(tmp_path):
    with pytest.raises(ValueError, match="quantized model cannot be saved"):
        save_model(load_model(TINY / "model", quantize="int8"), tmp_path)


def test_without_torchao_quantization_is_refused_with_the_install_command(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else find_spec(name, *a))
    with pytest.raises(ValueError, match="pip install torchao"):
        NextStepPipeline.from_pretrained(TINY / "model", vae=TINY / "vae", quantize="int8")
