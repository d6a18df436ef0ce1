"""The model shipped in assets/ loads through the public pipeline and draws and edits with its stored settings."""

import json

import pytest
from PIL import Image

from nextstep import NextStepPipeline, Size
from nextstep.train.sampling_defaults import read_defaults

from ..conftest import ROOT

ASSETS = ROOT / "assets"
MODEL = ASSETS / "shapes-model"
EXAMPLES = ASSETS / "examples"


@pytest.fixture(scope="module")
def shipped():
    return NextStepPipeline.from_pretrained(MODEL), read_defaults(MODEL)


def test_assets_fit_the_size_budget():
    files = [p for p in ASSETS.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 30 * 2**20
    for directory in (MODEL, ASSETS / "shapes-vae"):
        assert (directory / "README.md").is_file() and (directory / "config.json").is_file()


def test_text_to_image_with_stored_settings(shipped):
    pipe, settings = shipped
    image = pipe.generate("a large red circle in the center on a white background", seed=0, **settings["text_to_image"]).images[0]
    size = Size.parse(settings["text_to_image"]["size"])
    assert image.size == (size.width, size.height)


def test_settings_not_given_come_from_the_model(shipped):
    pipe, settings = shipped
    stored = settings["text_to_image"]
    result = pipe.generate("a small blue square on the left on a yellow background", seed=0)
    size = Size.parse(stored["size"])
    assert result.images[0].size == (size.width, size.height)  # not the largest size the model supports
    assert result.parameters["cfg"] == stored["cfg"]
    assert result.parameters["num_sampling_steps"] == stored["num_sampling_steps"]
    given = pipe.generate("a small blue square on the left", seed=0, num_sampling_steps=2)
    assert given.parameters["num_sampling_steps"] == 2  # what the caller gives wins


def test_edit_of_the_example_input(shipped):
    pipe, settings = shipped
    examples = json.loads((EXAMPLES / "examples.json").read_text())
    example = examples["edit"][0]
    source = Image.open(EXAMPLES / example["image"])
    image = pipe.generate(example["instruction"], source, seed=example["seed"], **settings["edit"]).images[0]
    assert image.size == source.size
