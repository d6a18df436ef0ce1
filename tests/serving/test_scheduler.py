"""The scheduler: batching concurrent requests without changing them, cancelling one of many,
a bounded line, time limits and out-of-memory errors that fail one request only."""

import asyncio
import math
import threading
import time

import pytest
import torch

from nextstep.engine.core import StreamEvent
from nextstep.serving.scheduler import Scheduler, SchedulerTicket
from nextstep.serving.service import Busy, GenerationFailed

from ..conftest import images_as_array

TOKEN_TOL = 1e-4  # batch size changes CPU kernels' rounding, not results
REQUESTS = [
    dict(prompt="a red circle", negative_prompt="blurry", seed=1, cfg=3.0),
    dict(prompt="two blue squares on the left of a big green triangle", negative_prompt="", seed=2, cfg=5.0),
    dict(prompt="green", negative_prompt="bad", seed=3, cfg=3.0, num_images=2),
]
COMMON = dict(size=(64, 64), num_sampling_steps=4)


@pytest.fixture
def scheduler(tiny_pipe):
    service = Scheduler(tiny_pipe.engine, max_batch=8, max_waiting=8)
    yield service
    service.close()


def hold(scheduler, monkeypatch):
    """Occupy the worker until the returned event is set, so that submissions queue up."""
    gate, entered = threading.Event(), threading.Event()
    engine = scheduler.engine
    original = engine.prepare

    def prepare(request):
        if request.prompt == "hold":
            entered.set()
            gate.wait(30)
        return original(request)

    monkeypatch.setattr(engine, "prepare", prepare)
    blocker = scheduler.submit("hold", preview="none", **dict(COMMON, num_sampling_steps=1), seed=0, cfg=1.0)
    entered.wait(30)
    return gate, blocker


def batch_sizes(engine, monkeypatch) -> list[int]:
    """Records the number of requests in each token loop the engine runs."""
    seen = []
    original = engine.decode
    monkeypatch.setattr(engine, "decode", lambda runs, *args, **kwargs: seen.append(len(runs)) or original(runs, *args, **kwargs))
    return seen


def wait_until(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


def results(tickets):
    out = []
    for ticket in tickets:
        *_, last = list(ticket)
        out.append(last.result)
    return out


def test_batched_requests_equal_their_results_alone(scheduler, tiny_pipe, monkeypatch):
    alone = [tiny_pipe.generate(**r, **COMMON) for r in REQUESTS]
    gate, blocker = hold(scheduler, monkeypatch)
    tickets = [scheduler.submit(preview="fast", preview_every=4, **r, **COMMON) for r in REQUESTS]
    seen = batch_sizes(scheduler.engine, monkeypatch)
    gate.set()
    batched = results([blocker, *tickets])[1:]
    assert 3 in seen  # the three waiting requests ran in one token loop
    for mine, reference in zip(batched, alone):
        assert (mine.tokens - reference.tokens).abs().max() <= TOKEN_TOL
        assert (images_as_array(mine.images).int() - images_as_array(reference.images).int()).abs().max() <= 1
        assert mine.seed == reference.seed


def test_users_coming_back_one_by_one_share_a_batch_again(tiny_pipe, monkeypatch):
    """After a batch of three, three requests arriving one after another, each after the one
    before has been taken up by the worker (as users do when their results reach them one after
    another), still run together: the worker waits for as many as the last batch had."""
    service = Scheduler(tiny_pipe.engine, gather_seconds=0.0, regather_seconds=60.0)
    try:
        gate, blocker = hold(service, monkeypatch)
        first = [service.submit(preview="none", **dict(r, num_images=1), **COMMON) for r in REQUESTS]
        seen = batch_sizes(tiny_pipe.engine, monkeypatch)
        gate.set()
        results([blocker, *first])
        again = []
        for request in REQUESTS:
            again.append(service.submit(preview="none", **dict(request, num_images=1), **COMMON))
            # Taken from the line: without waiting for company its batch would start now, alone.
            wait_until(lambda: not service._waiting, "the worker takes the request")
        assert all(result is not None for result in results(again))
    finally:
        service.close()
    assert seen == [1, 3, 3]


def test_cancel_one_of_three_mid_way(scheduler, tiny_pipe, monkeypatch):
    alone = [tiny_pipe.generate(**r, **COMMON) for r in REQUESTS]
    gate, blocker = hold(scheduler, monkeypatch)
    tickets = [scheduler.submit(preview="none", **r, **COMMON) for r in REQUESTS]
    gate.set()
    list(blocker)
    events = iter(tickets[1])
    assert next(events).done == 1
    tickets[1].cancel()
    finished = results([tickets[0], tickets[2]])
    for mine, reference in zip(finished, [alone[0], alone[2]]):
        assert (mine.tokens - reference.tokens).abs().max() <= TOKEN_TOL
    remaining = list(events)
    assert all(event.result is None for event in remaining)  # it never finished


def test_full_line_says_busy_and_recovers(tiny_pipe, monkeypatch):
    scheduler = Scheduler(tiny_pipe.engine, max_batch=1, max_waiting=1)
    try:
        gate, blocker = hold(scheduler, monkeypatch)
        waiting = scheduler.submit("a red circle", preview="none", **COMMON)
        with pytest.raises(Busy, match="busy"):
            scheduler.submit("a red circle", preview="none", **COMMON)
        gate.set()
        results([blocker, waiting])
        after = scheduler.submit("a red circle", preview="none", **COMMON)
        assert results([after])[0].images[0].size == (64, 64)
    finally:
        scheduler.close()


def test_time_limit_stops_a_request(scheduler):
    ticket = scheduler.submit("a red circle", preview="none", time_limit=1e-9, **COMMON)
    with pytest.raises(GenerationFailed, match="longer than the limit"):
        list(ticket)
    assert results([scheduler.submit("a red circle", preview="none", **COMMON)])[0] is not None


def test_out_of_memory_fails_only_that_request(scheduler, monkeypatch):
    gate, blocker = hold(scheduler, monkeypatch)
    held = scheduler.engine.prepare

    def prepare(request):
        if request.prompt == "huge":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return held(request)

    monkeypatch.setattr(scheduler.engine, "prepare", prepare)
    doomed = scheduler.submit("huge", preview="none", **COMMON)
    fine = scheduler.submit("a red circle", preview="none", **COMMON)
    gate.set()
    with pytest.raises(GenerationFailed, match="out of memory"):
        list(doomed)
    assert results([blocker, fine])[1].images[0].size == (64, 64)


def test_out_of_memory_in_a_batch_retries_each_alone(scheduler, tiny_pipe, monkeypatch):
    alone = [tiny_pipe.generate(**r, **COMMON) for r in REQUESTS[:2]]
    gate, blocker = hold(scheduler, monkeypatch)
    tickets = [scheduler.submit(preview="none", **r, **COMMON) for r in REQUESTS[:2]]
    original = scheduler.engine.decode

    def decode(runs, *args, **kwargs):
        if len(runs) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return original(runs, *args, **kwargs)

    monkeypatch.setattr(scheduler.engine, "decode", decode)
    gate.set()
    finished = results([blocker, *tickets])[1:]
    for mine, reference in zip(finished, alone):
        assert (mine.tokens - reference.tokens).abs().max() <= TOKEN_TOL


def test_bad_settings_fail_at_submission(scheduler):
    with pytest.raises(ValueError, match="multiples of 16"):
        scheduler.submit("a red circle", size=(64, 50))
    with pytest.raises(ValueError, match="preview"):
        scheduler.submit("a red circle", preview="sometimes", **COMMON)


def test_waiting_reader_notices_a_dead_worker(tiny_pipe, monkeypatch):
    scheduler = Scheduler(tiny_pipe.engine)
    gate, blocker = hold(scheduler, monkeypatch)
    waiting = scheduler.submit("a red circle", preview="none", **COMMON)
    worker, scheduler._worker = scheduler._worker, threading.Thread(target=lambda: None)  # a crashed worker
    with pytest.raises(GenerationFailed, match="stopped"):  # not a wait for ever
        list(waiting)
    scheduler._worker = worker
    gate.set()
    scheduler.close()


def test_previews_on_or_off_give_the_same_result(scheduler):
    with_previews = results([scheduler.submit("a red circle", preview="vae", preview_every=1, seed=4, **COMMON)])[0]
    without = results([scheduler.submit("a red circle", preview="none", seed=4, **COMMON)])[0]
    assert torch.equal(with_previews.tokens, without.tokens)
    assert torch.equal(images_as_array(with_previews.images), images_as_array(without.images))


def test_a_preview_decoder_that_never_finishes_holds_up_neither_the_loop_nor_the_result(scheduler, monkeypatch):
    """Previews decode beside the token loop: with the decoder stuck on the first one, every token
    is still sampled, the result arrives, and the previews due meanwhile are skipped, not queued."""
    release, entered, calls = threading.Event(), threading.Event(), []

    def stuck(tokens, grid, mode, done):
        calls.append(mode)
        entered.set()
        release.wait(60)
        return []

    monkeypatch.setattr(scheduler._previews, "_decode", stuck)
    try:
        ticket = scheduler.submit("a red circle", preview="vae", preview_every=1, seed=4, **COMMON)
        events = list(ticket)
        assert events[-1].result is not None and events[-1].done == 16
        assert all(event.preview is None for event in events)
        assert entered.wait(30)  # the worker took the first preview (it may start after the loop ended)
        assert calls == ["vae"], "one preview was taken; the rest were skipped while it was stuck"
    finally:
        release.set()


def test_previews_are_decoded_no_more_often_than_the_interval(tiny_pipe, monkeypatch, every_preview_delivered):
    """A request's previews are decoded at most once per ``preview_interval`` (the page's frame
    interval): with an interval longer than the whole run, the first due preview is the only one;
    with none, every due one (the loop waits for each here, so none is skipped as busy)."""
    decoded = {}
    for interval in (math.inf, 0.0):
        scheduler = Scheduler(tiny_pipe.engine, preview_interval=interval)
        calls = []
        preview = scheduler._previews._decode
        monkeypatch.setattr(scheduler._previews, "_decode", lambda *args: calls.append(1) or preview(*args))
        try:
            *_, last = scheduler.submit("a red circle", preview="vae", preview_every=1, seed=4, **COMMON)
            assert last.result is not None
            scheduler._previews.wait_idle(30)
        finally:
            scheduler.close()
        decoded[interval] = len(calls)
    assert decoded == {math.inf: 1, 0.0: 15}  # 16 tokens: a preview after each but the last


def test_a_neighbours_exact_previews_every_token_run_beside_the_shared_token_loop(scheduler, tiny_pipe, monkeypatch):
    """The most expensive request the page allows (4 images, exact previews every token) shares a
    plain request's token loop, and every one of its previews is decoded on the preview thread:
    what it costs the plain one is its rows only (``bench --fairness`` times that)."""
    threads = []
    preview = scheduler._previews._decode
    monkeypatch.setattr(scheduler._previews, "_decode",
                        lambda *args: threads.append(threading.current_thread().name) or preview(*args))
    gate, blocker = hold(scheduler, monkeypatch)
    expensive = scheduler.submit("a blue square", preview="vae", preview_every=1, num_images=4, seed=2, **COMMON)
    cheap = scheduler.submit("a red circle", preview="none", seed=1, **COMMON)
    seen = batch_sizes(tiny_pipe.engine, monkeypatch)
    gate.set()
    assert all(result is not None for result in results([blocker, expensive, cheap]))
    scheduler._previews.wait_idle(30)
    assert seen == [1, 2], "after the request holding the worker, the two shared one token loop"
    assert threads and set(threads) == {"nextstep-previews"}


def test_a_stop_that_lands_with_a_frame_is_never_lost(tiny_pipe):
    """The reader is waiting; in one turn of the event loop a frame arrives and the reader is
    cancelled (a page's Stop). The reader ends cancelled, the frame unread."""
    ticket = SchedulerTicket(tiny_pipe.engine.request("a red circle", size=(64, 64)), "none", 8, 600.0)
    received = []

    async def read() -> None:
        async for event in ticket:
            received.append(event)

    async def scenario() -> bool:
        loop = asyncio.get_running_loop()
        reader = asyncio.create_task(read())
        await asyncio.sleep(0)  # one turn of the loop: the reader runs to its wait, with nothing in line
        # The frame's wake-up first, the cancellation right behind it, as a Stop that lands with a frame.
        loop.call_soon(lambda: (ticket.progress(StreamEvent(1, 16)), loop.call_soon(reader.cancel)))
        finished, _ = await asyncio.wait({reader}, timeout=30)  # a bound for the failure only: a lost Stop waits on
        if not finished:
            reader.cancel()
            return False
        return reader.cancelled()

    assert asyncio.run(scenario()), "the reader went on after its Stop"
    assert received == []
