"""The memory plan: counted from config.json alone, equal to what loading allocates, and an early refusal."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from nextstep import NextStepPipeline
from nextstep.engine.token_loop import cache_slots
from nextstep.loading.checkpoints import Checkpoint, load_model
from nextstep.loading.memory import (
    GIB,
    MEMORY_LIMIT,
    NotEnoughMemoryError,
    Workload,
    combine,
    free_memory,
    parse_bytes,
    plan,
    prefill_bytes,
    prompt_tokens,
    vae_working_bytes,
)
from nextstep.models.config import NextStepConfig
from nextstep.models.vae import VAEConfig
from nextstep.tools import bench
from nextstep.tools.shapes import _BACKBONE_BASE, CONFIGS

from ..conftest import ROOT, TINY


def large_config() -> tuple[NextStepConfig, VAEConfig]:
    backbone, vae = CONFIGS["nextstep-1-large"]
    return NextStepConfig(**_BACKBONE_BASE, **backbone), vae


def held_bytes(module: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer, a quantized weight counted by the tensors it holds."""
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        names, _ = tensor.__tensor_flatten__() if hasattr(tensor, "__tensor_flatten__") else ([], None)
        parts = [getattr(tensor, name) for name in names] or [tensor]
        total += sum(part.numel() * part.element_size() for part in parts)
    return total


def test_the_14b_plan_is_counted_on_the_meta_device():
    config, vae = large_config()
    result = plan(config, vae, torch.bfloat16, None, "cpu", Workload.text_to_image(), name="nextstep-1-large")
    # 14.95 B parameters in the release, of which lm_head's 152064 x 5120 is never built.
    lm_head = 152064 * 5120
    assert result.weights_bytes == pytest.approx((14.95e9 - lm_head) * 2, rel=2e-3)
    assert 26.3 < result.to_dict()["weights_gib"] < 26.5
    int8 = plan(config, vae, torch.bfloat16, "int8", "cpu", Workload.text_to_image())
    assert int8.weights_bytes < 0.54 * result.weights_bytes
    fields = result.to_dict()
    assert {"weights_gib", "kv_cache_gib", "peak_gib"} <= set(fields)
    assert fields["peak_gib"] == pytest.approx(result.peak_bytes / GIB)


def test_kv_cache_is_what_the_static_cache_allocates():
    model = load_model(TINY / "model")
    vae = VAEConfig(ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=1)
    for workload in (Workload.text_to_image("128x64"), Workload.edit("64x64", images=2)):
        prompt, image_tokens = prompt_tokens(model.config, vae, workload)
        cache = model.new_cache(workload.rows, cache_slots(prompt + image_tokens))
        allocated = sum(t.numel() * t.element_size() for t in (*cache.keys, *cache.values, cache.key_valid))
        counted = plan(model.config, vae, torch.float32, None, "cpu", workload).kv_cache_bytes
        assert counted == allocated


@pytest.mark.parametrize("dtype, quantize", [(torch.float32, None), (torch.bfloat16, None), (torch.float32, "int8"),
                                             (torch.bfloat16, "int8"), (torch.bfloat16, "fp8"), (torch.float32, "int4"),
                                             (torch.bfloat16, "int4")])
def test_planned_weights_equal_the_loaded_model(dtype, quantize):
    model = load_model(TINY / "model", dtype=dtype, quantize=quantize)
    assert plan(TINY / "model", TINY / "vae", dtype, quantize, "cpu").weights_bytes == held_bytes(model)


def test_int4_brings_the_14b_model_under_12_gb():
    """NextStep-1-Large at 512x512 on a GPU in bfloat16: 4 bits and a bfloat16 scale and zero per 128
    weights for the backbone's linears (0.53 bytes a weight), the rest as loaded."""
    config, vae = large_config()
    text = plan(config, vae, torch.bfloat16, "int4", "cuda", Workload.text_to_image(), name="nextstep-1-large")
    edit = plan(config, vae, torch.bfloat16, "int4", "cuda", Workload.edit(), name="nextstep-1-large")
    # The edit's working set holds its prefill beside the previous batch's VAE decode.
    assert text.peak_bytes <= 11.5 * GIB and edit.peak_bytes <= 15.5 * GIB
    assert text.to_dict()["weights_gib"] == pytest.approx(8.34, abs=0.01)
    assert text.working_bytes == plan(config, vae, torch.bfloat16, None, "cuda", Workload.text_to_image()).working_bytes


def test_a_model_that_does_not_fit_is_refused_with_the_need_the_free_memory_and_the_options():
    config, vae = large_config()
    result = plan(config, vae, torch.bfloat16, None, "cpu", Workload.edit(), name="NextStep-1-Large")
    free = 22 * GIB  # a 24 GB card with the desktop on it
    assert not result.fits(free)
    with pytest.raises(NotEnoughMemoryError) as caught:
        result.check(free)
    message = str(caught.value)
    assert "NextStep-1-Large" in message and "peak 32." in message and "22.00 GiB is free" in message
    assert "--quantize int8 (needs 20.06" in message and "--quantize int4 (needs 14.29" in message
    assert "smaller request" in message
    assert isinstance(caught.value, ValueError)  # front ends show ValueErrors as messages
    plan(config, vae, torch.bfloat16, "int8", "cpu", Workload.edit()).check(free)  # the option it names fits


def test_two_models_on_one_device_add_up_and_name_a_second_device():
    config, vae = large_config()
    both = combine([
        plan(config, vae, torch.bfloat16, None, "cpu", Workload.text_to_image(), name="NextStep-1-Large"),
        plan(config, vae, torch.bfloat16, None, "cpu", Workload.edit(), name="NextStep-1-Large-Edit"),
    ])
    assert 55 * GIB < both.peak_bytes < 62 * GIB
    with pytest.raises(NotEnoughMemoryError, match="NextStep-1-Large \\+ NextStep-1-Large-Edit.*second device"):
        both.check(46 * GIB)


def test_the_memory_limit_caps_free_memory(monkeypatch):
    monkeypatch.setenv(MEMORY_LIMIT, "1MiB")
    assert free_memory("cpu") == 2**20
    with pytest.raises(NotEnoughMemoryError, match="0.00 GiB is free"):
        plan(TINY / "model", TINY / "vae", torch.float32, None, "cpu").check()
    monkeypatch.delenv(MEMORY_LIMIT)
    assert free_memory("cpu") > 2**20
    plan(TINY / "model", TINY / "vae", torch.float32, None, "cpu").check()


def test_sizes_parse():
    assert parse_bytes("24GiB") == 24 * GIB and parse_bytes("80GB") == 80 * 10**9 and parse_bytes("512") == 512
    with pytest.raises(ValueError, match="24GiB"):
        parse_bytes("lots")


def test_fp8_is_not_offered_where_the_device_has_none():
    config, vae = large_config()
    message = plan(config, vae, torch.bfloat16, None, "cuda", Workload.edit()).refusal(GIB)
    assert "--quantize int8" in message and "fp8" not in message  # no CUDA device here


def test_running_out_of_memory_while_loading_is_the_same_clear_error(monkeypatch):
    """Should memory run out anyway (another process took it), no raw traceback from the reader."""

    def exhausted(self, keys, device, dtype):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 270.00 MiB")
        yield

    monkeypatch.setattr(Checkpoint, "tensors", exhausted)
    refusal = r"to load .*reference-tiny/model \(float32\): its weights take .* free now"
    with pytest.raises(NotEnoughMemoryError, match=refusal):
        NextStepPipeline.from_pretrained(TINY / "model", vae=TINY / "vae", check_memory=False)


def test_a_directory_plan_reads_only_the_configs(tmp_path):
    """What a Hub id resolved with hub.CONFIG_FILES holds: no weights, and the plan is the same."""
    (tmp_path / "model").mkdir()
    (tmp_path / "vae").mkdir()
    shutil.copy(TINY / "model" / "config.json", tmp_path / "model")
    shutil.copy(TINY / "vae" / "config.json", tmp_path / "vae")
    alone = plan(tmp_path / "model", tmp_path / "vae", torch.bfloat16, "int8", "cpu")
    assert alone == plan(TINY / "model", TINY / "vae", torch.bfloat16, "int8", "cpu")


def test_the_app_refuses_a_model_that_does_not_fit_with_the_message_not_a_traceback():
    done = subprocess.run(
        [sys.executable, "app.py", "--model", str(TINY / "model"), "--vae", str(TINY / "vae")], cwd=ROOT,
        capture_output=True, text=True, timeout=120, env=dict(os.environ, **{MEMORY_LIMIT: "1MiB"}),
    )
    assert done.returncode != 0
    assert "not enough memory" in done.stderr and "is free. Options:" in done.stderr
    assert "Traceback" not in done.stderr


def test_from_pretrained_checks_the_plan_before_reading_weights(monkeypatch):
    monkeypatch.setenv(MEMORY_LIMIT, "1MiB")
    monkeypatch.setattr(Checkpoint, "tensors", lambda *args, **kwargs: pytest.fail("weights were read"))
    with pytest.raises(NotEnoughMemoryError, match="not enough memory"):
        NextStepPipeline.from_pretrained(TINY / "model", vae=TINY / "vae")


def test_the_bench_prints_the_plan_of_the_real_shape(capsys):
    assert bench.main(["--config", "nextstep-1-large", "--plan", "--dtype", "bfloat16", "--edit", "--json"]) == 0
    fields = json.loads(capsys.readouterr().out)
    assert fields["weights_gib"] == pytest.approx(26.41, abs=0.01)
    assert fields["peak_gib"] > fields["weights_gib"] + fields["kv_cache_gib"]
    assert fields["zerogpu_seconds"] == fields["zerogpu_basis"]["seconds"] > 0


def test_a_gpu_plan_counts_the_cuda_context_and_a_decode_beside_the_prefill():
    config, vae = large_config()
    on_cpu = plan(config, vae, torch.bfloat16, None, "cpu", Workload.text_to_image())
    on_gpu = plan(config, vae, torch.bfloat16, None, "cuda", Workload.text_to_image())
    assert on_gpu.peak_bytes - on_cpu.peak_bytes == GIB and "CUDA context 1.00 GiB" in on_gpu.describe()
    workload = Workload.text_to_image()
    assert on_cpu.working_bytes == (prefill_bytes(config, vae, workload, 2, None)
                                    + vae_working_bytes(vae, workload, 2))



def test_the_bench_counts_the_operations_of_a_token(capsys):
    assert bench.main(["--config", "tiny", "--count-ops", "--num-sampling-steps", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    operations = report["operations"]
    assert operations["total"] == operations["backbone"] + operations["head"] + operations["sampler"] > 0
    assert report["request"] == dict(sampler="v1", num_sampling_steps=3, rows=2)
