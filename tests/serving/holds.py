"""Requests that hold the model until they are stopped: the back-end tests' stand-in for a long
generation, so they wait on states (a frame shown, the model free), never on time. Applied inside
whatever process runs the token loop (this test process, a Ray replica, ZeroGPU's forked worker),
so it imports nothing of the page or of pytest's fixtures."""

from __future__ import annotations

import threading

from nextstep.engine.core import StreamEvent
from nextstep.serving.scheduler import LocalService

from ..conftest import deliver_previews_before_next_token

# A request with this prompt holds its token loop after its first token until it is stopped.
HOLD = "hold the line"


def paced_with_holds(service: LocalService) -> None:
    """A scheduler's engine: each preview delivered before the next token, and ``HOLD`` requests held
    until withdrawn (Stop, a closed stream) or their process dies."""
    engine = service.pipe.engine
    deliver_previews_before_next_token(engine)
    decode = engine.decode

    def decode_holding(runs, *args, **kwargs):
        held = [run for run in runs if run.request.prompt == HOLD]
        for done in decode(runs, *args, **kwargs):
            yield done
            for run in held:
                while not run.sink.should_stop():
                    run.sink._cancelled.wait(1)

    engine.decode = decode_holding


def holding_on_zero_gpu(engine) -> None:
    """A ZeroGPU worker's engine: ``HOLD`` requests held after their first token, sending the same
    progress frame again a few times a second. ZeroGPU's worker learns of Stop only as it hands over
    a frame, and then closes the task's generator, which ends the hold."""
    decode, paced = engine.decode, threading.Event()

    def decode_holding(runs, *args, **kwargs):
        for done in decode(runs, *args, **kwargs):
            yield done
            while any(run.request.prompt == HOLD for run in runs):
                for run in runs:
                    run.sink.progress(StreamEvent(done, run.job.total, None))
                paced.wait(0.1)  # a few frames a second across the processes, not a flood
                yield done

    engine.decode = decode_holding
