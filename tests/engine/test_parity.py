"""Numeric parity with the reference implementation's outputs in tests/fixtures/reference-tiny
(and, for the parts both families share, reference-tiny-11)."""

import pytest
import torch
from safetensors.torch import load_file

from nextstep import Size
from nextstep.engine.core import prepare_image
from nextstep.engine.sampling import sample_token, time_grid_v1
from nextstep.models.vae import ResnetBlock

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


@pytest.fixture(scope="module")
def components():
    return {k: v.clone() for k, v in load_file(str(TINY / "components.safetensors")).items()}


# Both families share the backbone and the flow head: one test each, over both fixtures.
FAMILIES = {"nextstep-1": (TINY, "tiny_pipe"), "nextstep-1.1": (TINY11, "tiny11_pipe")}


def family_case(request, family: str):
    """(the family's pipeline, its fixture's component tensors)."""
    directory, pipe = FAMILIES[family]
    tensors = load_file(str(directory / "components.safetensors"))
    return request.getfixturevalue(pipe), {k: v.clone() for k, v in tensors.items()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["backbone", "backbone_padded"])
def test_backbone_hidden_states(request, family, name):
    pipe, components = family_case(request, family)
    embeds = components[f"{name}.inputs_embeds"]
    mask = components[f"{name}.attention_mask"].bool()
    cache = pipe.model.new_cache(embeds.shape[0], embeds.shape[1])
    with torch.no_grad():
        hidden = pipe.model.forward_backbone(embeds, torch.arange(embeds.shape[1]), mask, cache)
    # Outputs at padding positions are undefined in the reference; compare real tokens only.
    diff = (hidden - components[f"{name}.last_hidden_state"])[mask].abs().max()
    assert diff <= COMPONENT_TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_flow_head_velocity(request, family):
    pipe, components = family_case(request, family)
    with torch.no_grad():
        out = pipe.model.image_head(components["fm_net.x"], components["fm_net.t"], components["fm_net.c"])
    assert (out - components["fm_net.out"]).abs().max() <= COMPONENT_TOL


@pytest.mark.parametrize(
    "name, seed, cfg, cfg_img, steps, shift, images",
    [
        ("fm_sample", 123, 1.0, 1.0, 10, 1.0, 1),  # one noise row shared by all 3 condition rows
        ("fm_sample_cfg2", 321, 4.0, 1.0, 6, 3.2, 2),
        ("fm_sample_cfg3", 555, 3.0, 1.7, 5, 2.0, 1),
    ],
)
def test_flow_head_sampler(tiny_pipe, components, name, seed, cfg, cfg_img, steps, shift, images):
    cond = components[f"{name}.c"]
    branches = 1 + (cfg > 1) + (cfg_img > 1)
    rows = cond.shape[0] // branches
    noise = torch.randn(steps, images, 64, generator=torch.Generator().manual_seed(seed))
    noise = noise.repeat(1, rows // images, 1)
    with torch.no_grad():
        grid = time_grid_v1(steps, shift)
        velocity_at = tiny_pipe.model.image_head.velocity_field(cond, grid)
        out = sample_token("v1", velocity_at, noise, grid, branches, cfg, cfg_img)
    assert (out - components[f"{name}.out"]).abs().max() <= COMPONENT_TOL


def test_vae_encode_decode(tiny_pipe, components):
    with torch.no_grad():
        mean, std = tiny_pipe.vae.posterior(components["vae.image"])
        decoded = tiny_pipe.vae.decode(components["vae.posterior_mean"])
    assert (mean - components["vae.posterior_mean"]).abs().max() <= COMPONENT_TOL
    assert (std - torch.exp(0.5 * components["vae.posterior_logvar"])).abs().max() <= COMPONENT_TOL
    assert (decoded - components["vae.decoded_from_mean"]).abs().max() <= COMPONENT_TOL


def test_vae_resnet_block_with_shortcut(components):
    prefix = "resblock_shortcut.weights."
    block = ResnetBlock(32, 64)
    block.load_state_dict({k[len(prefix):]: v for k, v in components.items() if k.startswith(prefix)})
    with torch.no_grad():
        out = block(components["resblock_shortcut.x"])
    assert (out - components["resblock_shortcut.out"]).abs().max() <= COMPONENT_TOL


@pytest.mark.parametrize("case", ["t2i_cfg", "t2i_nocfg", "edit"])
def test_prompt_ids(tiny_pipe, case):
    args, ref, image = load_case(TINY, case)
    batch = case_prompt_batch(tiny_pipe, args, image)
    assert torch.equal(batch.input_ids, ref["input_ids"])
    assert torch.equal(batch.attention_mask, ref["attention_mask"])


def test_edit_input_pixels(tiny_pipe):
    args, ref, image = load_case(TINY, "edit")
    pixels = prepare_image(image, Size(args["hw"][1], args["hw"][0]))
    assert torch.equal(pixels[0], ref["edit_pixel_values"][0])


@pytest.mark.parametrize("case", ["t2i_cfg", "t2i_nocfg", "edit"])
def test_full_generation(tiny_pipe, case):
    args, ref, image = load_case(TINY, case)
    result = tiny_pipe.generate(args["captions"], image, **api_kwargs(args))
    assert (result.tokens - ref["tokens"]).abs().max() <= TOKEN_TOL
    assert (images_as_array(result.images).int() - ref["image"].int()).abs().max() <= 1
    assert result.images[0].size == (args["hw"][1], args["hw"][0])


def test_several_images_per_prompt(tiny_pipe, components):
    """pipeline_batch: two captions, two images each; our API takes one prompt per call."""
    kwargs = dict(negative_prompt="blurry", size=(32, 32), num_images=2, cfg=1.0, num_sampling_steps=4, seed=5)
    for i, caption in enumerate(["a red circle", "two blue squares on the left"]):
        result = tiny_pipe.generate(caption, **kwargs)
        rows = slice(2 * i, 2 * i + 2)
        assert (result.tokens - components["pipeline_batch.tokens"][rows]).abs().max() <= TOKEN_TOL
        diff = images_as_array(result.images).int() - components["pipeline_batch.image"][rows].int()
        assert diff.abs().max() <= 1
