"""stream(): events, preview cadence, and equality with generate()."""

import numpy as np
import pytest
import torch

from nextstep.engine.preview import MARKER, NEUTRAL
from nextstep.engine.token_loop import BatchDecoder

from ..conftest import TINY, images_as_array, load_case, tiny_with_stored_settings

KWARGS = dict(negative_prompt="blurry", size=(64, 64), cfg=3.0, num_sampling_steps=4, seed=3)


@pytest.mark.parametrize("mode", ["vae", "fast", "none"])
def test_events_previews_and_final_result(tiny_pipe, every_preview_delivered, mode):
    events = list(tiny_pipe.stream("a red circle", preview_every=3, preview=mode, **KWARGS))
    total = 16
    assert [e.done for e in events] == list(range(1, total + 1))
    assert all(e.total == total for e in events)
    assert all(e.result is None for e in events[:-1]) and events[-1].result is not None
    with_preview = [e.done for e in events if e.preview is not None]
    assert with_preview == ([] if mode == "none" else [3, 6, 9, 12, 15])
    for event in events:
        if event.preview is not None:
            assert len(event.preview) == 1 and event.preview[0].size == (64, 64)
    reference = tiny_pipe.generate("a red circle", **KWARGS)
    assert torch.equal(events[-1].result.tokens, reference.tokens)
    assert torch.equal(images_as_array(events[-1].result.images), images_as_array(reference.images))


def test_previews_fill_in(tiny_pipe, every_preview_delivered):
    """Successive exact previews differ: the picture fills in as tokens arrive."""
    events = list(tiny_pipe.stream("a red circle", preview_every=4, preview="vae", **KWARGS))
    frames = [images_as_array(e.preview) for e in events if e.preview is not None]
    assert len(frames) == 3
    assert all(not torch.equal(a, b) for a, b in zip(frames, frames[1:]))


def test_same_seed_same_images_other_seed_differs(tiny_pipe):
    a = tiny_pipe.generate("a red circle", **KWARGS)
    b = tiny_pipe.generate("a red circle", **KWARGS)
    c = tiny_pipe.generate("a red circle", **dict(KWARGS, seed=4))
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, c.tokens)


def test_seed_none_draws_and_reports_a_seed(tiny_pipe):
    result = tiny_pipe.generate("a red circle", **dict(KWARGS, seed=None))
    again = tiny_pipe.generate("a red circle", **dict(KWARGS, seed=result.seed))
    assert isinstance(result.seed, int)
    assert torch.equal(result.tokens, again.tokens)
    assert result.parameters["seed"] == result.seed


def test_edit_stream_matches_generate(tiny_pipe):
    args, _, image = load_case(TINY, "edit")
    kwargs = dict(negative_prompt="Copy original image.", size=(64, 64), cfg=7.5, cfg_img=2.0, seed=1, num_sampling_steps=3)
    events = list(tiny_pipe.stream("make the square green", image, preview="fast", preview_every=5, **kwargs))
    reference = tiny_pipe.generate("<image>make the square green", image, **kwargs)
    assert torch.equal(events[-1].result.tokens, reference.tokens)


def test_a_model_can_store_that_edit_prompts_take_the_image_after_the_instruction(tiny_pipe, tmp_path):
    _, _, image = load_case(TINY, "edit")
    kwargs = dict(size=(64, 64), cfg=3.0, cfg_img=2.0, seed=1, num_sampling_steps=2)
    after = tiny_with_stored_settings(tmp_path, {"image_slot": "after"})
    tokens = {
        (pipe, prompt): pipe.generate(prompt, image, **kwargs).tokens
        for pipe in (tiny_pipe, after) for prompt in ("make it green", "make it green<image>", "<image>make it green")
    }
    assert torch.equal(tokens[after, "make it green"], tokens[after, "make it green<image>"])
    assert torch.equal(tokens[tiny_pipe, "make it green"], tokens[tiny_pipe, "<image>make it green"])
    assert not torch.equal(tokens[after, "make it green"], tokens[tiny_pipe, "make it green"])
    assert torch.equal(tokens[after, "<image>make it green"], tokens[tiny_pipe, "<image>make it green"])


def test_closing_the_stream_stops_sampling(tiny_pipe, monkeypatch):
    steps = []
    step = BatchDecoder.step
    monkeypatch.setattr(BatchDecoder, "step", lambda decoder: steps.append(decoder) or step(decoder))
    stream = tiny_pipe.stream("a red circle", preview="none", **KWARGS)
    first, second = next(stream), next(stream)
    stream.close()
    assert (first.done, second.done) == (1, 2)
    assert len(steps) == 2, "no token is sampled after the stream is closed"
    assert list(stream) == []


@pytest.mark.parametrize("mode", ["vae", "fast"])
def test_a_preview_shows_unsampled_tokens_as_a_neutral_fill_and_marks_the_row(tiny_pipe, every_preview_delivered,
                                                                             mode):
    """Mid-generation, the area no token has reached is the neutral fill (not the decoder's guess
    of empty tokens), a line marks the row being sampled, and what is sampled is the picture itself."""
    events = list(tiny_pipe.stream("a red circle", preview_every=6, preview=mode, **KWARGS))  # a 4x4 grid
    [first, second] = [e for e in events if e.preview is not None][:2]
    tokens, grid = events[-1].result.tokens, (4, 4)
    for event in (first, second):
        shown = np.asarray(event.preview[0]).astype(int)
        row, column = divmod(event.done, 4)  # 6 -> row 1, column 2; 12 -> row 3, column 0
        line = slice((row + 1) * 16 - 2, (row + 1) * 16)
        assert (shown[(row + 1) * 16:] == NEUTRAL).all()
        assert (shown[row * 16:line.start, column * 16:] == NEUTRAL).all()
        assert (shown[line] == MARKER).all()
        partial = tokens.clone()
        partial[:, event.done:] = 0
        whole = np.asarray(tiny_pipe.engine.previewer(partial, grid, mode)[0]).astype(int)
        assert np.array_equal(shown[:row * 16], whole[:row * 16]) and np.array_equal(
            shown[row * 16:line.start, :column * 16], whole[row * 16:line.start, :column * 16])
        assert not (whole[row * 16:line.start, column * 16:] == NEUTRAL).all(), "the decoder paints empty tokens"
