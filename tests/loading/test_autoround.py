"""Checkpoints stored in 4 bits by auto-round (W4A16): written here by auto-round itself from the
NextStep-1.1 fixture (round-to-nearest, no calibration data; groups of 32, since the fixture's
layers are 64 and 32 wide where auto-round's default 128 would not fit), loaded as stored, and
compared with the weights auto-round's own layer dequantizes."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nextstep import NextStepPipeline
from nextstep.loading import checkpoints
from nextstep.loading.autoround import StoredInt4Linear, unpack
from nextstep.loading.checkpoints import load_model
from nextstep.loading.memory import plan
from nextstep.models.quantize import Int4Linear, is_quantized
from nextstep.serving.service import describe

from ..conftest import TINY11
from .test_memory_plan import held_bytes

GROUP = 32
PACKINGS = {"auto_round:auto_gptq": True, "auto_round:auto_awq": False}  # what auto-round writes for sym / asym
# Largest token difference between our loaded checkpoint and a float model holding auto-round's
# dequantized weights, where only the int4 kernels' bfloat16 arithmetic differs: 3.5e-4 when
# written, against 0.01-0.02 between the checkpoint and the unquantized fixture.
GENERATION_TOLERANCE = 0.003


def write_checkpoint(directory, sym: bool):
    """The NextStep-1.1 fixture quantized and saved by auto-round, with the fixture's tokenizer and VAE."""
    from auto_round import AutoRound, RTNConfig
    from transformers import PretrainedConfig, PreTrainedModel

    class Config(PretrainedConfig):
        model_type = "nextstep"

    class NextStep(PreTrainedModel):  # our modules under the official top-level names
        config_class = Config
        base_model_prefix = ""

        def __init__(self, config, inner):
            super().__init__(config)
            for name, child in inner.named_children():
                self.add_module(name, child)

    source = TINY11 / "model"
    model = NextStep(Config(**json.loads((source / "config.json").read_text())), load_model(source)).eval()
    rtn = RTNConfig(group_size=GROUP, sym=sym, disable_opt_rtn=True)
    _, written = AutoRound(model, tokenizer=None, scheme="W4A16", alg_configs=rtn,
                           device_map="cpu").quantize_and_save(str(directory), format="auto_round")
    for item in source.iterdir():
        if item.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(item, written)
    shutil.copytree(source / "vae", f"{written}/vae")
    return type(directory)(written)


@pytest.fixture(scope="module", params=list(PACKINGS))
def stored(request, tmp_path_factory):
    directory = write_checkpoint(tmp_path_factory.mktemp("w4a16"), PACKINGS[request.param])
    assert packing(directory) == request.param
    return directory


def auto_round_weight(directory, name: str) -> torch.Tensor:
    """Layer ``name``'s (out, in) weight as auto-round's own code dequantizes it, float32."""
    from auto_round.export.export_to_awq.utils import dequantize_gemm
    from auto_round_extension.torch.qlinear_torch_zp import QuantLinear

    with safe_open(directory / "model.safetensors", framework="pt") as f:
        tensors = {part: f.get_tensor(f"{name}.{part}") for part in ("qweight", "qzeros", "scales")}
    out_features = tensors["scales"].shape[1]
    if packing(directory) == "auto_round:auto_awq":
        return dequantize_gemm(*tensors.values(), 4, GROUP).float().t()  # (in, out) float16
    layer = QuantLinear(4, GROUP, tensors["qweight"].shape[0] * 8, out_features, bias=False)
    for part, tensor in tensors.items():
        setattr(layer, part, tensor)
    return layer(torch.eye(layer.infeatures)).t()  # its forward is x @ (in, out) dequantized


def packing(directory) -> str:
    return json.loads((directory / "config.json").read_text())["quantization_config"]["packing_format"]


def packed_names(directory) -> list[str]:
    with safe_open(directory / "model.safetensors", framework="pt") as f:
        return [key.removesuffix(".qweight") for key in f.keys() if key.endswith(".qweight")]


def test_unpacking_gives_auto_rounds_weights(stored):
    layout = "gptq" if packing(stored) == "auto_round:auto_gptq" else "awq"
    tensors = load_file(stored / "model.safetensors")
    names = packed_names(stored)
    assert any(n.startswith("layers.") for n in names) and any(n.startswith("image_head.") for n in names)
    for name in names:
        values, scales, zeros = unpack(*(tensors[f"{name}.{p}"] for p in ("qweight", "qzeros", "scales")), layout)
        ours = ((values.float().reshape(*scales.shape, GROUP) - zeros[..., None]) * scales[..., None]).flatten(1)
        theirs = auto_round_weight(stored, name)
        assert values.min() >= 0 and values.max() <= 15
        # auto-round multiplies in float16: equal to its rounding.
        torch.testing.assert_close(ours, theirs, rtol=2**-10, atol=0)


def test_the_checkpoint_loads_as_stored_with_auto_rounds_weights(stored):
    model = load_model(stored)
    assert is_quantized(model) and model.quantization == f"int4 (auto-round W4A16, group {GROUP})"
    for name in packed_names(stored):
        layer = model.get_submodule(name)
        assert isinstance(layer, Int4Linear)
        eye = torch.eye(layer.in_features)
        ours = (layer(eye) - (0 if layer.bias is None else layer.bias)).t()
        theirs = auto_round_weight(stored, name)
        # The int4 kernels take bfloat16 scales and give bfloat16 results.
        torch.testing.assert_close(ours, theirs, rtol=2**-7, atol=2**-7 * theirs.abs().max().item())
    assert not any(isinstance(m, StoredInt4Linear) for m in model.modules())
    assert model.embed_tokens.weight.dtype == torch.float32


def dequantized_pipeline(directory) -> NextStepPipeline:
    """A float pipeline of the same checkpoint holding auto-round's dequantized weights."""
    float_dir = directory.parent / (directory.name + "-dequantized")
    if not float_dir.exists():
        shutil.copytree(directory, float_dir)
        tensors = load_file(directory / "model.safetensors")
        for name in packed_names(directory):
            for part in ("qweight", "qzeros", "scales"):
                del tensors[f"{name}.{part}"]
            tensors[f"{name}.weight"] = auto_round_weight(directory, name)
        save_file({k: v.contiguous() for k, v in tensors.items()}, float_dir / "model.safetensors")
        config = json.loads((float_dir / "config.json").read_text())
        del config["quantization_config"]
        (float_dir / "config.json").write_text(json.dumps(config))
    return NextStepPipeline.from_pretrained(float_dir)


@pytest.mark.parametrize("image", [False, True])
def test_generation_matches_auto_rounds_dequantized_model(stored, image):
    pipe, reference = NextStepPipeline.from_pretrained(stored), dequantized_pipeline(stored)
    assert pipe.family == "nextstep-1.1"
    settings = dict(size=(64, 64), num_sampling_steps=6, cfg=3.0, seed=5)
    source = reference.generate("a red square", **settings).images[0] if image else None
    ours, theirs = (p.generate("a blue circle" if image else "a red square", source, **settings) for p in (pipe, reference))
    assert (ours.tokens - theirs.tokens).abs().max() <= GENERATION_TOLERANCE
    assert ours.parameters["quantization"] == f"int4 (auto-round W4A16, group {GROUP})"
    assert describe(pipe)["quantization"] == ours.parameters["quantization"]


def test_the_memory_plan_counts_what_loading_holds(stored):
    model = load_model(stored)
    counted = plan(stored, stored / "vae", torch.float32, None, "cpu")
    assert counted.weights_bytes == held_bytes(model)
    assert counted.quantize.startswith("int4 (auto-round")


def with_config(stored, directory, **changes):
    """A copy of the checkpoint in ``directory`` whose quantization_config has ``changes`` (None deletes a field)."""
    shutil.copytree(stored, directory)
    config = json.loads((directory / "config.json").read_text())
    for key, value in changes.items():
        config["quantization_config"].pop(key, None) if value is None else config["quantization_config"].update({key: value})
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture
def no_tensor_read(monkeypatch):
    """Reading any checkpoint tensor fails the test."""
    def read(*args, **kwargs):
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(checkpoints.Checkpoint, "tensors", read)


@pytest.mark.parametrize("changes, message", [
    (dict(bits=8), "bits 8"),
    (dict(bits=None), "bits None"),
    (dict(data_type="fp"), "data_type 'fp'"),
    (dict(packing_format="auto_round:gptqmodel"), "packing_format 'auto_round:gptqmodel'"),
    (dict(packing_format=None), "packing_format None"),
    (dict(quant_method="gptq"), "quant_method 'gptq'"),
    (dict(group_size=48), "group_size 48"),
    (dict(group_size=-1), "group_size -1"),
    (dict(act_bits=8), "act_bits 8"),
    (dict(desc_act=True), "act-order"),
    (dict(block_name_to_quantize=None), "no block_name_to_quantize"),
    (dict(extra_config={"layers.0.mlp.down_proj": {"bits": 8}}), "extra_config sets 'layers.0.mlp.down_proj'"),
])
def test_an_unsupported_quantization_config_is_refused_before_any_tensor_is_read(stored, tmp_path, no_tensor_read,
                                                                                 changes, message):
    directory = with_config(stored, tmp_path / "changed", **changes)
    with pytest.raises(ValueError, match=f"unsupported quantization_config \\({message}"):
        load_model(directory)
    with pytest.raises(ValueError, match="unsupported quantization_config"):
        NextStepPipeline.from_pretrained(directory)  # the memory plan reads the config first


def test_a_malformed_checkpoint_is_refused_before_any_tensor_is_read(stored, tmp_path, no_tensor_read):
    directory = with_config(stored, tmp_path / "group", group_size=64)  # the scales' shapes say 32
    with pytest.raises(checkpoints.CheckpointMismatchError, match="wrong shape.*scales"):
        load_model(directory)
    directory = with_config(stored, tmp_path / "act-order")
    tensors = load_file(stored / "model.safetensors")
    tensors["layers.0.self_attn.q_proj.g_idx"] = torch.arange(64, dtype=torch.int32) // GROUP
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(ValueError, match="act-order \\(g_idx\\)"):
        load_model(directory)


def test_the_checkpoint_needs_the_int4_kernels_and_loads_only_as_stored(stored, no_tensor_read):
    with pytest.raises(ValueError, match="stored in 4 bits .*int4 needs a GPU of compute capability 8.0"):
        load_model(stored, device="cuda")  # no CUDA device on this machine
    with pytest.raises(ValueError, match="stored in 4 bits .*leave quantize out"):
        NextStepPipeline.from_pretrained(stored, quantize="int8")
