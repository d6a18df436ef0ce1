"""The composition root: the models a page serves, loaded and put behind their ``Service``.

``load_services`` is what ``app.py`` and each Ray Serve replica run: check that the models fit
their devices before any weight is read, load them, compile them if asked, and serve them through
the in-process scheduler, or on ZeroGPU through one GPU task. ``remote_services`` is the page's
side of a Ray Serve application instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..loading.devices import set_threads
from ..loading.hub import display_name
from ..loading.memory import MemoryPlan, checkpoint_plan, combine
from ..loading.options import RuntimeOptions
from ..pipeline import NextStepPipeline
from .examples import examples_for
from .ray_client import connect
from .scheduler import LocalService
from .service import FRAME_INTERVAL, Service
from .zerogpu import LARGE_SLICE_BYTES, GpuService, GpuTask

MAX_BATCH = 8  # images one token loop decodes together; the page hands the model that many requests at once
MAX_WAITING = 16  # requests waiting for the model; more are turned away with a message


@dataclass
class Services:
    """The loaded models as the page uses them; ``editor`` is None without an edit-capable model
    (the same service as ``generator`` where one model serves both tabs)."""

    generator: Service
    editor: Service | None
    vae: str | None = None
    examples: dict[str, Path | None] = field(default_factory=lambda: {"text_to_image": None, "edit": None})
    # Requests the page hands the models at once, and how many more wait in its queue: one
    # scheduler's batch and line here, every replica's together for a Ray Serve application.
    in_flight: int = MAX_BATCH
    waiting: int = MAX_WAITING


def load_pipelines(
    placed: list[tuple[str, str]], vae: str | None, dtype, quantize: str | None,
) -> tuple[list[NextStepPipeline], MemoryPlan]:
    """Load each (model, device) of ``placed``, after checking before any weight is read that they
    fit their devices together (``NotEnoughMemoryError`` otherwise, naming the need and the
    options). Also returns the plan of all of them: what they need at once."""
    plans: dict[str, list[MemoryPlan]] = {}
    for name, device in placed:
        plans.setdefault(device, []).append(checkpoint_plan(name, device, dtype, quantize, vae))
    for on_device in plans.values():
        combine(on_device).check()
    pipes = [NextStepPipeline.from_pretrained(name, vae=vae, device=device, dtype=dtype, quantize=quantize,
                                              check_memory=False) for name, device in placed]
    return pipes, combine([plan for on_device in plans.values() for plan in on_device])


def load_services(options: RuntimeOptions, *, frame_interval: float = FRAME_INTERVAL, gpu=None,
                  max_batch: int = MAX_BATCH, max_waiting: int = MAX_WAITING) -> Services:
    """The page's models as ``options`` name them. ``gpu``: ``spaces.GPU`` on ZeroGPU hardware,
    where every request runs in one GPU task shared by both tabs (``zerogpu``) instead of the
    batching scheduler; None elsewhere."""
    if gpu is not None and options.compile:
        raise ValueError("ZeroGPU does not support torch.compile: leave --compile off on ZeroGPU hardware")
    set_threads(options.torch_device, options.threads)
    placed = options.placed()
    pipes, plan = load_pipelines(placed, options.vae, options.torch_dtype, options.quantize)
    if options.compile:
        for pipe in pipes:
            pipe.compile()
    if gpu is not None:
        # Models that need more than the default slice ask for the whole GPU (at twice the quota).
        size = "xlarge" if plan.peak_bytes > LARGE_SLICE_BYTES else None
        task = GpuTask(pipes, frame_interval, gpu, size=size)
        served = [GpuService(task, index) for index in range(len(pipes))]
    else:
        served = [LocalService(pipe, frame_interval, max_batch=max_batch, max_waiting=max_waiting) for pipe in pipes]
    generator = served[0]
    editor = served[1] if len(served) > 1 else (generator if pipes[0].supports_images else None)
    edit_model = placed[-1][0]
    examples = {"text_to_image": examples_for(options.model), "edit": examples_for(edit_model)}
    vae = display_name(options.vae) if options.vae else None
    return Services(generator, editor, vae, examples, max_batch, max_waiting)


def remote_services(url: str) -> Services:
    """The models of a Ray Serve application (``python -m nextstep.serving.ray_app``) at ``url``;
    its ``/info`` says which serves which tab and which examples fit them (``httpx.HTTPError`` when
    nothing answers there)."""
    cluster = connect(url)
    return Services(cluster.generator, cluster.editor, cluster.vae, cluster.examples, **cluster.capacity)
