"""Several requests decoded in one token loop (the engine's one driver) give what each gives alone."""

import pytest
import torch

from nextstep.engine.core import Run
from nextstep.engine.token_loop import BatchDecoder

TOKEN_TOL = 1e-4  # the parity tolerance: batch size changes CPU kernels' rounding, not results
COMMON = dict(size=(64, 64), num_sampling_steps=4)
SETTINGS = [
    dict(prompt="a red circle", negative_prompt="blurry", cfg=3.0, seed=1),
    dict(prompt="two blue squares on the left of a big green triangle", negative_prompt="", cfg=5.0,
         cfg_schedule="linear", seed=2, num_images=2),
    dict(prompt="green", negative_prompt="bad", cfg=3.0, seed=3),
]


class Sink:
    """Records what the token loop reports; asks to leave after ``stop_after`` tokens."""

    def __init__(self, stop_after: int | None = None):
        self.stop_after = stop_after
        self.events = []
        self.was_dropped = False

    def should_stop(self) -> bool:
        return self.stop_after is not None and len(self.events) >= self.stop_after

    def wants_progress(self) -> bool:
        return True

    def progress(self, event) -> None:
        self.events.append(event)

    def dropped(self) -> None:
        self.was_dropped = True


def runs(engine, sinks=None):
    sinks = sinks or [Sink() for _ in SETTINGS]
    out = []
    for settings, sink in zip(SETTINGS, sinks):
        request = engine.request(**settings, **COMMON)
        out.append(Run(request, engine.prepare(request), sink))
    return out


def decode(engine, batch):
    for _ in engine.decode(batch):
        pass
    return [run.job.tokens for run in batch]


def test_batched_equals_alone(tiny_pipe):
    engine = tiny_pipe.engine
    alone = [decode(engine, [run])[0] for run in runs(engine)]
    together = decode(engine, runs(engine))
    for mine, expected in zip(together, alone):
        assert (mine - expected).abs().max() <= TOKEN_TOL


def test_dropping_one_run_leaves_the_others_intact(tiny_pipe):
    engine = tiny_pipe.engine
    alone = [decode(engine, [run])[0] for run in runs(engine)]
    batch = runs(engine, [Sink(), Sink(stop_after=6), Sink()])
    decode(engine, batch)
    for index in (0, 2):
        assert (batch[index].job.tokens - alone[index]).abs().max() <= TOKEN_TOL
        assert batch[index].decoded and not batch[index].sink.was_dropped
    dropped = batch[1]
    assert dropped.sink.was_dropped and not dropped.decoded
    assert torch.all(dropped.job.tokens[:, 7:] == 0)  # it stopped early


def test_jobs_with_different_settings_are_refused_together(tiny_pipe):
    engine = tiny_pipe.engine
    first = engine.prepare(engine.request(**SETTINGS[0], **COMMON))
    second = engine.prepare(engine.request(**SETTINGS[2], **dict(COMMON, num_sampling_steps=5)))
    with pytest.raises(ValueError, match="share"):
        BatchDecoder(tiny_pipe.model, [first, second], False, tiny_pipe.engine.runner)
