"""One model, many users: a worker thread that owns the engine and decodes compatible
requests together.

Requests wait in a bounded line. When the model is free the worker takes the oldest request and
every waiting request that can share its token loop (same ``batch_key``), up to ``max_batch``
images, and decodes them together, after giving company a moment to arrive (see ``_next_batch``); each
keeps its own seed, prompt, guidance and preview stream, and gets the result it would get alone
(up to the rounding of batched matrix products: 1 of 255 at most). A request that arrives while a batch runs
waits for the next batch: joining mid-way would need its prompt prefilled beside rows that are
already many tokens in, for a latency gain of one batch at most.

A finished batch is turned into pictures (the VAE decode) on a second thread, so the next batch
starts at once: the token loop is the bottleneck to keep busy, and the decode can use a core the
loop leaves idle. Previews are decoded on a third (``PreviewWorker``): one user's exact previews
every token cost the others in the batch nothing but a snapshot of the tokens, and a preview still
decoding when the next is due is skipped.

Cancelling (Stop, a closed tab, a dropped connection, a time limit) removes a request from its
batch at the next token; the others go on. Running out of device memory fails only the request
that needed it: a batch that runs out is split and its requests retried one by one.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from PIL import Image

from ..engine.core import Engine, Run, StreamEvent, check_preview
from ..engine.preview import PreviewWorker
from ..engine.settings import GenerationRequest
from ..pipeline import NextStepPipeline
from .service import (
    FRAME_INTERVAL,
    Busy,
    FrameThrottle,
    GenerationFailed,
    ModelFacts,
    Order,
    Progress,
)

_POLL_SECONDS = 0.5  # how often a waiting reader checks that the worker is still alive
_CANCELLED = object()  # ends a cancelled ticket's event stream


def _out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and (
        "out of memory" in str(error) or "can't allocate memory" in str(error)
    )


@dataclass(eq=False)
class SchedulerTicket:
    """A submitted request: iterate it (or ``async for`` it) for its events; ``cancel()`` withdraws it.

    It is also the request's ``Sink`` in the token loop, which runs on the scheduler's thread.
    """

    request: GenerationRequest
    preview: str
    preview_every: int
    time_limit: float
    submitted: float = field(default_factory=time.monotonic)
    run_alone: bool = False  # after running out of memory in a batch
    started: float | None = None  # when its batch began
    _events: queue.Queue = field(default_factory=queue.Queue, repr=False)
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)
    # Set once the request holds no part of the model: finished, failed, dropped or never run.
    _left: threading.Event = field(default_factory=threading.Event, repr=False)
    _wake: tuple | None = field(default=None, repr=False)  # (event loop, asyncio.Event) of an async reader
    _scheduler: Scheduler | None = field(default=None, repr=False)

    @property
    def seed(self) -> int:
        return self.request.seed

    @property
    def reservation(self) -> None:
        return None  # the model is the server's own

    def cancel(self) -> None:
        self._cancelled.set()
        if self._scheduler is not None:
            self._scheduler._withdraw(self)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def left(self) -> bool:
        """Whether the request has let go of the model (see ``wait_left``)."""
        return self._left.is_set()

    def wait_left(self, timeout: float | None = None) -> bool:
        return self._left.wait(timeout)

    def __iter__(self) -> Iterator[StreamEvent]:
        """Events until the result (or until cancelled); raises GenerationFailed if the request fails."""
        while True:
            try:
                item = self._events.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                if self.cancelled:
                    return
                self._check_alive()
                continue
            if (event := self._event_of(item)) is None:
                return
            yield event
            if event.result is not None:
                return

    async def __aiter__(self):
        """As ``__iter__``, for asyncio callers: waiting never blocks a thread, so a cancelled
        reader (a page's Stop) lets go at once."""
        loop, wake = asyncio.get_running_loop(), asyncio.Event()
        self._wake = (loop, wake)
        while True:
            try:
                item = self._events.get_nowait()
            except queue.Empty:
                if self.cancelled:
                    return
                self._check_alive()
                wake.clear()
                if self._events.empty():  # nothing arrived since the look above
                    # Not asyncio.wait_for: on Python 3.11 it returns the inner wait's result when a
                    # cancellation (Stop) lands in the same step as a frame, and the Stop is lost.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(_POLL_SECONDS):
                            await wake.wait()
                continue
            if (event := self._event_of(item)) is None:
                return
            yield event
            if event.result is not None:
                return

    @staticmethod
    def _event_of(item) -> StreamEvent | None:
        """The event an item of the line carries; None where a cancelled stream ends; a failure raised."""
        if item is _CANCELLED:
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def _check_alive(self) -> None:
        if self._scheduler is not None and not self._scheduler.alive:
            raise GenerationFailed("the generation service stopped; please try again") from None

    def _put(self, item: StreamEvent | BaseException | object) -> None:
        self._events.put(item)
        if self._wake is not None:
            loop, wake = self._wake
            with contextlib.suppress(RuntimeError):  # the reader's loop is gone
                loop.call_soon_threadsafe(wake.set)

    def _end(self, item: StreamEvent | BaseException | object) -> None:
        """The last item: the request no longer holds the model."""
        self._left.set()
        self._put(item)

    # ---- as the token loop's sink --------------------------------------------------------

    @property
    def expired(self) -> bool:
        return self.started is not None and time.monotonic() - self.started > self.time_limit

    def should_stop(self) -> bool:
        return self.cancelled or self.expired

    def wants_progress(self) -> bool:
        # Progress alone is sent only when the reader has taken the last one: a reader woken for
        # every token of every request would compete with the token loop.
        return self._events.empty()

    def progress(self, event: StreamEvent) -> None:
        self._put(event)

    def dropped(self) -> None:
        if self.cancelled:
            self._end(_CANCELLED)
        else:
            limit = f"{self.time_limit:g} s"
            self._end(GenerationFailed(f"The generation took longer than the limit of {limit} and was stopped."))


class Scheduler:
    """Owns an ``Engine`` on a worker thread; ``submit`` from any thread."""

    def __init__(
        self, engine: Engine, max_batch: int = 8, max_waiting: int = 16, time_limit: float = 600.0,
        gather_seconds: float = 0.25, regather_seconds: float = 1.0, preview_interval: float = 0.0,
    ):
        """preview_interval: the fewest seconds between two previews of one request (``PreviewWorker``).
        gather_seconds: how long a request may wait for company before its batch starts.
        regather_seconds: how long after the results of a batch of several went out the next
        batch may wait for as many requests. Users whose image just finished send their next
        request within a moment, one after another as their results arrive; starting with the
        first of them alone would make the rest wait a whole generation, and split one batch into
        two from then on."""
        self.engine = engine
        self.gather_seconds = gather_seconds
        self.regather_seconds = regather_seconds
        # The latest batch: (number, images, when its results had all gone out; inf until then).
        self._last_batch = (0, 0, -math.inf)
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.time_limit = time_limit
        self._waiting: deque[SchedulerTicket] = deque()
        self._batch: list[SchedulerTicket] = []  # the latest batch taken from the line
        self._condition = threading.Condition()
        self._closed = False
        self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nextstep-finish")
        self._previews = PreviewWorker(engine.previewer, engine.device, preview_interval)
        self._worker = threading.Thread(target=self._work, name="nextstep-scheduler", daemon=True)
        self._worker.start()

    @property
    def alive(self) -> bool:
        return self._worker.is_alive()

    @property
    def load(self) -> int:
        """Requests waiting or still holding part of the model (``SchedulerTicket.left`` not yet)."""
        with self._condition:
            return len(self._waiting) + sum(not ticket.left for ticket in self._batch)

    def submit(
        self,
        prompt: str,
        image: Image.Image | None = None,
        *,
        preview: str = "vae",
        preview_every: int = 8,
        time_limit: float | None = None,
        **settings,
    ) -> SchedulerTicket:
        """Complete and validate (ValueError with a readable message) and queue a request (Busy
        when the line is full). ``settings``: ``GenerationRequest`` fields, as ``Engine.request``."""
        request = self.engine.request(prompt, image, **settings)
        preview_every = check_preview(preview, preview_every)
        ticket = SchedulerTicket(request, preview, preview_every, time_limit or self.time_limit, _scheduler=self)
        with self._condition:
            if len(self._waiting) >= self.max_waiting:
                raise Busy("The server is busy right now; please try again in a moment.")
            self._waiting.append(ticket)
            self._condition.notify()
        return ticket

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify()
        self._worker.join()
        self._finisher.shutdown(wait=True)
        self._previews.wait_idle()  # nothing touches the model once closed

    def _withdraw(self, ticket: SchedulerTicket) -> None:
        """A cancelled ticket still in the line leaves it now (one in a batch leaves at the next token)."""
        with self._condition:
            if ticket in self._waiting:
                self._waiting.remove(ticket)
                ticket._end(_CANCELLED)

    # ---- the worker ------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _next_batch(self) -> list[SchedulerTicket] | None:
        """The oldest request and the waiting ones that can share its token loop, gathered
        until ``gather_seconds`` after the oldest arrived, or, right after a batch of more images,
        until as many are here or ``regather_seconds`` after its results went out (or the batch is full)."""
        with self._condition:
            while not self._waiting:
                if self._closed:
                    return None
                self._condition.wait()
            first = self._waiting.popleft()
            batch, images = [first], first.request.num_images
            if not first.run_alone:
                key = self.engine.batch_key(first.request)
                gather_until = first.submitted + self.gather_seconds
                while True:
                    for ticket in list(self._waiting):
                        fits = images + ticket.request.num_images <= self.max_batch
                        same = not ticket.run_alone and self.engine.batch_key(ticket.request) == key
                        if fits and same:
                            self._waiting.remove(ticket)
                            batch.append(ticket)
                            images += ticket.request.num_images
                    now = time.monotonic()
                    _, expected, delivered = self._last_batch  # the finisher may update it meanwhile
                    until = gather_until if images >= expected else max(gather_until, delivered + self.regather_seconds)
                    if now >= until or images >= self.max_batch or self._closed:
                        break
                    self._condition.wait(None if until == math.inf else until - now)
            self._batch = batch
            return batch

    def _run(self, batch: list[SchedulerTicket]) -> None:
        runs = []
        for ticket in batch:
            if ticket.cancelled:  # withdrawn while its batch was gathered
                ticket._end(_CANCELLED)
                continue
            try:
                runs.append(Run(ticket.request, self.engine.prepare(ticket.request), ticket, ticket.preview,
                                ticket.preview_every))
            except Exception as error:  # noqa: BLE001 - every failure goes to its own request
                self._fail(ticket, error)
        if not runs:
            return
        try:
            self._decode(runs)
        except Exception as error:  # noqa: BLE001
            self._release_memory()
            unfinished = [run.sink for run in runs if not run.sink.left]
            if _out_of_memory(error) and len(unfinished) > 1:
                self._retry_alone(unfinished)
            else:
                for ticket in unfinished:
                    self._fail(ticket, error)

    def _decode(self, runs: list[Run]) -> None:
        started = time.monotonic()
        for run in runs:
            run.sink.started = started
        for _ in self.engine.decode(runs, previews=self._previews):
            pass
        decoded = [run for run in runs if run.decoded]
        with self._condition:
            number = self._last_batch[0] + 1
            # Only users who get a result come back for more.
            self._last_batch = (number, sum(run.request.num_images for run in decoded), math.inf)
        self._finisher.submit(self._finish, number, decoded)

    def _finish(self, number: int, decoded: list[Run]) -> None:
        """The finisher thread: decode each request's tokens into its result."""
        for run in decoded:
            try:
                run.sink._end(self.engine.finish(run))
            except Exception as error:  # noqa: BLE001 - a failed decode fails its own request only
                self._fail(run.sink, error)
        with self._condition:
            if self._last_batch[0] == number:
                self._last_batch = (number, self._last_batch[1], time.monotonic())
                self._condition.notify()

    def _retry_alone(self, tickets: list[SchedulerTicket]) -> None:
        with self._condition:
            for ticket in reversed(tickets):
                ticket.run_alone = True
                self._waiting.appendleft(ticket)
            self._condition.notify()

    def _fail(self, ticket: SchedulerTicket, error: Exception) -> None:
        if _out_of_memory(error):
            self._release_memory()
            message = (
                "The model ran out of memory for this request; try a smaller size or fewer images."
            )
            ticket._end(GenerationFailed(message))
        elif isinstance(error, ValueError):
            ticket._end(error)
        else:
            ticket._end(GenerationFailed(f"The generation failed ({type(error).__name__}); please try again."))

    def _release_memory(self) -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class LocalService(ModelFacts):
    """The in-process back end of ``service.Service``: one pipeline used by many callers through a
    ``Scheduler``. Concurrent requests that can share a token loop are decoded together, each keeps
    its own result, and closing a stream (Stop, a closed tab) withdraws that request alone at the
    next token.

    Frames are throttled to one per ``frame_interval`` seconds, so a fast model does not flood
    the browser; the latest preview is kept until it can be sent, and the result always is.
    No request's previews are decoded more often than that either.
    """

    def __init__(
        self, pipe: NextStepPipeline, frame_interval: float = FRAME_INTERVAL, max_batch: int = 8, max_waiting: int = 16,
        time_limit: float = 600.0,
    ):
        self.pipe = pipe
        self.frame_interval = frame_interval
        self.scheduler = Scheduler(pipe.engine, max_batch=max_batch, max_waiting=max_waiting, time_limit=time_limit,
                                   preview_interval=frame_interval)

    @property
    def busy(self) -> bool:
        return self.scheduler.load > 0

    def submit(self, order: Order) -> SchedulerTicket:
        return self.scheduler.submit(order.prompt, order.image, preview=order.preview,
                                     preview_every=order.preview_every, **order.request_fields())

    async def frames(self, ticket: SchedulerTicket) -> AsyncIterator[Progress]:
        try:
            throttle = FrameThrottle(self.frame_interval)
            async for event in ticket:
                if (frame := throttle(event)) is not None:
                    yield frame
        finally:
            ticket.cancel()  # a no-op once finished; otherwise leaves its line or batch
