"""Checkpoints spelled as the public releases spell them, loaded through from_pretrained and checked
against what the official loading code does with them (the fixtures' numbers where it matches ours)."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from nextstep import CheckpointMismatchError, NextStepPipeline
from nextstep.models.model import sincos_2d_table

from ..conftest import TINY, TINY11, TOKEN_TOL, api_kwargs, images_as_array, load_case


def edit_config(directory, **changes):
    """Rewrite ``directory/config.json`` with ``changes``; a value of ``...`` deletes the key."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            del config[key]
        else:
            config[key] = value
    path.write_text(json.dumps(config, indent=2))


def edit_weights(directory, change):
    path = directory / "model.safetensors"
    state = load_file(str(path))
    change(state)
    save_file(state, str(path))


@pytest.fixture
def tiny_copy(tmp_path):
    shutil.copytree(TINY / "model", tmp_path / "model")
    return tmp_path / "model"


@pytest.fixture
def tiny11_copy(tmp_path):
    shutil.copytree(TINY11 / "model", tmp_path / "model")
    return tmp_path / "model"


def assert_matches_case(pipe, directory, case, **extra):
    args, ref, image = load_case(directory, case)
    result = pipe.generate(args["captions"], image, **extra, **api_kwargs(args))
    assert (result.tokens - ref["tokens"]).abs().max() <= TOKEN_TOL
    assert (images_as_array(result.images).int() - ref["image"].int()).abs().max() <= 1
    return result


def test_pretrain_spelling_with_base_image_grid_size_is_nextstep_1(tiny_copy):
    """NextStep-1-Large-Pretrain's config carries base_image_grid_size: 32 beside fm_head_* keys."""
    edit_config(tiny_copy, base_image_grid_size=32)
    pipe = NextStepPipeline.from_pretrained(tiny_copy, vae=TINY / "vae")
    assert pipe.family == "nextstep-1"
    assert_matches_case(pipe, TINY, "t2i_cfg")


def test_genloss_spelling_alone_makes_nextstep_1_1(tiny11_copy):
    """Without base_image_grid_size, 1.1's genloss_* keys still name the family."""
    edit_config(tiny11_copy, base_image_grid_size=...)
    pipe = NextStepPipeline.from_pretrained(tiny11_copy)
    assert pipe.family == "nextstep-1.1"
    assert_matches_case(pipe, TINY11, "t2i_sde", sampler="sde")


def test_o_attention_bias_absent_without_biases_in_the_file(tiny_copy):
    """Officially o_attention_bias follows attention_bias (true here) and the absent biases are
    zero-filled: the fixture's numbers, which were made without o_proj biases."""
    edit_config(tiny_copy, o_attention_bias=...)
    pipe = NextStepPipeline.from_pretrained(tiny_copy, vae=TINY / "vae")
    assert pipe.config.attention_bias and pipe.model.layers[0].self_attn.o_proj.bias is None
    assert_matches_case(pipe, TINY, "t2i_cfg")


def o_proj_biases(state):
    generator = torch.Generator().manual_seed(3)
    for i in range(2):
        state[f"layers.{i}.self_attn.o_proj.bias"] = 0.05 * torch.randn(64, generator=generator)


def test_o_attention_bias_absent_with_biases_in_the_file(tiny_copy, tmp_path):
    """Officially the biases then exist and are loaded: the same result as saying o_attention_bias: true."""
    edit_weights(tiny_copy, o_proj_biases)
    explicit = tmp_path / "explicit"
    shutil.copytree(tiny_copy, explicit)
    edit_config(explicit, o_attention_bias=True)
    edit_config(tiny_copy, o_attention_bias=...)
    pipe = NextStepPipeline.from_pretrained(tiny_copy, vae=TINY / "vae")
    stored = load_file(str(tiny_copy / "model.safetensors"))["layers.1.self_attn.o_proj.bias"]
    assert torch.equal(pipe.model.layers[1].self_attn.o_proj.bias, stored)
    args, ref, image = load_case(TINY, "t2i_cfg")
    tokens = pipe.generate(args["captions"], image, **api_kwargs(args)).tokens
    explicit_pipe = NextStepPipeline.from_pretrained(explicit, vae=TINY / "vae")
    assert torch.equal(tokens, explicit_pipe.generate(args["captions"], image, **api_kwargs(args)).tokens)
    assert (tokens - ref["tokens"]).abs().max() > 1e-2  # the biases are used


def test_o_attention_bias_absent_with_a_partial_set_of_biases_is_refused(tiny_copy):
    edit_weights(tiny_copy, lambda state: state.update({"layers.0.self_attn.o_proj.bias": torch.zeros(64)}))
    edit_config(tiny_copy, o_attention_bias=...)
    with pytest.raises(CheckpointMismatchError, match=r"missing keys: layers\.1\.self_attn\.o_proj\.bias"):
        NextStepPipeline.from_pretrained(tiny_copy, vae=TINY / "vae")


def test_gen_pos_embed_stored_at_the_base_image_grid_loads(tiny11_copy):
    """A 1.1 checkpoint with the 64x64 table that base_image_grid_size: 64 implies (4096 rows)."""
    table = sincos_2d_table(64, 64)[None]
    edit_weights(tiny11_copy, lambda state: state.update({"gen_pos_embed": table}))
    pipe = NextStepPipeline.from_pretrained(tiny11_copy)
    assert pipe.model.gen_pos_embed.shape == (1, 4096, 64) and torch.equal(pipe.model.gen_pos_embed, table)
    assert_matches_case(pipe, TINY11, "t2i_sde", sampler="sde")  # 1.1's inference never adds the table


@pytest.fixture
def vae_without_psz(tmp_path):
    vae = tmp_path / "vae-psz-null"
    shutil.copytree(TINY / "vae", vae)
    edit_config(vae, psz=None, encoder_norm=True)
    return vae


def test_vae_encoder_norm_without_psz_normalises_the_channels_at_each_position(vae_without_psz):
    """The official encoder LayerNorms the posterior mean over its 16 channels when psz is null."""
    pipe = NextStepPipeline.from_pretrained(TINY / "model", vae=vae_without_psz)
    assert pipe.vae.config.psz is None and pipe.vae.config.encoder_norm
    pixels = load_case(TINY, "edit")[1]["edit_pixel_values"][:1].clone()  # the input image in [-1, 1]
    with torch.no_grad():
        mean, _ = pipe.vae.posterior(pixels)
        raw_mean = pipe.vae.encoder(pixels).chunk(2, dim=1)[0]
    expected = F.layer_norm(raw_mean.permute(0, 2, 3, 1), (16,), eps=1e-6).permute(0, 3, 1, 2)
    assert torch.allclose(mean, expected, atol=1e-6)
    assert (raw_mean - expected).abs().max() > 0.1  # the norm did something


def test_vae_psz_null_edits_as_psz_1(vae_without_psz, tmp_path):
    """Per position over all channels is what psz 1 does (parity-tested with reference-tiny-11)."""
    psz_1 = tmp_path / "vae-psz-1"
    shutil.copytree(vae_without_psz, psz_1)
    edit_config(psz_1, psz=1)
    args, _, image = load_case(TINY, "edit")
    kwargs = api_kwargs(args)
    results = [
        NextStepPipeline.from_pretrained(TINY / "model", vae=vae).generate(args["captions"], image, **kwargs)
        for vae in (vae_without_psz, psz_1)
    ]
    assert torch.equal(results[0].tokens, results[1].tokens)


def test_lm_head_is_left_unread(tiny_copy):
    """The checkpoint's lm_head loads as known-unused: no lm_head in the model, outputs as the reference."""
    pipe = NextStepPipeline.from_pretrained(tiny_copy, vae=TINY / "vae")
    assert not hasattr(pipe.model, "lm_head")
    assert not any(key.startswith("lm_head") for key in pipe.model.state_dict())
    assert_matches_case(pipe, TINY, "t2i_cfg")
    edit_weights(tiny_copy, lambda state: state.pop("lm_head.weight"))  # a checkpoint without it loads too
    assert_matches_case(NextStepPipeline.from_pretrained(tiny_copy, vae=TINY / "vae"), TINY, "t2i_cfg")
