"""Serving on Hugging Face ZeroGPU: every request runs the token loop inside one GPU task.

On ZeroGPU hardware (``spaces``, Hugging Face's package) CUDA is only emulated in the server's
process: "cuda" tensors there are stand-ins for host ones. A function decorated with
``spaces.GPU`` runs in a forked worker process, after every emulated tensor was moved to the GPU
the task was granted; its arguments and every value it yields are pickled across. The
scheduler's worker thread lives in the server's process, where there is no GPU, so on ZeroGPU
each request is a GPU task of its own instead: ``GpuTask.frames`` runs the pipeline's stream and
yields the page's frames (throttled previews, the status figures, the result with its parameters)
from the worker. One task serves every loaded model, so all of them move into the GPU once per
worker, whichever tab asks.

``GpuService`` puts that task behind the page's ``service.Service`` contract, as the other back
ends do.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

from ..engine.core import check_preview
from ..engine.settings import GenerationRequest
from ..pipeline import NextStepPipeline
from .quota import QuotaExceeded, QuotaLedger, QuotaPolicy, read_refusal, what_fits
from .reservation import Reservation
from .service import Allowance, FrameThrottle, ModelFacts, Order, Progress, Visitor

# The longest task the page asks for: a free account's whole daily ZeroGPU quota (5 minutes), so a
# longer one could never run for most visitors. The per-visitor caps are not published; spaces
# reports the tighter ones (an anonymous visitor's 2 minutes, what is left today) in its own words.
MAX_SECONDS = 300
# A model set whose memory plan exceeds the default slice (48 GB, half an RTX Pro 6000) asks for
# "xlarge" (the whole GPU, 96 GB) at twice the quota.
LARGE_SLICE_BYTES = 48 * 10**9


def on_zero_gpu() -> bool:
    """Whether this process serves on ZeroGPU hardware, read as ``spaces`` reads it."""
    return os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")


class GpuTask:
    """The one GPU task of a ZeroGPU Space: ``run`` is ``frames`` decorated by ``gpu`` (``spaces.GPU``)
    with ``duration`` as its reservation, for every model in ``pipes`` (indexed by position)."""

    def __init__(self, pipes: list[NextStepPipeline], frame_interval: float, gpu: Callable, size: str | None = None):
        self.pipes = pipes
        self.frame_interval = frame_interval
        self.size = size
        graph = all(pipe.engine.runner.cuda_graphs for pipe in pipes)
        self.reservation = Reservation([pipe.model for pipe in pipes], graph)
        self.run = gpu(self.frames, duration=self.duration, size=size)

    def duration(self, model: int, request: GenerationRequest, preview: str, preview_every: int) -> int:
        """Seconds to reserve for one ``frames`` call (spaces passes it the same arguments)."""
        return self.reservation.seconds(model, request)

    def frames(
        self, model: int, request: GenerationRequest, preview: str, preview_every: int,
    ) -> Iterator[Progress | ValueError]:
        """In the GPU worker: ``request`` (complete, from ``Engine.request``) through the model's
        token loop, as throttled frames. Closing it (spaces does at the next frame after Stop)
        stops sampling at once."""
        throttle = FrameThrottle(self.frame_interval)
        stream = self.pipes[model].stream_request(request, preview=preview, preview_every=preview_every)
        with contextlib.closing(stream) as events:
            try:
                for event in events:
                    if (frame := throttle(event)) is not None:
                        yield frame
            except ValueError as error:  # a user's message, found with the model in hand (a prompt too long)
                yield error  # raised, spaces would show only its class name; as a value it arrives whole


_END = object()  # ends a GpuTicket's frames


@dataclass(eq=False)
class GpuTicket:
    """A submitted request of a ``GpuService``: its complete request and how it ends."""

    request: GenerationRequest
    preview: str
    preview_every: int
    visitor: Visitor | None = None  # whose quota the task is charged to
    order: Order | None = None  # what it was made from
    reservation: int | None = None  # the seconds its GPU task asks for, once submitted
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)
    _left: threading.Event = field(default_factory=threading.Event, repr=False)  # its GPU task has ended

    @property
    def seed(self) -> int:
        return self.request.seed

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def wait_left(self, timeout: float | None = None) -> bool:
        """Wait until the request's GPU task has ended and its GPU was given back."""
        return self._left.wait(timeout)


class GpuService(ModelFacts):
    """One model of a ``GpuTask``, as a ``service.Service`` (see the module's docstring). ``quota``:
    what the page knows of its visitors' ZeroGPU quotas (shared by the task's services)."""

    def __init__(self, task: GpuTask, model: int, quota: QuotaLedger | None = None):
        self.task = task
        self.model = model
        self.pipe = task.pipes[model]
        self.quota = quota if quota is not None else QuotaLedger(QuotaPolicy(xlarge=task.size == "xlarge"))
        self._running: set[GpuTicket] = set()

    @property
    def busy(self) -> bool:
        """Whether a request of this model holds (or waits for) a GPU task."""
        return bool(self._running)

    def submit(self, order: Order) -> GpuTicket:
        """Complete and validate the request here, before any GPU is asked for (ValueError with a
        readable message; also when it would need more GPU time than ZeroGPU grants a task)."""
        ticket = self._ticket(order)
        seconds = ticket.reservation = self.task.duration(self.model, ticket.request, ticket.preview,
                                                          ticket.preview_every)
        self._check_quota(ticket, seconds)  # a visitor's refusal names what fits them
        if seconds > MAX_SECONDS:
            raise ValueError(
                f"This request would need about {seconds} s of GPU time, more than the {MAX_SECONDS} s ZeroGPU "
                "grants one task here: choose a smaller size, fewer sampling steps or fewer images."
            )
        return ticket

    def _ticket(self, order: Order) -> GpuTicket:
        request = self.pipe.engine.request(order.prompt, order.image, **order.request_fields())
        return GpuTicket(request, order.preview, check_preview(order.preview, order.preview_every), order.visitor,
                         order)

    # ---- visitor quotas (``quota``): checked before the GPU call, and read from ZeroGPU's refusals ----

    def reservation(self, order: Order) -> int:
        """The seconds this order would ask ZeroGPU for: its GPU task's ``duration``."""
        ticket = self._ticket(order)
        return self.task.duration(self.model, ticket.request, ticket.preview, ticket.preview_every)

    def allowance(self, visitor: Visitor | None) -> Allowance | None:
        return None if visitor is None else self.quota.allowance(visitor)

    def _check_quota(self, ticket: GpuTicket, seconds: int) -> None:
        """Refuse (``QuotaExceeded``) a request its visitor's quota cannot take, before any GPU is asked for."""
        if ticket.visitor is not None:
            refusal = self.quota.check(ticket.visitor, seconds, lambda limit: self._fits(ticket, limit))
            if refusal is not None:
                raise refusal

    def _fits(self, ticket: GpuTicket, limit: int) -> tuple:
        """What of the ticket's order would count at most ``limit`` seconds (``quota.what_fits``)."""
        allowance = self.quota.allowance(ticket.visitor)
        request = ticket.request
        current = dict(num_images=request.num_images, num_sampling_steps=request.num_sampling_steps,
                       size=request.size)
        return what_fits(ticket.order, limit, lambda order: allowance.counted(self.reservation(order)), current,
                         self.sizes(request.edit))

    def _refused(self, ticket: GpuTicket, error: Exception) -> QuotaExceeded | None:
        """A refusal of ZeroGPU's (quota, duration, queue) as a ``QuotaExceeded`` with what fits; the
        visitor's ledger learns from it."""
        refusal = read_refusal(error)
        if refusal is not None and ticket.visitor is not None:
            self.quota.learn(ticket.visitor, refusal)
            limit = refusal.limit if refusal.kind == "left" else None
            refusal.fits = self._fits(ticket, limit) if limit is not None else ()
        return refusal

    async def frames(self, ticket: GpuTicket) -> AsyncIterator[Progress]:
        """The ticket's frames, from its GPU task; spaces' errors arrive as it raises them.
        Closing the iterator (or cancelling its task) ends the GPU task at its next frame."""
        loop, arrived = asyncio.get_running_loop(), asyncio.Queue()

        def post(item) -> None:
            with contextlib.suppress(RuntimeError):  # the reader's loop is gone
                loop.call_soon_threadsafe(arrived.put_nowait, item)

        # spaces' wrapper blocks its caller for the whole task (queueing for a GPU, then each frame),
        # so each request gets a thread of its own; it runs in this context, where spaces reads the
        # visitor's request (whose quota the task is charged to).
        context = contextvars.copy_context()
        self._running.add(ticket)
        threading.Thread(target=context.run, args=(self._relay, ticket, post), daemon=True,
                         name="nextstep-gpu-task").start()
        try:
            while (item := await arrived.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            ticket.cancel()  # a no-op once finished

    def _relay(self, ticket: GpuTicket, post: Callable) -> None:
        started, ran = time.monotonic(), False
        frames = self.task.run(self.model, ticket.request, ticket.preview, ticket.preview_every)
        try:
            for frame in frames:
                ran = True
                if isinstance(frame, ValueError):
                    raise frame
                if ticket.cancelled:
                    break
                if frame.result is not None and frame.done:  # what the task took per token, for the next reservation
                    self.task.reservation.calibrate(self.model, ticket.request, frame.elapsed / frame.done)
                post(frame)
        except Exception as error:  # noqa: BLE001 - spaces' messages (quota, queue, aborted task) are for users
            post(self._refused(ticket, error) or error)
        finally:
            if ran and ticket.visitor is not None:  # what the task held the GPU for, at most
                self.quota.charge(ticket.visitor, time.monotonic() - started)
            # Closing spaces' generator tells the worker to close ``GpuTask.frames`` (which stops the
            # token loop) and returns once the task has ended and its GPU is released.
            frames.close()
            self._running.discard(ticket)
            ticket._left.set()
            post(_END)
