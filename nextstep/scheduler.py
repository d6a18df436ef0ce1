"""One model, many users: a worker thread that owns the pipeline and decodes compatible
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
loop leaves idle.

Cancelling (Stop, a closed tab, a dropped connection, a time limit) removes a request from its
batch at the next token; the others go on. Running out of device memory fails only the request
that needed it: a batch that runs out is split and its requests retried one by one.
"""

from __future__ import annotations

import gc
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from PIL import Image

from .pipeline import GenerationRequest, NextStepPipeline, StreamEvent

_POLL_SECONDS = 0.5  # how often a waiting reader checks that the worker is still alive
_CANCELLED = object()  # ends a cancelled ticket's event stream


class Busy(RuntimeError):
    """The line of waiting requests is full."""


class GenerationFailed(RuntimeError):
    """A request could not be completed; the message is meant for the user."""


def _out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and (
        "out of memory" in str(error) or "can't allocate memory" in str(error)
    )


@dataclass(eq=False)
class Ticket:
    """A submitted request: iterate it for its events; ``cancel()`` withdraws it."""

    request: GenerationRequest
    preview: str
    preview_every: int
    time_limit: float
    submitted: float = field(default_factory=time.monotonic)
    run_alone: bool = False  # after running out of memory in a batch
    _events: queue.Queue = field(default_factory=queue.Queue, repr=False)
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)
    _scheduler: Scheduler | None = field(default=None, repr=False)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def __iter__(self) -> Iterator[StreamEvent]:
        """Events until the result (or until cancelled); raises GenerationFailed if the request fails."""
        while True:
            try:
                item = self._events.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                if self.cancelled:
                    return
                if self._scheduler is not None and not self._scheduler.alive:
                    raise GenerationFailed("the generation service stopped; please try again") from None
                continue
            if item is _CANCELLED:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.result is not None:
                return

    def _put(self, item: StreamEvent | BaseException | object) -> None:
        self._events.put(item)


class Scheduler:
    """Owns ``pipe`` on a worker thread; ``submit`` from any thread."""

    def __init__(
        self, pipe: NextStepPipeline, max_batch: int = 8, max_waiting: int = 16, time_limit: float = 600.0,
        gather_seconds: float = 0.25, regather_seconds: float = 1.0,
    ):
        """gather_seconds: how long a request may wait for company before its batch starts.
        regather_seconds: how long after the results of a batch of several went out the next
        batch may wait for as many requests. Users whose image just finished send their next
        request within a moment, one after another as their results arrive; starting with the
        first of them alone would make the rest wait a whole generation, and split one batch into
        two from then on."""
        self.pipe = pipe
        self.gather_seconds = gather_seconds
        self.regather_seconds = regather_seconds
        # The latest batch: (number, images, when its results had all gone out; inf until then).
        self._last_batch = (0, 0, -math.inf)
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.time_limit = time_limit
        self._waiting: deque[Ticket] = deque()
        self._running = 0
        self._condition = threading.Condition()
        self._closed = False
        self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nextstep-finish")
        self._worker = threading.Thread(target=self._work, name="nextstep-scheduler", daemon=True)
        self._worker.start()

    @property
    def alive(self) -> bool:
        return self._worker.is_alive()

    @property
    def load(self) -> int:
        """Requests waiting or running."""
        with self._condition:
            return len(self._waiting) + self._running

    def submit(
        self,
        prompt: str,
        image: Image.Image | None = None,
        *,
        preview: str = "vae",
        preview_every: int = 8,
        time_limit: float | None = None,
        **settings,
    ) -> Ticket:
        """Validate (ValueError with a readable message) and queue a request (Busy when the line is full)."""
        request = GenerationRequest(prompt=prompt, image=image, **settings)
        self.pipe.validate(request)
        preview_every = self.pipe.check_preview(preview, preview_every)
        ticket = Ticket(request, preview, preview_every, time_limit or self.time_limit, _scheduler=self)
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

    # ---- the worker ------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._run(batch)
            finally:
                with self._condition:
                    self._running = 0

    def _next_batch(self) -> list[Ticket] | None:
        """The oldest live request and the waiting ones that can share its token loop, gathered
        until ``gather_seconds`` after the oldest arrived, or, right after a batch of more images,
        until as many are here or ``regather_seconds`` after its results went out (or the batch is full)."""
        with self._condition:
            while True:
                while self._waiting and self._waiting[0].cancelled:
                    self._waiting.popleft()
                if self._waiting:
                    break
                if self._closed:
                    return None
                self._condition.wait()
            first = self._waiting.popleft()
            batch, images = [first], first.request.num_images
            if not first.run_alone:
                key = self.pipe.batch_key(first.request)
                gather_until = first.submitted + self.gather_seconds
                while True:
                    for ticket in list(self._waiting):
                        fits = images + ticket.request.num_images <= self.max_batch
                        same = not ticket.run_alone and self.pipe.batch_key(ticket.request) == key
                        if fits and same and not ticket.cancelled:
                            self._waiting.remove(ticket)
                            batch.append(ticket)
                            images += ticket.request.num_images
                    now = time.monotonic()
                    _, expected, delivered = self._last_batch  # the finisher may update it meanwhile
                    until = gather_until if images >= expected else max(gather_until, delivered + self.regather_seconds)
                    if now >= until or images >= self.max_batch or self._closed:
                        break
                    self._condition.wait(None if until == math.inf else until - now)
            self._running = len(batch)
            return batch

    def _run(self, batch: list[Ticket]) -> None:
        jobs = {}
        for ticket in batch:
            try:
                jobs[ticket] = self.pipe.prepare(ticket.request)
            except Exception as error:  # noqa: BLE001 - every failure goes to its own request
                self._fail(ticket, error)
        if not jobs:
            return
        try:
            self._decode(jobs)
        except Exception as error:  # noqa: BLE001
            self._release_memory()
            if _out_of_memory(error) and len(jobs) > 1:
                self._retry_alone(list(jobs))
            else:
                for ticket in jobs:
                    self._fail(ticket, error)

    def _decode(self, jobs: dict) -> None:
        started = time.monotonic()
        decoder = self.pipe.decoder([job for job, _ in jobs.values()])
        active = dict(jobs)
        while active and not decoder.finished:
            k = decoder.step()
            for ticket, (job, _) in list(active.items()):
                expired = time.monotonic() - started > ticket.time_limit
                if ticket.cancelled or expired:
                    decoder.drop(job)
                    del active[ticket]
                    if ticket.cancelled:
                        ticket._put(_CANCELLED)
                    else:
                        limit = f"{ticket.time_limit:g} s"
                        ticket._put(GenerationFailed(f"The generation took longer than the limit of {limit} and was stopped."))
                elif k + 1 < job.total:
                    due = ticket.preview != "none" and (k + 1) % ticket.preview_every == 0
                    # Progress alone is sent only when the reader has taken the last one: a reader
                    # woken for every token of every request would compete with this loop.
                    if due or ticket._events.empty():
                        preview = self.pipe.preview(job, ticket.preview) if due else None
                        ticket._put(StreamEvent(k + 1, job.total, preview))
        with self._condition:
            number = self._last_batch[0] + 1
            # Only users who get a result come back for more.
            self._last_batch = (number, sum(job.images for job, _ in active.values()), math.inf)
        self._finisher.submit(self._finish, number, [(ticket, job, seed) for ticket, (job, seed) in active.items()])

    def _finish(self, number: int, finished: list) -> None:
        """The finisher thread: decode each request's tokens into its result."""
        for ticket, job, seed in finished:
            try:
                ticket._put(StreamEvent(job.total, job.total, None, self.pipe.finish(job, ticket.request, seed)))
            except Exception as error:  # noqa: BLE001 - a failed decode fails its own request only
                self._fail(ticket, error)
        with self._condition:
            if self._last_batch[0] == number:
                self._last_batch = (number, self._last_batch[1], time.monotonic())
                self._condition.notify()

    def _retry_alone(self, tickets: list[Ticket]) -> None:
        with self._condition:
            for ticket in reversed(tickets):
                ticket.run_alone = True
                self._waiting.appendleft(ticket)
            self._condition.notify()

    def _fail(self, ticket: Ticket, error: Exception) -> None:
        if _out_of_memory(error):
            self._release_memory()
            message = (
                "The model ran out of memory for this request; try a smaller size or fewer images."
            )
            ticket._put(GenerationFailed(message))
        elif isinstance(error, ValueError):
            ticket._put(error)
        else:
            ticket._put(GenerationFailed(f"The generation failed ({type(error).__name__}); please try again."))

    def _release_memory(self) -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

