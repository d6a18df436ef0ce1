"""The Python API, the CLI and the page start from the same defaults: the same prompt and seed give
the same image through each, for both fixture families and the embedded model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gradio_client import Client
from PIL import Image

from nextstep import NextStepPipeline
from nextstep.__main__ import main as cli
from nextstep.loading.options import RuntimeOptions
from nextstep.serving.compose import load_services

from .conftest import ROOT, TINY, TINY11
from .pages import final_images, launched

pytestmark = pytest.mark.slow

PROMPT, SEED = "a red circle on a blue background", 3
# (model, VAE, settings all three are given): the fixtures at a small size to keep the test quick;
# the embedded model with nothing but prompt and seed.
MODELS = {
    "nextstep-1": (TINY / "model", TINY / "vae", dict(size="32x32")),
    "nextstep-1.1": (TINY11 / "model", None, dict(size="128x128")),  # its page's smallest square
    "embedded": (ROOT / "assets" / "shapes-model", None, {}),
}


@pytest.fixture(autouse=True)
def keep_thread_count():
    """The CLI sets torch's thread count for its process; give the test process its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def pixels(image: Image.Image | str | Path) -> np.ndarray:
    return np.asarray(image if isinstance(image, Image.Image) else Image.open(image))


@pytest.mark.parametrize("name", MODELS)
def test_api_cli_and_page_give_the_same_image(name, tmp_path):
    model, vae, given = MODELS[name]
    pipe = NextStepPipeline.from_pretrained(model, vae=vae)
    api = pipe.generate(PROMPT, seed=SEED, **given)

    flags = [f"--{key.replace('_', '-')}={value}" for key, value in given.items()]
    vae_flag = ["--vae", str(vae)] if vae else []
    assert cli([PROMPT, "--model", str(model), *vae_flag, "--seed", str(SEED), *flags,
                "--out", str(tmp_path / "cli.png")]) == 0

    options = RuntimeOptions(model=str(model), vae=str(vae) if vae else None, device="cpu")
    services = load_services(options, frame_interval=0.0)
    with launched(services) as url:
        outputs = Client(url, verbose=False).predict(prompt=PROMPT, seed=SEED, randomize_seed=False, **given,
                                                     api_name="/generate")
    [page] = final_images(outputs)

    assert np.array_equal(pixels(tmp_path / "cli.png"), pixels(api.images[0])), "CLI and API differ"
    assert np.array_equal(pixels(page), pixels(api.images[0])), "page and API differ"
    assert outputs[3] == api.parameters, "the page reports the settings the API used"
