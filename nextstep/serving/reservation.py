"""What a ZeroGPU task reserves for one request: seconds estimated from what the per-token step
reads and launches, replaced by what earlier tasks measured once one has run.

ZeroGPU checks the seconds a task asks for against the visitor's allowance before anything runs,
and may end a task that outlives them: asking too much turns visitors away, too little cuts
pictures short. The estimate, per token: the bytes the step reads (``loading.traffic``: the
backbone's weights once, the flow head's per-evaluation weights at every sampling step and its
modulation weights once, the KV cache) over the slice's bandwidth, the matrix work over its FLOP/s, and the operations it runs
(counted, ``engine.opcount``) times what each costs: launched from Python one by one in the eager
step, or replayed from a CUDA graph (ZeroGPU's default step). Once a task of the same model and
request shape has reported its time per token, that replaces the estimate. Both take
``MARGIN``; the start-up (forking the worker, CUDA, moving the weights in, the final decode) is
added to either.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from functools import cache

from ..engine.opcount import count_token_ops
from ..engine.sampling import SAMPLERS
from ..engine.settings import GenerationRequest
from ..engine.token_loop import cache_slots
from ..loading.traffic import WeightReads, held_parameters
from ..models.model import NextStepModel

# The default ("large") ZeroGPU slice, half an H200 (spaces' durations are counted on it): the
# hardware's figures, not measured here (no GPU).
BANDWIDTH = 1.5e12  # bytes read per second: ~60 % of the slice's 2.4 TB/s
FLOPS = 2e14  # bf16 matrix FLOP/s: ~half of the slice's dense peak
LAUNCH_SECONDS = 7e-6  # one operation launched from Python by the eager step
GRAPH_OP_SECONDS = 2e-6  # one kernel replayed from a CUDA graph: the gap between kernels
MOVE_BANDWIDTH = 2e9  # bytes per second a fresh worker reads the weights into the GPU (spaces' offload file)
START_SECONDS = 10.0  # forking the worker, CUDA's start-up, and the final VAE decode
MARGIN = 1.25  # on the whole: a task that outlives its reservation may be ended


@dataclass(frozen=True)
class ModelCost:
    """What one model's step reads (``loading.traffic``: quantized weights as held, int8's per-call
    conversion on a GPU included) and computes (parameters)."""

    reads: WeightReads
    backbone_params: int
    head_step_params: int  # the flow head's parameters evaluated at every sampling step

    @classmethod
    def of(cls, model: NextStepModel) -> ModelCost:
        backbone_params, head_step_params = held_parameters(model)
        return cls(
            reads=WeightReads.of(model.config, model.dtype, model.quantization, converts=True),  # ZeroGPU: no compile
            backbone_params=backbone_params,
            head_step_params=head_step_params,
        )


def _operations(model: NextStepModel, sampler: str, steps: int, branches: int, use_norm: bool) -> int:
    """Operations per token: counted at one and two sampling steps, and as many more for each
    further one (every sampling step runs the same operations)."""
    one, two = _counted(model, sampler, branches, use_norm)
    return one + (steps - 1) * (two - one)


@cache
def _counted(model: NextStepModel, sampler: str, branches: int, use_norm: bool) -> tuple[int, int]:
    return tuple(count_token_ops(model.config, sampler, steps, branches, 1, use_norm, dtype=model.dtype).total
                 for steps in (1, 2))


def shape_of(request: GenerationRequest) -> tuple:
    """What a token's time depends on: the sampler's evaluations and the backbone rows."""
    return (request.sampler, request.num_sampling_steps, request.rows)


class Reservation:
    """The seconds to reserve for requests on a set of models (a ZeroGPU task's), calibrated by
    ``calibrate`` with what tasks measured. ``graph``: the step replays a CUDA graph."""

    def __init__(self, models: list[NextStepModel], graph: bool):
        self.models, self.graph = models, graph
        self.costs = [ModelCost.of(model) for model in models]
        self.moved_bytes = sum(cost.reads.held for cost in self.costs)  # a fresh worker moves every model
        self._measured: dict[tuple, float] = {}  # (model, shape) -> seconds per token
        self._lock = threading.Lock()

    def basis(self, model: int, request: GenerationRequest, prompt_tokens: int = 256) -> dict:
        """Every input of the reservation, and the seconds it comes to (``seconds``)."""
        cost, sampler = self.costs[model], SAMPLERS[request.sampler]
        evaluations = len(sampler.schedule(sampler.time_grid(request.num_sampling_steps, request.timesteps_shift)))
        slots = cache_slots(prompt_tokens + request.tokens * (2 if request.edit else 1))
        bytes_read = cost.reads.token(request.rows, slots, evaluations).total  # SDPA reads every slot
        flops = 2 * request.rows * (cost.backbone_params + evaluations * cost.head_step_params)
        operations = _operations(self.models[model], request.sampler, request.num_sampling_steps, request.branches,
                                 request.use_norm)
        per_operation = GRAPH_OP_SECONDS if self.graph else LAUNCH_SECONDS
        estimated = bytes_read / BANDWIDTH + flops / FLOPS + operations * per_operation
        with self._lock:
            measured = self._measured.get((model, shape_of(request)))
        prompt = prompt_tokens + (request.tokens if request.edit else 0)  # an edit inlines its input image
        prefill = 2 * cost.backbone_params * request.rows * prompt / FLOPS
        once = START_SECONDS + self.moved_bytes / MOVE_BANDWIDTH + prefill
        per_token = measured if measured is not None else estimated
        return dict(
            tokens=request.tokens, rows=request.rows, evaluations=evaluations, bytes_per_token=bytes_read,
            flops_per_token=flops, operations_per_token=operations, seconds_per_operation=per_operation,
            estimated_seconds_per_token=estimated, measured_seconds_per_token=measured, once_seconds=once,
            margin=MARGIN, hardware=dict(bandwidth=BANDWIDTH, flops=FLOPS, move_bandwidth=MOVE_BANDWIDTH),
            seconds=round(MARGIN * (once + request.tokens * per_token)),
        )

    def seconds(self, model: int, request: GenerationRequest) -> int:
        return self.basis(model, request)["seconds"]

    def calibrate(self, model: int, request: GenerationRequest, seconds_per_token: float) -> None:
        """What a task of ``request`` measured: later reservations of its shape use it."""
        with self._lock:
            self._measured[(model, shape_of(request))] = seconds_per_token

    def to_dict(self) -> dict:
        return dict(graph=self.graph, costs=[asdict(cost) for cost in self.costs])
