"""The in-process service: sizes and defaults from the model, examples, throttled frames, Stop."""

from __future__ import annotations

import asyncio
import json

import pytest

from nextstep.engine.sizes import Size, closest_size
from nextstep.pnginfo import read_parameters
from nextstep.serving.examples import (
    OFFICIAL_EXAMPLES,
    SHAPES_EXAMPLES,
    examples_for,
    load_examples,
)
from nextstep.serving.scheduler import LocalService
from nextstep.serving.service import Order

from ..conftest import tiny_with_stored_settings

# ---- ------------------------------------------------------------------------


def test_sizes_come_from_the_model(tiny_pipe):
    engine = tiny_pipe.engine
    sizes = engine.sizes(edit=False)
    assert all(s.width % engine.down_factor == 0 and s.height % engine.down_factor == 0 for s in sizes)
    assert Size(128, 64) in sizes and Size(64, 128) in sizes and Size(256, 256) in sizes
    # Editing inlines the input image too, so it leaves room for fewer output tokens.
    assert Size(256, 256) not in engine.sizes(edit=True)
    assert closest_size(640, 480, sizes, area=256 * 256) == Size(256, 192)
    assert closest_size(640, 480, sizes, area=128 * 128) == Size(128, 96)
    assert closest_size(300, 100, sizes, area=64 * 64) == Size(96, 48)
    assert Size.parse("128x64") == Size(width=128, height=64) == Size.parse((128, 64))


def test_defaults_follow_the_family_then_the_official_edit_then_the_models_stored_settings(tiny_pipe, tmp_path):
    assert tiny_pipe.defaults(edit=False)["num_sampling_steps"] == 50
    assert tiny_pipe.defaults(edit=False)["size"] == Size(256, 256)  # the largest square it supports
    edit = tiny_pipe.defaults(edit=True)
    assert (edit["negative_prompt"], edit["cfg_img"], edit["timesteps_shift"]) == ("Copy original image.", 2.0, 3.2)
    trained = tiny_with_stored_settings(tmp_path, {
        "text_to_image": {"size": "64x64", "num_sampling_steps": 20, "use_norm": False}, "edit": {"cfg_img": 1.5}
    })
    stored = trained.defaults(edit=False)
    assert (stored["size"], stored["num_sampling_steps"], stored["use_norm"]) == (Size(64, 64), 20, False)
    assert trained.defaults(edit=True)["cfg_img"] == 1.5


def test_examples_file(tmp_path):
    assert load_examples(tmp_path / "missing.json") == {"text_to_image": [], "edit": []}
    (tmp_path / "examples.json").write_text(json.dumps({
        "text_to_image": [{"prompt": "a red circle", "seed": 1}],
        "edit": [{"image": "input.png", "instruction": "Make it blue.", "seed": 2}],
    }))
    examples = load_examples(tmp_path / "examples.json")
    assert examples["text_to_image"][0]["prompt"] == "a red circle"
    assert examples["edit"][0]["image"] == str(tmp_path / "input.png")


async def collect(frames, count: int | None = None) -> list:
    """The first ``count`` frames (all when None); stopping early closes the stream."""
    taken = []
    async for frame in frames:
        taken.append(frame)
        if len(taken) == count:
            break
    await frames.aclose()
    return taken


def test_frames_are_throttled_and_the_result_always_arrives(tiny_pipe):
    shared = LocalService(tiny_pipe, frame_interval=60.0)
    ticket = shared.submit(Order("a red circle", settings=dict(size=(64, 64), num_sampling_steps=2), seed=1,
                                 preview_every=1))
    frames = asyncio.run(collect(shared.frames(ticket)))
    assert len(frames) == 2 and frames[0].done == 1 and frames[-1].result is not None
    assert read_parameters(frames[-1].result.images[0])["seed"] == 1


def test_closing_a_stream_frees_the_model(tiny_pipe):
    shared = LocalService(tiny_pipe, frame_interval=0.0)
    ticket = shared.submit(Order("a red circle", settings=dict(size=(64, 64), num_sampling_steps=2), seed=1))
    assert shared.busy
    asyncio.run(collect(shared.frames(ticket), count=1))  # then closed: the request leaves at the next token
    assert ticket.wait_left(30)
    assert not shared.busy and ticket.cancelled


def test_invalid_settings_fail_before_taking_the_model(tiny_pipe):
    shared = LocalService(tiny_pipe)
    with pytest.raises(ValueError, match="multiples of 16"):
        shared.submit(Order("a red circle", settings=dict(size=(64, 60))))
    assert not shared.busy


def test_every_official_release_gets_the_official_examples_nextstep_11_first_each_with_a_chinese_caption():
    for release in ("NextStep-1.1", "NextStep-1.1-Pretrain", "NextStep-1.1-Pretrain-256px", "NextStep-1-Large",
                    "NextStep-1-Large-Edit", "NextStep-1-Large-Pretrain"):
        assert examples_for(f"stepfun-ai/{release}") == OFFICIAL_EXAMPLES
    assert examples_for("someone/another-model") is None
    official, shapes = load_examples(OFFICIAL_EXAMPLES), load_examples(SHAPES_EXAMPLES)
    assert official["text_to_image"][0]["prompt"] == "A baby panda wearing an Iron Man mask"  # 1.1's model card
    for example in [*official["text_to_image"], *official["edit"], *shapes["text_to_image"], *shapes["edit"]]:
        assert example["caption_zh"], example
