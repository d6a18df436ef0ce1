"""Timing one generation, and the parts of one, for the bench and the acceptance run: the GPU is
synchronised around what is timed; peak memory is the GPU's allocator's, or the process's on the CPU."""

from __future__ import annotations

import resource
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager

import torch
from PIL import Image

from ..engine.core import Hooks, Run
from ..engine.preview import PreviewWorker
from ..engine.sizes import Size
from ..loading.devices import pick_dtype
from ..pipeline import NextStepPipeline
from ..serving.scheduler import Scheduler
from .shapes import random_pipeline


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer(Hooks):
    """The engine's hooks, adding up wall time per phase; synchronises the GPU around each phase."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = defaultdict(float)

    @contextmanager
    def timed(self, phase: str):
        synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.seconds[phase] += time.perf_counter() - start


def timed_phases(pipe: NextStepPipeline, work: tuple, settings: dict, preview: str,
                 preview_every: int) -> tuple[PhaseTimer, PreviewWorker]:
    """One generation of ``work`` (prompt, input image or None) through the engine with a
    ``PhaseTimer`` (its synchronisation makes it for the split only), and the preview worker
    that decoded its previews (with their count and time)."""
    engine, timer = pipe.engine, PhaseTimer(pipe.device)
    previews = PreviewWorker(engine.previewer, engine.device)
    run = Run(engine.request(*work, **settings), None, _Discard(), preview, preview_every)
    run.job = engine.prepare(run.request)
    for _ in engine.decode([run], timer, previews):
        pass
    engine.finish(run, timer)
    previews.wait_idle()
    return timer, previews


class _Discard:
    """A sink that keeps nothing: the split needs only the timer."""

    def should_stop(self) -> bool:
        return False

    def wants_progress(self) -> bool:
        return False

    def progress(self, event) -> None:
        pass

    def dropped(self) -> None:
        pass


@torch.inference_mode()
def backbone_step_seconds(pipe: NextStepPipeline, rows: int, context: int, repeat: int = 20) -> float:
    """Seconds of one backbone decode step for ``rows`` rows after ``context`` cached slots, timed
    apart from the token loop (the loop's step runs backbone and flow head together)."""
    model, device = pipe.model, pipe.device
    cache = model.new_cache(rows, context + 1)
    cache.key_valid[:, :context] = True
    embed = torch.zeros(rows, 1, model.config.hidden_size, device=device, dtype=model.dtype)
    slot = torch.tensor([context], device=device)
    valid = torch.ones(rows, 1, dtype=torch.bool, device=device)
    model.forward_backbone(embed, slot, valid, cache)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeat):
        model.forward_backbone(embed, slot, valid, cache)
    synchronize(device)
    return (time.perf_counter() - start) / repeat


def edit_input(size: Size) -> Image.Image:
    """A smooth synthetic picture to edit (speed does not depend on what it shows)."""
    ramp = Image.linear_gradient("L").resize((size.width, size.height))
    return Image.merge("RGB", (ramp, ramp.transpose(Image.Transpose.ROTATE_90), ramp.transpose(Image.Transpose.FLIP_TOP_BOTTOM)))


def timed_generation(pipe: NextStepPipeline, work: tuple, settings: dict, preview: str, preview_every: int) -> dict:
    synchronize(pipe.device)
    start = time.perf_counter()
    first_preview = None
    for event in pipe.stream(*work, preview=preview, preview_every=preview_every, **settings):
        if event.preview is not None and first_preview is None:
            first_preview = time.perf_counter() - start
        if event.result is not None:
            result = event.result
    synchronize(pipe.device)
    return dict(seconds=time.perf_counter() - start, first_preview=first_preview, result=result)


def paired(timed: Callable, preview: str, repeat: int) -> list[tuple]:
    """``repeat`` pairs (``timed("none")``, ``timed(preview)``), the one with previews first in every other."""
    pairs = []
    for index in range(repeat):
        if index % 2:
            on = timed(preview)
            pairs.append((timed("none"), on))
        else:
            pairs.append((timed("none"), timed(preview)))
    return pairs


def timed_on_page(scheduler: Scheduler, work: tuple, settings: dict, preview: str, preview_every: int) -> float:
    """Seconds to the result of one request through the scheduler, as the page runs it (previews
    decoded beside the token loop, at most one per frame the page sends)."""
    synchronize(scheduler.engine.device)
    start = time.perf_counter()
    for _ in scheduler.submit(*work, preview=preview, preview_every=preview_every, **settings):
        pass
    return time.perf_counter() - start


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def bench_pipeline(args, quantize: str | None) -> NextStepPipeline:
    """The model the flags name (``--model``), or random weights of ``--config``'s shape."""
    dtype = pick_dtype(args.dtype, args.device)
    if args.model:
        return NextStepPipeline.from_pretrained(args.model, vae=args.vae, device=args.device, dtype=dtype,
                                                quantize=quantize)
    return random_pipeline(args.config, args.device, dtype, quantize)
