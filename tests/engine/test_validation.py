"""Bad arguments raise ValueError with a message a user can act on."""

import math

import pytest
from PIL import Image

from nextstep import NextStepPipeline

from ..conftest import TINY, tiny_with_stored_settings

BAD = [
    (dict(size=(64, 40)), "multiples of 16"),
    (dict(size="64x40"), "multiples of 16"),
    (dict(size=(64, 0)), "height must be at least"),
    (dict(size=(64,)), "size must be WIDTHxHEIGHT"),
    (dict(size="64 by 64"), "size must be WIDTHxHEIGHT"),
    (dict(size=(64, 64.5)), "size must be WIDTHxHEIGHT"),
    (dict(size=(4096, 4096)), "positions"),
    (dict(steps=4), "unknown setting steps"),
    (dict(cfg=0.5), "cfg"),
    (dict(cfg=math.nan), "finite"),
    (dict(cfg="high"), "must be a number"),
    (dict(cfg_img=0.0), "cfg_img"),
    (dict(num_sampling_steps=0), "num_sampling_steps"),
    (dict(num_images=0), "num_images"),
    (dict(timesteps_shift=0.0), "timesteps_shift"),
    (dict(cfg_schedule="cosine"), "cfg_schedule"),
    (dict(sampler="euler"), "sampler"),
    (dict(sampler="SDE"), "sampler"),  # names are exact: the reference would silently run its ODE
    (dict(use_norm="yes"), "use_norm"),
    (dict(use_norm=1), "use_norm"),
    (dict(seed=-1), "seed"),
    (dict(negative_prompt=3), "negative_prompt"),
]


@pytest.mark.parametrize("kwargs, message", BAD)
def test_bad_arguments(tiny_pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_pipe.generate("a red circle", **kwargs)


def test_prompt_must_be_text(tiny_pipe):
    with pytest.raises(ValueError, match="prompt must be text"):
        tiny_pipe.generate(None)


def test_image_slot_without_image(tiny_pipe):
    with pytest.raises(ValueError, match="no image was given"):
        tiny_pipe.generate("<image>make it green", size=(32, 32))


def test_two_image_slots(tiny_pipe):
    with pytest.raises(ValueError, match="at most one"):
        tiny_pipe.generate("<image><image>make it green", Image.new("RGB", (32, 32)), size=(32, 32))


def test_unknown_image_slot_place_fails_at_load(tmp_path):
    with pytest.raises(ValueError, match="image slot's place must be one of before, after"):
        tiny_with_stored_settings(tmp_path, {"image_slot": "middle"})


def test_image_not_a_picture(tiny_pipe, tmp_path):
    with pytest.raises(ValueError, match="could not open"):
        tiny_pipe.generate("make it green", str(tmp_path / "picture.png"), size=(32, 32))
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(ValueError, match="could not be read as an image"):
        tiny_pipe.generate("make it green", str(tmp_path / "notes.png"), size=(32, 32))


def test_numbers_given_as_text_are_read(tiny_pipe):
    result = tiny_pipe.generate("a red circle", size=" 32x32 ", cfg="2.5", num_sampling_steps="2", seed="7")
    assert result.images[0].size == (32, 32) and result.seed == 7


def test_control_characters_are_removed_from_prompts(tiny_pipe):
    clean = tiny_pipe.generate("a red\x00 circle\x1b", size=(32, 32), num_sampling_steps=2, seed=1)
    plain = tiny_pipe.generate("a red circle", size=(32, 32), num_sampling_steps=2, seed=1)
    assert clean.parameters["prompt"] == "a red circle"
    assert (clean.tokens == plain.tokens).all()


def test_bad_preview_settings(tiny_pipe):
    with pytest.raises(ValueError, match="preview must be"):
        tiny_pipe.stream("a red circle", preview="slow")
    with pytest.raises(ValueError, match="preview_every"):
        tiny_pipe.stream("a red circle", preview_every=0)


def test_any_image_mode_and_size_is_accepted(tiny_pipe):
    """Input images are converted to RGB and resized + center-cropped to the requested size."""
    for image in [Image.new("RGBA", (50, 90)), Image.new("L", (17, 17)), Image.new("P", (64, 32))]:
        result = tiny_pipe.generate("make it green", image, size=(48, 32), cfg=2.0, cfg_img=1.5, num_sampling_steps=2)
        assert result.images[0].size == (48, 32)


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match="family must be one of"):
        NextStepPipeline.from_pretrained(TINY / "model", vae=TINY / "vae", family="nextstep-2")
