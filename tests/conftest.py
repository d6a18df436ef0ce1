import json
import shutil
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from nextstep import NextStepPipeline
from nextstep.engine.core import NO_HOOKS, Engine
from nextstep.engine.prompts import guidance_branches
from nextstep.loading.devices import set_threads

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"  # made by the official code: see its README
TINY = FIXTURES / "reference-tiny"
TINY11 = FIXTURES / "reference-tiny-11"
# How close our numbers must be to the official code's: each component's outputs, and the tokens.
COMPONENT_TOL = 1e-5
TOKEN_TOL = 1e-4


def load_case(directory: Path, name: str):
    """(arguments of the reference call, its tensors, its input image or None)."""
    meta = json.loads((directory / f"{name}.json").read_text())
    args = meta["args"]
    image = Image.open(directory / args["images"]) if args.get("images") else None
    return args, load_file(str(directory / f"{name}.safetensors")), image


def api_kwargs(args: dict) -> dict:
    """The reference's generate_image arguments as our public API's keywords."""
    return dict(
        negative_prompt=args["negative_prompt"],
        positive_prompt=args["positive_prompt"],
        size=(args["hw"][1], args["hw"][0]),
        num_images=args["num_images_per_caption"],
        cfg=args["cfg"],
        cfg_img=args["cfg_img"],
        cfg_schedule=args["cfg_schedule"],
        timesteps_shift=args["timesteps_shift"],
        num_sampling_steps=args["num_sampling_steps"],
        use_norm=args["use_norm"],
        seed=args["seed"],
    )


def case_prompt_batch(pipe, args: dict, image):
    """The prompt rows our pipeline builds for a fixture case's reference call, tokenized."""
    grid = (args["hw"][0] // 16, args["hw"][1] // 16)
    has_image = image is not None
    branches = guidance_branches(args["cfg"], args["cfg_img"], has_image)
    rows = pipe.engine.prompts.rows(
        args["captions"], args["negative_prompt"], args["positive_prompt"], 1, branches, grid if has_image else None
    )
    return pipe.engine.prompts.encode(rows, grid)


def images_as_array(images) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(image) for image in images]))


def tiny_with_stored_settings(directory: Path, stored: dict) -> NextStepPipeline:
    """The tiny NextStep-1 model copied into ``directory`` with ``stored`` as its
    generation_config.json (the settings a trained model keeps beside its weights)."""
    model = directory / "model"
    shutil.copytree(TINY / "model", model)
    (model / "generation_config.json").write_text(json.dumps(stored))
    return NextStepPipeline.from_pretrained(model, vae=TINY / "vae")


def _delivered(steps: Iterator[int], previews) -> Iterator[int]:
    """A token loop's steps, each once the previews offered so far have been delivered, so that how
    many previews a front end sees does not depend on the machine's speed (the app itself never
    waits for a preview: tests/test_scheduler.py checks that)."""
    for done in steps:
        previews.wait_idle(60)
        yield done


def deliver_previews_before_next_token(engine) -> None:
    """``_delivered`` for good, for an engine of the test's own."""
    decode = engine.decode
    engine.decode = lambda runs, hooks=NO_HOOKS, previews=None: _delivered(decode(runs, hooks, previews),
                                                                            previews or engine.previews)


@pytest.fixture
def every_preview_delivered(tiny_pipe, monkeypatch):
    """``_delivered`` for every engine, for one test: those it makes, and the shared tiny one
    (set on it too: an earlier test's monkeypatch may have left the method on the instance)."""
    decode = Engine.decode

    def delivered(engine, runs, hooks=NO_HOOKS, previews=None):
        return _delivered(decode(engine, runs, hooks, previews), previews or engine.previews)

    # The instance first: what it had (its own or the class's method) is what it gets back after.
    monkeypatch.setattr(tiny_pipe.engine, "decode", types.MethodType(delivered, tiny_pipe.engine))
    monkeypatch.setattr(Engine, "decode", delivered)


@pytest.fixture(scope="session", autouse=True)
def cpu_thread_policy():
    """The tests run on the thread policy the app and the CLI run on the CPU."""
    set_threads("cpu")


@pytest.fixture(scope="session")
def tiny_pipe() -> NextStepPipeline:
    return NextStepPipeline.from_pretrained(TINY / "model", vae=TINY / "vae")


@pytest.fixture(scope="session")
def tiny11_pipe() -> NextStepPipeline:
    """The NextStep-1.1 layout as published: VAE bundled in ``model/vae``."""
    return NextStepPipeline.from_pretrained(TINY11 / "model")
