"""The contract between the page and whatever runs the models: ``Service`` and ``Ticket``.

Three back ends implement it: the in-process batching scheduler (``scheduler.LocalService``),
ZeroGPU's one GPU task per request (``zerogpu.GpuService``) and a Ray Serve application
(``ray_client.RayService``). The page is written against these protocols alone and never asks
which back end it has. An ``Order`` crosses the contract (typed fields: the settings as given,
the seed, the preview mode and cadence); ``Progress`` frames come back, the last one carrying the
result. Also here: what every back end shares, the frame throttle and the facts a page builds
itself from.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from PIL import Image

from ..engine.core import GenerationResult, StreamEvent
from ..engine.sizes import Size
from ..models.quantize import held_weights
from ..pipeline import NextStepPipeline
from ..pnginfo import with_parameters

FRAME_INTERVAL = 0.25  # seconds: the most frames a page is sent, and previews decoded, per request


@dataclass(frozen=True)
class Visitor:
    """Whom a request is charged to where a quota applies (ZeroGPU): ``key`` tells visitors apart
    (a signed-in account's name, else the address), ``tier`` is what the page knows of them
    ("anonymous", "free" or "pro")."""

    key: str
    tier: str = "anonymous"
    signed_in: bool = False


@dataclass(frozen=True)
class Allowance:
    """What one visitor may ask for now, as far as the page knows (``quota.QuotaLedger``), and how
    a reservation counts against it (spaces' duration factor; twice its seconds on ``xlarge``)."""

    tier: str
    per_call: int  # seconds one request may count
    left: int  # seconds left of the day (an upper bound: use elsewhere is not seen here)
    daily: int
    factor: float = 1.0
    xlarge: bool = False

    def counted(self, reservation: int) -> int:
        """The seconds ZeroGPU checks against the quota for a task reserving ``reservation``."""
        return 2 * reservation if self.xlarge else round(reservation * self.factor)


@dataclass(frozen=True)
class Order:
    """What a front end asks a service for. ``settings`` are request fields as the visitor gave
    them (the engine reads and checks them; missing ones take the model's defaults), the seed
    aside: ``seed`` None asks for a fresh one, drawn by the service and shown on its ticket."""

    prompt: str
    image: object = None  # a PIL image, the path of an uploaded file, or a file's bytes
    settings: Mapping[str, object] = field(default_factory=dict)
    seed: int | None = None
    preview: str = "vae"  # "vae" (exact), "fast" or "none"
    preview_every: int = 8  # tokens between previews
    visitor: Visitor | None = None  # whom a quota charges (ZeroGPU); None: nobody in particular

    def __post_init__(self):
        if "seed" in self.settings:
            raise ValueError("an order's seed is its own field, not one of its settings")

    def request_fields(self) -> dict:
        """The settings with the seed, as ``Engine.request`` takes them."""
        return dict(self.settings, seed=self.seed)


class Ticket(Protocol):
    """A service's handle on one submitted order."""

    @property
    def seed(self) -> int:
        """The seed the request runs with (drawn at submission when the order named none)."""

    @property
    def reservation(self) -> int | None:
        """The GPU seconds the request reserves (ZeroGPU), None where nothing is reserved."""

    @property
    def cancelled(self) -> bool: ...

    def cancel(self) -> None:
        """Withdraw the request: it leaves its line at once, or the token loop at its next token."""

    def wait_left(self, timeout: float | None = None) -> bool:
        """Wait until the request holds no part of the model any more; False on timeout."""


class Service(Protocol):
    """One model as a page uses it."""

    @property
    def busy(self) -> bool:
        """Whether a request of this service waits or runs."""

    @property
    def supports_images(self) -> bool: ...

    def defaults(self, edit: bool) -> dict:
        """The settings a request takes where the visitor gives none (``NextStepPipeline.defaults``)."""

    def sizes(self, edit: bool) -> list[Size]: ...

    def describe(self) -> dict[str, str]:
        """What the page's Model panel shows (``describe``)."""

    def reservation(self, order: Order) -> int | None:
        """The GPU seconds this order would reserve (ZeroGPU), None where nothing is reserved;
        ValueError as ``submit`` for an order that cannot run."""

    def allowance(self, visitor: Visitor | None) -> Allowance | None:
        """What ``visitor`` may ask for now (ZeroGPU's quota), None where no quota applies."""

    def submit(self, order: Order) -> Ticket:
        """Check the order and queue it: ValueError with a message for the visitor; ``Busy`` when
        the line is full; ``quota.QuotaExceeded`` when the visitor's quota cannot take it."""

    def frames(self, ticket: Ticket) -> AsyncIterator[Progress]:
        """The ticket's frames, throttled, the last carrying the result; failures are raised as
        ``GenerationFailed`` (or ValueError for the visitor's input). Closing the iterator
        withdraws the request."""


class Busy(RuntimeError):
    """The line of waiting requests is full."""


class GenerationFailed(RuntimeError):
    """A request could not be completed; the message is meant for the user."""


@dataclass
class Progress:
    """One frame for a front end: how far sampling is, maybe a preview, and at the end the result
    (its images carry their parameters)."""

    done: int
    total: int
    elapsed: float  # seconds since this generation got the model
    preview: list[Image.Image] | None = None
    result: GenerationResult | None = None

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0


class FrameThrottle:
    """Turns a request's token events into the frames a front end shows: at most one progress frame
    per ``frame_interval`` seconds (keeping the latest preview until one goes out), and always the
    result, its images carrying their parameters. Feed it the events as they come: a preview,
    decoded beside the token loop, may come after the events of later tokens, so the count shown
    is the highest seen."""

    def __init__(self, frame_interval: float):
        self.frame_interval = frame_interval
        self._start: float | None = None
        self._last_frame = -math.inf
        self._pending: list[Image.Image] | None = None
        self._done = 0

    def __call__(self, event: StreamEvent) -> Progress | None:
        now = time.monotonic()
        self._start = self._start if self._start is not None else now  # the first token: the model is at work
        self._pending = event.preview or self._pending
        self._done = max(self._done, event.done)
        if event.result is not None:
            for image in event.result.images:
                with_parameters(image, event.result.parameters)
            return Progress(event.done, event.total, now - self._start, result=event.result)
        if now - self._last_frame < self.frame_interval:
            return None
        frame = Progress(self._done, event.total, now - self._start, preview=self._pending)
        self._last_frame, self._pending = now, None
        return frame


def human_count(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)


def describe(pipe: NextStepPipeline) -> dict[str, str]:
    """What a model panel shows: checkpoint, device, dtype, weight quantization and parameter count."""
    count = held_weights(pipe.model)[0] + sum(p.numel() for p in pipe.vae.parameters())
    return {
        "checkpoint": pipe.name,
        "family": pipe.family,
        "device": str(pipe.device),
        "dtype": str(pipe.model.dtype).removeprefix("torch."),
        "quantization": pipe.model.quantization or "none",
        "parameters": human_count(count),
    }


class ModelFacts:
    """The facts of ``Service`` for a back end holding a loaded pipeline as ``pipe``."""

    pipe: NextStepPipeline

    @property
    def supports_images(self) -> bool:
        return self.pipe.supports_images

    def defaults(self, edit: bool) -> dict:
        return self.pipe.defaults(edit=edit)

    def sizes(self, edit: bool) -> list[Size]:
        return self.pipe.engine.sizes(edit)

    def describe(self) -> dict[str, str]:
        return describe(self.pipe)

    def reservation(self, order: Order) -> int | None:
        return None

    def allowance(self, visitor: Visitor | None) -> Allowance | None:
        return None
