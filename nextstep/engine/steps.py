"""How the per-token step runs: eager, captured as a CUDA graph, compiled, or compiled in the
background while the eager step serves; and the static buffers each batch shape reuses.

A batch shape is everything a step's tensors and Python arguments depend on: the batch key
(grid, sampler, sampling steps, time shift, guidance branches, ``use_norm``), the number of
images and the cache length. Every batch of one shape runs in the same ``StaticStep``: its state's
buffers are allocated once and refilled by each batch, so a CUDA graph captured for the shape (once,
in ``thread_local`` mode, so that other threads may use the GPU meanwhile) is replayed by every later
batch and token, with no capture, sync or cache flush per request.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

STEP_MODES = ("eager", "graph", "compiled", "background")
# The most batch shapes a compiled step compiles a graph for.
STEP_GRAPHS = 64


def compile_step(step: Callable) -> Callable:
    """``step`` compiled whole with inductor (no graph breaks, static shapes): one graph per batch
    shape, reused by every batch of that shape and every token. Keep one per process."""
    compiled = torch.compile(step, fullgraph=True, dynamic=False)

    def compiled_step(*args) -> None:
        # A server meets more batch shapes than dynamo's default of 8 graphs per function, and
        # with fullgraph the next one would be an error.
        with torch._dynamo.config.patch(recompile_limit=STEP_GRAPHS):
            compiled(*args)

    return compiled_step


@dataclass(eq=False)
class StaticStep:
    """One batch shape's state (``token_loop.StepState``) and its captured step, if any."""

    shape: tuple
    state: object
    bytes: int
    graph: torch.cuda.CUDAGraph | None = None
    graph_of: Callable | None = None  # the step function the graph recorded
    busy: bool = False


class StepStore:
    """The static steps of recent batch shapes, the least recently used dropped beyond ``most`` of
    them or ``budget`` bytes of state (a server sets it to what its memory plan counts for the KV
    cache of its largest batch). A shape whose step is busy (two loops on one engine at once) gets
    a fresh state of its own, not kept."""

    def __init__(self, budget: int | None = None, most: int = 4):
        self.budget, self.most = budget, most
        self._steps: OrderedDict[tuple, StaticStep] = OrderedDict()
        self._lock = threading.Lock()
        self.pool = None  # the CUDA graphs' shared memory pool: one batch replays at a time

    def take(self, shape: tuple, make: Callable[[], tuple[object, int]]) -> StaticStep:
        """The shape's static step, marked busy; ``make()`` -> (state, bytes) builds one."""
        with self._lock:
            kept = self._steps.get(shape)
            if kept is not None and not kept.busy:
                self._steps.move_to_end(shape)
                kept.busy = True
                return kept
        state, size = make()
        made = StaticStep(shape, state, size, busy=True)
        with self._lock:
            if kept is None:
                self._steps[shape] = made
                self._trim()
        return made

    def give_back(self, step: StaticStep) -> None:
        with self._lock:
            step.busy = False

    def _trim(self) -> None:
        held = sum(step.bytes for step in self._steps.values())
        for shape, step in list(self._steps.items())[:-1]:  # the newest stays
            if len(self._steps) <= self.most and (self.budget is None or held <= self.budget):
                return
            if not step.busy:
                del self._steps[shape]
                held -= step.bytes


def capture(step: Callable, arguments: tuple, pool) -> torch.cuda.CUDAGraph:
    """Run ``step(*arguments)`` once on a side stream (the warm-up capture asks for: it samples a
    real token), then record it as a CUDA graph (recording runs nothing) for replays. Capture is
    ``thread_local``: other threads (preview decoding, the previous batch's final decode) may use
    the GPU meanwhile."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(*arguments)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        step(*arguments)
    return graph


class BackgroundCompiler:
    """Compiles the step for batch shapes on a thread of its own, each on a state of its own of
    that shape; ``ready(shape)`` says when a shape's compiled step may serve. Until then the
    eager step does, so nobody waits for a compile."""

    def __init__(self, compiled: Callable):
        self.compiled = compiled
        self._ready: set[tuple] = set()
        self._asked: set[tuple] = set()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done = threading.Condition()
        threading.Thread(target=self._work, name="nextstep-compile", daemon=True).start()

    def ask(self, shape: tuple, arguments: Callable[[], tuple]) -> None:
        """Compile ``shape``'s step (once); ``arguments()`` -> (model, a fresh state, *the rest)."""
        with self._done:
            if shape in self._asked:
                return
            self._asked.add(shape)
        self._jobs.put((shape, arguments))

    def ready(self, shape: tuple) -> bool:
        with self._done:
            return shape in self._ready

    def wait(self, shape: tuple, timeout: float | None = None) -> bool:
        """Wait until ``shape``'s compiled step is ready (or failed: then False)."""
        with self._done:
            return self._done.wait_for(lambda: shape in self._ready or shape not in self._asked, timeout) \
                and shape in self._ready

    def _work(self) -> None:
        while True:
            shape, arguments = self._jobs.get()
            try:
                with torch.inference_mode():
                    self.compiled(*arguments())
                with self._done:
                    self._ready.add(shape)
            except Exception as error:  # noqa: BLE001 - the eager step goes on serving the shape
                logging.getLogger(__name__).warning("the step could not be compiled for %s: %r", shape, error)
                with self._done:
                    self._asked.discard(shape)
            with self._done:
                self._done.notify_all()


@dataclass
class StepRunner:
    """How an engine runs its per-token step (``mode``, one of STEP_MODES), and its static steps."""

    step: Callable  # the eager step (``token_loop.decode_step``)
    mode: str = "eager"
    cuda_graphs: bool = False  # capture each shape's step as a CUDA graph (CUDA only)
    store: StepStore = field(default_factory=StepStore)
    compiled: Callable | None = None
    compiler: BackgroundCompiler | None = None

    def __post_init__(self):
        if self.mode not in STEP_MODES:
            raise ValueError(f"step mode must be one of {', '.join(STEP_MODES)}, got {self.mode!r}")
        if self.mode in ("compiled", "background"):
            self.compiled = compile_step(self.step)
        if self.mode == "background":
            self.compiler = BackgroundCompiler(self.compiled)

    def for_shape(self, shape: tuple, warm_up: Callable[[], tuple]) -> Callable:
        """The step function a batch of ``shape`` runs now; in background mode, asks for its
        compile (``warm_up()`` -> the compile run's arguments) and serves eagerly until it is ready."""
        if self.mode == "compiled":
            return self.compiled
        if self.mode == "background":
            if self.compiler.ready(shape):
                return self.compiled
            self.compiler.ask(shape, warm_up)
        return self.step
