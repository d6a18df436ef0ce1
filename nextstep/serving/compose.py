"""The composition root: the models a page serves, loaded and put behind their ``Service``.

``load_services`` is what ``app.py`` and each Ray Serve replica run: check that the models fit
their devices before any weight is read, load them, compile them if asked, and serve them through
the in-process scheduler, or on ZeroGPU through one GPU task. ``remote_services`` is the page's
side of a Ray Serve application instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from ..loading.devices import set_threads
from ..loading.hub import display_name
from ..loading.memory import MemoryPlan, checkpoint_plan, combine, free_memory
from ..loading.options import RuntimeOptions
from ..pipeline import NextStepPipeline
from .examples import examples_for
from .quota import QuotaLedger, QuotaPolicy
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


def largest_batch(placed: list[tuple[str, str]], vae: str | None, dtype, quantize: str | None,
                  most: int) -> tuple[int, list[MemoryPlan]]:
    """The largest batch, of ``most`` images at the models' native size at most, that every device
    fits with its models, and the plans of that batch (one per model, in ``placed``'s order).
    ``NotEnoughMemoryError`` (naming the need and the options) when one image does not fit."""
    for images in range(most, 0, -1):
        plans = [checkpoint_plan(name, device, dtype, quantize, vae, images) for name, device in placed]
        by_device: dict[str, list[MemoryPlan]] = {}
        for plan, (_, device) in zip(plans, placed):
            by_device.setdefault(device, []).append(plan)
        if images == 1:
            for on_device in by_device.values():
                combine(on_device).check()
            return 1, plans
        if all(combine(on_device).fits(free) for on_device in by_device.values()
               if (free := free_memory(on_device[0].device)) is not None):
            return images, plans
    raise AssertionError("unreachable: a batch of one image returns or raises")


def load_pipelines(placed: list[tuple[str, str]], vae: str | None, dtype, quantize: str | None,
                   most: int = 1) -> tuple[list[NextStepPipeline], int, list[MemoryPlan]]:
    """Load each (model, device) of ``placed``, after checking before any weight is read that they
    fit their devices together (``largest_batch``): the pipelines, the largest batch that fits,
    and each model's plan for that batch."""
    images, plans = largest_batch(placed, vae, dtype, quantize, most)
    pipes = [NextStepPipeline.from_pretrained(name, vae=vae, device=device, dtype=dtype, quantize=quantize,
                                              check_memory=False) for name, device in placed]
    return pipes, images, plans


def load_services(options: RuntimeOptions, *, frame_interval: float = FRAME_INTERVAL, gpu=None,
                  quota: QuotaPolicy | None = None, max_batch: int = MAX_BATCH,
                  max_waiting: int = MAX_WAITING) -> Services:
    """The page's models as ``options`` name them. ``gpu``: ``spaces.GPU`` on ZeroGPU hardware,
    where every request runs in one GPU task shared by both tabs (``zerogpu``) instead of the
    batching scheduler; None elsewhere. The scheduler's batch is the largest up to ``max_batch``
    images that the memory plan fits on the devices. ``quota``: how ZeroGPU's visitor quotas are
    counted there."""
    mode = options.step_mode(zero_gpu=gpu is not None)
    if gpu is not None and mode in ("compiled", "background"):
        raise ValueError("ZeroGPU does not support torch.compile: use --step graph (the default there) or eager")
    set_threads(options.torch_device, options.threads)
    placed = options.placed()
    pipes, batch, plans = load_pipelines(placed, options.vae, options.torch_dtype, options.quantize,
                                         1 if gpu is not None else max_batch)
    for pipe, plan in zip(pipes, plans):
        pipe.compile(mode)
        pipe.engine.runner.store.budget = plan.kv_cache_bytes  # the static states of recent batch shapes
        pipe.engine.warm_up()
    if gpu is not None:
        # Models that need more than the default slice ask for the whole GPU (at twice the quota).
        size = "xlarge" if combine(plans).peak_bytes > LARGE_SLICE_BYTES else None
        task = GpuTask(pipes, frame_interval, gpu, size=size)
        ledger = QuotaLedger(replace(quota or QuotaPolicy(), xlarge=size == "xlarge"))
        served = [GpuService(task, index, ledger) for index in range(len(pipes))]
    else:
        served = [LocalService(pipe, frame_interval, max_batch=batch, max_waiting=max_waiting) for pipe in pipes]
    generator = served[0]
    editor = served[1] if len(served) > 1 else (generator if pipes[0].supports_images else None)
    edit_model = placed[-1][0]
    examples = {"text_to_image": examples_for(options.model), "edit": examples_for(edit_model)}
    vae = display_name(options.vae) if options.vae else None
    return Services(generator, editor, vae, examples, batch, max_waiting)


def remote_services(url: str) -> Services:
    """The models of a Ray Serve application (``python -m nextstep.serving.ray_app``) at ``url``;
    its ``/info`` says which serves which tab and which examples fit them (``httpx.HTTPError`` when
    nothing answers there)."""
    cluster = connect(url)
    return Services(cluster.generator, cluster.editor, cluster.vae, cluster.examples, **cluster.capacity)
