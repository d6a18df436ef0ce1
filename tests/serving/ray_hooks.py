"""What tests/test_serve.py does to each replica's models (``StudioReplica``'s ``adjust``); it runs
inside Ray's replica processes, so it imports nothing of the page or of pytest's fixtures."""

from __future__ import annotations

from nextstep.serving.scheduler import LocalService

from ..conftest import deliver_previews_before_next_token

# A request with this prompt holds its replica's token loop after its first token until it is
# withdrawn (Stop, a closed stream) or its replica dies: the tests' stand-in for a long generation.
HOLD = "hold the line"


def paced_with_holds(service: LocalService) -> None:
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
