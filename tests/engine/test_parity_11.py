"""NextStep-1.1: family detection, samplers and numeric parity with tests/fixtures/reference-tiny-11."""

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from nextstep import ModelNotFoundError, NextStepPipeline, Size
from nextstep.engine.core import prepare_image
from nextstep.engine.families import FAMILIES
from nextstep.engine.prompts import PromptBuilder, load_tokenizer
from nextstep.engine.sampling import (
    guidance_schedule,
    guide,
    noise_draws,
    sample_token,
    step_to,
    time_grid,
)

from ..conftest import (
    COMPONENT_TOL,
    TINY,
    TINY11,
    TOKEN_TOL,
    api_kwargs,
    case_prompt_batch,
    images_as_array,
    load_case,
)

LATENT_INPUT_TOL = 1e-3
CASES = ["t2i_sde", "t2i_ode", "t2i_cps", "t2i_usenorm", "edit"]
FAMILY_DEFAULTS = dict(  # NextStep-1.1's reference settings
    num_sampling_steps=30, cfg=7.5, cfg_img=1.0, timesteps_shift=1.0, cfg_schedule="constant", use_norm=False,
    sampler="sde",
)
SMALL = dict(negative_prompt="blurry", size=(32, 32), cfg=3.0, num_sampling_steps=3, seed=4)


@pytest.fixture(scope="module")
def components():
    # Cloned: tensors read straight from the file can take another matmul path (see the fixture README).
    return {k: v.clone() for k, v in load_file(str(TINY11 / "components.safetensors")).items()}


def case_meta(name: str) -> dict:
    return json.loads((TINY11 / f"{name}.json").read_text())


# ---- families ------------------------------------------------------------------------------


def test_family_is_detected_from_the_checkpoint(tiny_pipe, tiny11_pipe):
    assert tiny_pipe.family == "nextstep-1"
    assert tiny11_pipe.family == "nextstep-1.1"


def test_default_settings_follow_the_family(tiny_pipe, tiny11_pipe):
    family_keys = set(FAMILY_DEFAULTS)
    assert tiny_pipe.defaults()["sampler"] == "v1" and tiny_pipe.defaults()["use_norm"] is True
    assert {k: v for k, v in tiny11_pipe.defaults().items() if k in family_keys} == FAMILY_DEFAULTS
    tiny11_pipe.defaults()["sampler"] = "changed"  # a copy: callers cannot alter the family
    assert tiny11_pipe.defaults()["sampler"] == "sde"
    # What generate() does when given nothing is what the defaults say.
    given_nothing = tiny11_pipe.generate("a red circle", size=(32, 32), seed=1)
    assert torch.equal(given_nothing.tokens, tiny11_pipe.generate(
        "a red circle", **dict(tiny11_pipe.defaults(), size=(32, 32), seed=1)).tokens)
    assert given_nothing.parameters["num_sampling_steps"] == 30 and given_nothing.parameters["use_norm"] is False


def test_family_override():
    as_11 = NextStepPipeline.from_pretrained(TINY / "model", vae=TINY / "vae", family="nextstep-1.1")
    assert as_11.family == "nextstep-1.1"
    assert as_11.defaults()["sampler"] == "sde"
    assert as_11.generate("a red circle", **SMALL).parameters["sampler"] == "sde"
    as_1 = NextStepPipeline.from_pretrained(TINY11 / "model", family="nextstep-1")
    assert as_1.family == "nextstep-1" and as_1.defaults()["sampler"] == "v1"


def test_sampler_none_means_the_family_default(tiny_pipe, tiny11_pipe):
    for pipe, sampler in [(tiny_pipe, "v1"), (tiny11_pipe, "sde")]:
        default = pipe.generate("a red circle", **SMALL)
        explicit = pipe.generate("a red circle", sampler=sampler, **SMALL)
        assert default.parameters["sampler"] == sampler
        assert torch.equal(default.tokens, explicit.tokens)


@pytest.mark.parametrize("sampler", ["v1", "sde", "cps", "ode"])
def test_any_sampler_runs_with_either_checkpoint(tiny_pipe, tiny11_pipe, sampler):
    for pipe in (tiny_pipe, tiny11_pipe):
        result = pipe.generate("a red circle", sampler=sampler, **SMALL)
        assert result.images[0].size == (32, 32) and torch.isfinite(result.tokens).all()


def test_missing_vae_fields_take_the_family_defaults(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(TINY11 / "model", model)
    vae_config = json.loads((model / "vae" / "config.json").read_text())
    for flag in ("deterministic", "encoder_norm", "psz"):
        del vae_config[flag]
    (model / "vae" / "config.json").write_text(json.dumps(vae_config))
    for family, expected in [(None, (True, True, 1)), ("nextstep-1", (False, False, None))]:
        config = NextStepPipeline.from_pretrained(model, family=family).vae.config
        assert (config.deterministic, config.encoder_norm, config.psz) == expected


def test_bundled_vae_stands_in_for_a_configured_path_that_does_not_exist(tiny11_pipe, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(TINY11 / "model", model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(dict(config, vae_name_or_path=str(tmp_path / "elsewhere"))))
    tokens = NextStepPipeline.from_pretrained(model).generate("a red circle", **SMALL).tokens
    assert torch.equal(tokens, tiny11_pipe.generate("a red circle", **SMALL).tokens)
    shutil.rmtree(model / "vae")
    with pytest.raises(ModelNotFoundError, match="elsewhere"):
        NextStepPipeline.from_pretrained(model)


# ---- prompts -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_prompt_ids(tiny11_pipe, case):
    args, ref, image = load_case(TINY11, case)
    batch = case_prompt_batch(tiny11_pipe, args, image)
    assert torch.equal(batch.input_ids, ref["input_ids"])
    assert torch.equal(batch.attention_mask, ref["attention_mask"])


def test_bos_is_written_as_text_for_nextstep_1_1_only():
    tokenizer = load_tokenizer(TINY11 / "model")
    tokenizer.bos_token = "<|begin_of_thinking|>"  # defined, but not added by the tokenizer itself
    bos, image_area = tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids("<|image_area|>")
    rows = ["a red circle", "blurry"]
    with_bos = PromptBuilder(tokenizer, 295, bos_as_text=True).encode(rows, (2, 2))
    without = PromptBuilder(tokenizer, 295).encode(rows, (2, 2))
    for batch, expected in [(with_bos, True), (without, False)]:
        first_real = [ids[mask.bool()][0].item() for ids, mask in zip(batch.input_ids, batch.attention_mask)]
        assert all((token == bos) == expected for token in first_real)
        # The generation prefix keeps its <|image_area|> marker either way.
        assert batch.input_ids[0, -5].item() == image_area


@pytest.mark.parametrize("case", CASES)
def test_guidance_per_token_as_the_reference(case):
    args = case_meta(case)["args"]
    tokens = (args["hw"][0] // 16) * (args["hw"][1] // 16)
    ramp = FAMILIES["nextstep-1.1"].linear_ramp
    cfg, cfg_img = guidance_schedule(args["cfg"], args["cfg_img"], args["cfg_schedule"], tokens, ramp)
    assert [list(pair) for pair in zip(cfg, cfg_img)] == case_meta(case)["cfg_per_token"]


def test_linear_schedule_direction_follows_the_family():
    falling, _ = guidance_schedule(3.0, 1.0, "linear", 4, FAMILIES["nextstep-1"].linear_ramp)
    rising, _ = guidance_schedule(3.0, 1.0, "linear", 4, FAMILIES["nextstep-1.1"].linear_ramp)
    assert falling == [3.0, 2.5, 2.0, 1.5]
    assert rising == [1.5, 1.5, 2.0, 2.5]


# ---- components ----------------------------------------------------------------------------


# The backbone and the flow head's velocity are checked for both families in test_parity.py.


# (trace, sampler, cfg, cfg_img, steps, shift) as recorded in components.json
TRACES = [
    ("fm_sample_sde", "sde", 1.0, 1.0, 6, 1.0),
    ("fm_sample_sde_cfg2_shift", "sde", 4.0, 1.0, 5, 3.0),
    ("fm_sample_cps_cfg2", "cps", 4.0, 1.0, 5, 2.0),
    ("fm_sample_ode_cfg3", "ode", 3.0, 1.7, 5, 1.0),
    ("fm_sample_sde_cfg3", "sde", 3.0, 1.7, 4, 1.0),
]


@pytest.mark.parametrize("name, sampler, cfg, cfg_img, steps, shift", TRACES)
def test_sampler_steps_from_recorded_inputs(components, name, sampler, cfg, cfg_img, steps, shift):
    """Each step alone: x[i+1] from the recorded x[i], guided velocity v[i], times and noise."""
    x, v, t, noise = (components[f"{name}.trace.{key}"] for key in ("x", "v", "t", "noise"))
    grid = time_grid(sampler, steps, shift)
    assert torch.equal(grid[:-1], t) and grid[-1] == 1.0
    assert noise.shape[0] == noise_draws(sampler, steps)
    for i in range(steps):
        eps = noise[i + 1] if sampler != "ode" else None
        out = step_to(sampler, x[i], v[i], grid[i], grid[i + 1], eps, grid[steps - 1])
        assert (out - x[i + 1]).abs().max() <= COMPONENT_TOL, f"step {i}"


@pytest.mark.parametrize("name, sampler, cfg, cfg_img, steps, shift", TRACES)
def test_guided_velocity_and_whole_sample(tiny11_pipe, components, name, sampler, cfg, cfg_img, steps, shift):
    cond, x, v = components[f"{name}.c"], components[f"{name}.trace.x"], components[f"{name}.trace.v"]
    branches = 1 + (cfg > 1) + (cfg_img > 1)
    grid = time_grid(sampler, steps, shift)
    head = tiny11_pipe.model.image_head
    with torch.no_grad():
        for i in range(steps):
            velocity = head(torch.cat([x[i]] * branches), grid[i].expand(cond.shape[0]), cond)
            assert (guide(velocity, branches, cfg, cfg_img) - v[i]).abs().max() <= COMPONENT_TOL
        velocity_at = head.velocity_field(cond, grid)
        out = sample_token(sampler, velocity_at, components[f"{name}.trace.noise"], grid, branches, cfg, cfg_img)
    assert (out - components[f"{name}.out"]).abs().max() <= COMPONENT_TOL


@pytest.mark.parametrize("name, cfg, cfg_img", [("forward_head_cfg2", 5.0, 1.0), ("forward_head_cfg3", 4.0, 2.0)])
def test_head_with_guidance(tiny11_pipe, components, name, cfg, cfg_img):
    """The condition projector, the velocity net and the guidance combined (the reference's
    optional norm clamp is never used by its generation path, so only the unclamped output applies)."""
    model = tiny11_pipe.model
    x, t, c = (components[f"{name}.{key}"] for key in ("x", "t", "c"))
    branches = 1 + (cfg > 1) + (cfg_img > 1)
    with torch.no_grad():
        out = guide(model.image_head(x, t, model.image_out_projector(c.squeeze(1))), branches, cfg, cfg_img)
    assert (out - components[f"{name}.out_normalize_false"]).abs().max() <= COMPONENT_TOL


@pytest.mark.parametrize("prefix, overrides", [("vae", {}), ("vae_psz2", dict(psz=2, deterministic=False))])
def test_vae_encode_decode(tiny11_pipe, components, prefix, overrides):
    vae = tiny11_pipe.vae
    loaded = vae.config
    vae.config = dataclasses.replace(loaded, **overrides)
    try:
        with torch.no_grad():
            mean, std = vae.posterior(components["vae.image"])
            decoded = vae.decode(components[f"{prefix}.posterior_mean"])
    finally:
        vae.config = loaded
    assert (mean - components[f"{prefix}.posterior_mean"]).abs().max() <= COMPONENT_TOL
    assert (std - components[f"{prefix}.posterior_std"]).abs().max() <= COMPONENT_TOL
    assert (decoded - components[f"{prefix}.decoded_from_mean"]).abs().max() <= COMPONENT_TOL


# ---- whole generations ---------------------------------------------------------------------


def test_edit_input_latents(tiny11_pipe):
    args, ref, image = load_case(TINY11, "edit")
    pixels = prepare_image(image, Size(args["hw"][1], args["hw"][0]))
    assert torch.equal(pixels[0], ref["edit_pixel_values"][0])
    with torch.no_grad():
        mean, std = tiny11_pipe.vae.posterior(ref["edit_pixel_values"].clone())
    assert (mean - ref["edit_posterior_mean"]).abs().max() <= LATENT_INPUT_TOL
    assert torch.equal(std, torch.zeros_like(std))  # deterministic: the posterior noise has no effect
    assert (tiny11_pipe.vae.normalize(mean) - ref["edit_input_latents"]).abs().max() <= LATENT_INPUT_TOL


@pytest.mark.parametrize("case", CASES)
def test_full_generation(tiny11_pipe, case):
    args, ref, image = load_case(TINY11, case)
    result = tiny11_pipe.generate(args["captions"], image, sampler=args["sde_type"], **api_kwargs(args))
    assert (result.tokens - ref["tokens"]).abs().max() <= TOKEN_TOL
    assert (images_as_array(result.images).int() - ref["image"].int()).abs().max() <= 1
    assert result.images[0].size == (args["hw"][1], args["hw"][0])

