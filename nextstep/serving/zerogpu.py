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
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

from ..engine.core import check_preview
from ..engine.settings import GenerationRequest
from ..models.model import NextStepModel
from ..models.quantize import held_weights
from ..pipeline import NextStepPipeline
from .service import FrameThrottle, ModelFacts, Order, Progress

# What a GPU task costs, in seconds on the default ("large") slice of the H200 that spaces'
# durations are calibrated on (spaces scales them for other hardware: by 1.5 on half an RTX Pro
# 6000). Estimates from the hardware's figures, not yet measured on a GPU: the token loop is bound
# by reading the weights (the backbone's once per token, the flow head's once per sampling step)
# and, run eagerly, by launching each layer's kernels.
BANDWIDTH = 1.5e12  # bytes of weights read per second: ~60% of a 3g.71gb slice's 2.4 TB/s
FLOPS = 2e14  # bf16 matrix FLOP/s: ~half of the slice's dense peak
LAYER_SECONDS = 2e-4  # launching one residual block's ~20 kernels, eagerly, at ~10 µs each
MOVE_BANDWIDTH = 2e9  # bytes per second a fresh worker reads the weights into the GPU (spaces' offload file)
START_SECONDS = 10.0  # forking the worker, CUDA's start-up, and the final VAE decode
MARGIN = 1.5  # on the whole estimate: a task that outlives its reservation may be aborted
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


@dataclass(frozen=True)
class ModelCost:
    """What one loaded model's token loop reads and computes (``gpu_seconds``' inputs)."""

    backbone_bytes: int
    head_bytes: int
    backbone_params: int
    head_params: int
    backbone_layers: int
    head_layers: int

    @classmethod
    def of(cls, model: NextStepModel) -> ModelCost:
        config = model.config
        (total_params, total_bytes), (head_params, head_bytes) = held_weights(model), held_weights(model.image_head)
        return cls(
            backbone_bytes=total_bytes - head_bytes,
            head_bytes=head_bytes,
            backbone_params=total_params - head_params,
            head_params=head_params,
            backbone_layers=config.num_hidden_layers,
            head_layers=config.fm_head_layers,
        )

    @property
    def weight_bytes(self) -> int:
        return self.backbone_bytes + self.head_bytes


def gpu_seconds(cost: ModelCost, request: GenerationRequest, moved_bytes: int) -> int:
    """The GPU time to reserve for ``request`` on the model ``cost`` describes, in a worker that
    may first have to move ``moved_bytes`` of weights in."""
    steps, rows, tokens = request.num_sampling_steps, request.rows, request.tokens
    per_token = (
        (cost.backbone_bytes + steps * cost.head_bytes) / BANDWIDTH
        + 2 * (cost.backbone_params + steps * cost.head_params) * rows / FLOPS
        + (cost.backbone_layers + steps * cost.head_layers) * LAYER_SECONDS
    )
    prefill = 2 * cost.backbone_params * rows * (tokens if request.edit else 0) / FLOPS  # the inlined input image
    estimate = START_SECONDS + moved_bytes / MOVE_BANDWIDTH + prefill + tokens * per_token
    return round(MARGIN * estimate)


class GpuTask:
    """The one GPU task of a ZeroGPU Space: ``run`` is ``frames`` decorated by ``gpu`` (``spaces.GPU``)
    with ``duration`` as its reservation, for every model in ``pipes`` (indexed by position)."""

    def __init__(self, pipes: list[NextStepPipeline], frame_interval: float, gpu: Callable, size: str | None = None):
        self.pipes = pipes
        self.frame_interval = frame_interval
        self.costs = [ModelCost.of(pipe.model) for pipe in pipes]
        self.moved_bytes = sum(cost.weight_bytes for cost in self.costs)  # a fresh worker moves every model
        self.run = gpu(self.frames, duration=self.duration, size=size)

    def duration(self, model: int, request: GenerationRequest, preview: str, preview_every: int) -> int:
        """Seconds to reserve for one ``frames`` call (spaces passes it the same arguments)."""
        return gpu_seconds(self.costs[model], request, self.moved_bytes)

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
    """One model of a ``GpuTask``, as a ``service.Service`` (see the module's docstring)."""

    def __init__(self, task: GpuTask, model: int):
        self.task = task
        self.model = model
        self.pipe = task.pipes[model]
        self._running: set[GpuTicket] = set()

    @property
    def busy(self) -> bool:
        """Whether a request of this model holds (or waits for) a GPU task."""
        return bool(self._running)

    def submit(self, order: Order) -> GpuTicket:
        """Complete and validate the request here, before any GPU is asked for (ValueError with a
        readable message; also when it would need more GPU time than ZeroGPU grants a task)."""
        request = self.pipe.engine.request(order.prompt, order.image, **order.request_fields())
        ticket = GpuTicket(request, order.preview, check_preview(order.preview, order.preview_every))
        seconds = self.task.duration(self.model, request, ticket.preview, ticket.preview_every)
        if seconds > MAX_SECONDS:
            raise ValueError(
                f"This request would need about {seconds} s of GPU time, more than the {MAX_SECONDS} s ZeroGPU "
                "grants one task here: choose a smaller size, fewer sampling steps or fewer images."
            )
        return ticket

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
        frames = self.task.run(self.model, ticket.request, ticket.preview, ticket.preview_every)
        try:
            for frame in frames:
                if isinstance(frame, ValueError):
                    raise frame
                if ticket.cancelled:
                    break
                post(frame)
        except Exception as error:  # noqa: BLE001 - spaces' messages (quota, queue, aborted task) are for users
            post(error)
        finally:
            # Closing spaces' generator tells the worker to close ``GpuTask.frames`` (which stops the
            # token loop) and returns once the task has ended and its GPU is released.
            frames.close()
            self._running.discard(ticket)
            ticket._left.set()
            post(_END)
