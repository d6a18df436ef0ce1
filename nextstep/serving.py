"""The web layer's side of the package: one loaded pipeline streamed to the many users of a page.

What a page needs besides widgets: progress frames throttled to a few a second with a status line,
results whose PNGs carry their parameters, a bounded history of one browser session's results, the
model panel's facts, and the checked examples.
Sizes, settings and PNG parameters themselves live in ``nextstep.sizes``, ``nextstep.settings``
and ``nextstep.pnginfo``, shared with the CLI and the bench.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .engine import GenerationResult, StreamEvent
from .memory import MemoryPlan, combine
from .pipeline import NextStepPipeline, memory_plan
from .pnginfo import read_parameters, with_parameters
from .scheduler import Scheduler, Ticket
from .sizes import Size

# Which examples fit which model, by the name it is loaded under (a Hub id, or a directory named
# like the release). Any other model shows none rather than examples meant for another.
EXAMPLES = Path(__file__).resolve().parents[1] / "assets" / "examples"
EMBEDDED_MODEL = EXAMPLES.parent / "shapes-model"
SHAPES_EXAMPLES = EXAMPLES / "examples.json"  # checked against the embedded model
OFFICIAL_EXAMPLES = EXAMPLES / "official.json"
OFFICIAL_RELEASES = ("NextStep-1-Large", "NextStep-1-Large-Edit", "NextStep-1-Large-Pretrain", "NextStep-1.1")


def load_pipelines(
    placed: list[tuple[str, str]], vae: str | None, dtype, quantize: str | None,
) -> tuple[list[NextStepPipeline], MemoryPlan]:
    """Load each (model, device) of ``placed``, after checking before any weight is read that they
    fit their devices together (``NotEnoughMemoryError`` otherwise, naming the need and the
    options). Also returns the plan of all of them: what they need at once."""
    plans: dict[str, list[MemoryPlan]] = {}
    for name, device in placed:
        plans.setdefault(device, []).append(memory_plan(name, device, dtype, quantize, vae))
    for on_device in plans.values():
        combine(on_device).check()
    pipes = [NextStepPipeline.from_pretrained(name, vae=vae, device=device, dtype=dtype, quantize=quantize,
                                              check_memory=False) for name, device in placed]
    return pipes, combine([plan for on_device in plans.values() for plan in on_device])


def examples_for(model: str) -> Path | None:
    """The examples file that fits a model, or None."""
    path = Path(model)
    if path.is_dir() and path.resolve() == EMBEDDED_MODEL:
        return SHAPES_EXAMPLES
    return OFFICIAL_EXAMPLES if path.name in OFFICIAL_RELEASES else None


def describe(pipe: NextStepPipeline) -> dict[str, str]:
    """What a model panel shows: checkpoint, device, dtype, weight quantization and parameter count."""
    count = sum(p.numel() for p in pipe.model.parameters()) + sum(p.numel() for p in pipe.vae.parameters())
    return {
        "checkpoint": pipe.name,
        "family": pipe.family,
        "device": str(pipe.device),
        "dtype": str(pipe.model.dtype).removeprefix("torch."),
        "quantization": pipe.model.quantization or "none",
        "parameters": human_count(count),
    }


def load_examples(path: Path | None) -> dict[str, list[dict]]:
    """``{"text_to_image": [{"prompt", "seed"}, …], "edit": [{"image", "instruction", "seed"}, …]}``
    from an examples file (image paths made absolute), or empty lists without one."""
    examples = json.loads(Path(path).read_text()) if path is not None and Path(path).is_file() else {}
    for example in examples.get("edit", []):
        example["image"] = str(Path(path).parent / example["image"])
    return {kind: examples.get(kind, []) for kind in ("text_to_image", "edit")}


def human_count(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)


def tile(images: list[Image.Image]) -> Image.Image:
    """Several same-sized pictures side by side in rows of two (one picture stays as it is)."""
    if len(images) == 1:
        return images[0]
    width, height = images[0].size
    columns = 2
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(images):
        sheet.paste(image, ((index % columns) * width, (index // columns) * height))
    return sheet


# ---- history ------------------------------------------------------------------------------


@dataclass(frozen=True)
class HistoryEntry:
    """One finished result: which tab made it, the picture (carrying its parameters), and for an
    edit the input it started from."""

    tab: str  # "generate" or "edit"
    image: Image.Image
    parameters: dict
    input_image: str | None = None  # a file path

    @property
    def bytes(self) -> int:
        return self.image.width * self.image.height * len(self.image.getbands())

    @property
    def caption(self) -> str:
        prompt = self.parameters.get("prompt", "")
        short = prompt if len(prompt) <= 40 else prompt[:39] + "…"
        return f"{'Edit' if self.tab == 'edit' else 'Generate'} · seed {self.parameters.get('seed')} · {short}"


def add_to_history(history: list[HistoryEntry], tab: str, paths: list[str], input_image: str | None = None,
                   max_entries: int = 24, max_bytes: int = 48 * 2**20) -> list[HistoryEntry]:
    """A new history (newest first) with the PNGs at ``paths`` added, the oldest dropped beyond
    ``max_entries`` or ``max_bytes`` of pixels. The pictures are read into memory, so the history
    outlives the cache files they came from."""
    added = []
    for path in paths:
        with Image.open(path) as opened:
            image = opened.copy()
        added.append(HistoryEntry(tab, image, read_parameters(image) or {}, input_image))
    kept, total = [], 0
    for entry in [*reversed(added), *history]:
        total += entry.bytes
        if len(kept) == max_entries or total > max_bytes:
            break
        kept.append(entry)
    return kept


def clock(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}:{seconds:02d}"


# ---- progress and the shared model --------------------------------------------------------

FRAME_INTERVAL = 0.25  # seconds: the most frames a page is sent, and previews decoded, per request


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

    def status(self) -> str:
        if self.result is not None:
            return (
                f"Done: {self.total} tokens in {clock(self.elapsed)} ({self.rate:.1f} tokens/s) · "
                f"seed {self.result.seed}"
            )
        eta = (self.total - self.done) / self.rate if self.rate else math.inf
        eta_text = clock(eta) if math.isfinite(eta) else "…"
        return (
            f"Tokens {self.done}/{self.total} · {self.rate:.1f} tokens/s · "
            f"elapsed {clock(self.elapsed)} · ETA {eta_text}"
        )


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


class ModelFacts:
    """What a page builds itself from, for a service holding a loaded pipeline as ``pipe``. Every
    service the page uses offers these (a remote one from the cluster's description)."""

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


class SharedPipeline(ModelFacts):
    """One pipeline used by many callers through a ``Scheduler``: concurrent requests that can
    share a token loop are decoded together, each keeps its own result, and closing a stream
    (Stop, a closed tab) withdraws that request alone at the next token.

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

    def submit(self, prompt: str, image=None, **settings) -> Ticket:
        """Validate and queue now (ValueError with a readable message; ``Busy`` when the line is full)."""
        return self.scheduler.submit(prompt, image, **settings)

    async def frames(self, ticket: Ticket) -> AsyncIterator[Progress]:
        """The ticket's frames; failures arrive as ``GenerationFailed``. Closing the iterator (or
        cancelling its task) withdraws the request."""
        try:
            throttle = FrameThrottle(self.frame_interval)
            async for event in ticket:
                if (frame := throttle(event)) is not None:
                    yield frame
        finally:
            ticket.cancel()  # a no-op once finished; otherwise leaves its line or batch
