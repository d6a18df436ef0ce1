"""Loading checkpoints: sharded files, Hub ids from an offline cache, clear errors."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from nextstep import CheckpointMismatchError, ModelNotFoundError, NextStepPipeline

from ..conftest import ROOT, TINY

KWARGS = dict(negative_prompt="blurry", size=(32, 32), cfg=2.0, num_sampling_steps=3, seed=9)


@pytest.fixture
def model_copy(tmp_path):
    target = tmp_path / "model"
    shutil.copytree(TINY / "model", target)
    return target


def test_sharded_checkpoint_loads_and_generates_the_same(tiny_pipe, model_copy):
    state = load_file(str(model_copy / "model.safetensors"))
    (model_copy / "model.safetensors").unlink()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(model_copy / file))
        weight_map.update({k: file for k in keys})
    (model_copy / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    sharded = NextStepPipeline.from_pretrained(model_copy, vae=TINY / "vae")
    assert torch.equal(sharded.generate("a red circle", **KWARGS).tokens, tiny_pipe.generate("a red circle", **KWARGS).tokens)


def test_vae_from_torch_checkpoint_and_relative_config_path(tiny_pipe, tmp_path, model_copy):
    vae_dir = tmp_path / "vae"
    vae_dir.mkdir()
    shutil.copy(TINY / "vae" / "config.json", vae_dir)
    shutil.copy(TINY / "vae" / "checkpoint.pt", vae_dir)
    config = json.loads((model_copy / "config.json").read_text())
    (model_copy / "config.json").write_text(json.dumps(dict(config, vae_name_or_path="../vae")))
    pipe = NextStepPipeline.from_pretrained(model_copy)  # vae=None: config path, relative to the model
    assert torch.equal(pipe.generate("a red circle", **KWARGS).tokens, tiny_pipe.generate("a red circle", **KWARGS).tokens)


def test_missing_path_names_what_was_looked_for(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        NextStepPipeline.from_pretrained(missing, vae=TINY / "vae")


def test_missing_vae_is_a_clear_error(model_copy):
    with pytest.raises(ModelNotFoundError, match="no VAE"):
        NextStepPipeline.from_pretrained(model_copy)


@pytest.mark.parametrize("change", ["extra", "missing"])
def test_checkpoint_key_mismatch_is_refused_with_the_key_named(model_copy, change):
    state = load_file(str(model_copy / "model.safetensors"))
    if change == "extra":
        state["layers.0.self_attn.rogue.weight"] = torch.zeros(2)
        key = "layers.0.self_attn.rogue.weight"
    else:
        key = "image_out_projector.bias"
        del state[key]
    save_file(state, str(model_copy / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=key.replace(".", r"\.")):
        NextStepPipeline.from_pretrained(model_copy, vae=TINY / "vae")


def test_wrong_shape_is_refused(model_copy):
    state = load_file(str(model_copy / "model.safetensors"))
    state["norm.weight"] = torch.ones(3)
    save_file(state, str(model_copy / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="norm.weight"):
        NextStepPipeline.from_pretrained(model_copy, vae=TINY / "vae")


def test_hub_ids_resolve_from_an_offline_cache(tmp_path):
    """A Hub id is served by huggingface_hub's cache layout with HF_HUB_OFFLINE=1 (fresh process:
    huggingface_hub reads its settings at import)."""
    cache = tmp_path / "hub"
    for repo, source in [("example/tiny-nextstep", TINY / "model"), ("example/tiny-vae", TINY / "vae")]:
        base = cache / f"models--{repo.replace('/', '--')}"
        revision = "0" * 40
        shutil.copytree(source, base / "snapshots" / revision)
        (base / "refs").mkdir(parents=True)
        (base / "refs" / "main").write_text(revision)
    script = textwrap.dedent(
        """
        from nextstep import NextStepPipeline, ModelNotFoundError
        pipe = NextStepPipeline.from_pretrained("example/tiny-nextstep", vae="example/tiny-vae")
        print(pipe.generate("a red circle", size=(32, 32), num_sampling_steps=2, seed=1).images[0].size)
        try:
            NextStepPipeline.from_pretrained("example/not-cached", vae="example/tiny-vae")
        except ModelNotFoundError as error:
            print("missing:", error)
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "home"))
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "(32, 32)" in out.stdout
    assert "missing:" in out.stdout and "example/not-cached" in out.stdout


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loads_and_generates(dtype):
    pipe = NextStepPipeline.from_pretrained(TINY / "model", vae=TINY / "vae", dtype=dtype)
    assert pipe.model.dtype == dtype and pipe.vae.dtype == dtype
    result = pipe.generate("a red circle", **KWARGS)
    assert result.images[0].size == (32, 32) and torch.isfinite(result.tokens).all()


def test_unsupported_dtype_is_refused():
    with pytest.raises(ValueError, match="dtype"):
        NextStepPipeline.from_pretrained(TINY / "model", vae=TINY / "vae", dtype=torch.int8)
