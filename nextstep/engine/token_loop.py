"""The token loop: prefill the prompts, then sample image tokens one at a time, for one
request or several decoded together.

Requests decode together when they share the token grid, sampler, step count, time shift,
guidance branch count and ``use_norm`` (``DecodeJob.batch_key``). Each keeps its own prompt,
noise (drawn from its own seed) and guidance weights, so its result does not depend on the
company it keeps. Backbone rows are branch-major across the batch: for each guidance branch,
every job's images in turn, which lets ``guide`` split the velocities with one ``chunk``.
A job's rows keep the positions they would have alone: left padding added to line up prompts
of different lengths shifts cache slots, not positions.

Each token is one call of ``decode_step``: a static function of the batch's ``StepState``
(device tensors of fixed shape, the token index among them) that samples the token with every
flow-head step and its guidance, stores it, and runs the backbone on it for the next. It reads
no value back to the host and allocates nothing that depends on the token, so the same step
serves every token: ``torch.compile(decode_step, fullgraph=True)`` compiles it once per batch
shape (``compile_step``), and on CUDA it can be captured once per batch as a CUDA graph and
replayed for every token (``BatchDecoder(cuda_graph=True)``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..models.backbone import StaticKVCache, cache_slots
from ..models.model import NextStepModel
from ..models.tokens import normalize_tokens
from .sampling import SAMPLERS, Coefficients, Sampler, guided, integrate

# The most batch shapes a compiled step compiles a graph for.
STEP_GRAPHS = 64


def batch_key(grid, sampler, num_sampling_steps, timesteps_shift, branches, use_norm) -> tuple:
    """Jobs with equal keys can share one token loop."""
    return (tuple(grid), sampler, num_sampling_steps, timesteps_shift, branches, use_norm)


@dataclass(eq=False)  # identity: a job is one request, whatever its tensors hold
class DecodeJob:
    """One request ready to decode: prompt rows, all of its noise and per-token guidance."""

    input_ids: torch.Tensor  # (branches * images, L) left padded, branch-major
    attention_mask: torch.Tensor  # (branches * images, L)
    image_latents: torch.Tensor | None  # normalised latents for the rows' image slots
    head_noise: torch.Tensor  # (tokens, draws, images, token_dim) on the model's device
    cfg: torch.Tensor  # (tokens,) float32 text guidance per token
    cfg_img: torch.Tensor  # (tokens,) float32 image guidance per token
    grid: tuple[int, int]
    branches: int
    sampler: str
    times: torch.Tensor  # (time points,) the sampler's time grid, on the model's device
    use_norm: bool
    num_sampling_steps: int
    timesteps_shift: float
    tokens: torch.Tensor = field(init=False)  # (images, tokens, token_dim) float32, filled in order

    def __post_init__(self):
        total, _, images, dim = self.head_noise.shape
        self.tokens = torch.zeros(images, total, dim, device=self.head_noise.device)

    @property
    def images(self) -> int:
        return self.head_noise.shape[2]

    @property
    def total(self) -> int:
        return self.head_noise.shape[0]

    @property
    def batch_key(self) -> tuple:
        return batch_key(self.grid, self.sampler, self.num_sampling_steps, self.timesteps_shift, self.branches, self.use_norm)


@dataclass
class StepState:
    """Everything ``decode_step`` reads and writes for one batch: fixed shapes, on the model's device.

    rows = branches * images, branch-major; N = tokens per image.
    """

    cache: StaticKVCache
    hidden: torch.Tensor  # (rows, hidden) last hidden state of each row; rewritten every step
    tokens: torch.Tensor  # (images, N, token_dim) float32, token k written at step k
    token: torch.Tensor  # (1,) int64: the index of the token the next step samples
    slot: torch.Tensor  # (1,) int64: the cache slot its input will be stored at
    positions: torch.Tensor  # (rows, 1) int64: the rotary position of that input, per row
    valid: torch.Tensor  # (rows, 1) bool, all True: every row's new input is a real token
    noise: torch.Tensor  # (N, draws, images, token_dim) every flow-head draw of the batch
    cfg: torch.Tensor  # (N, images, 1) text guidance per token and image
    cfg_img: torch.Tensor  # (N, images, 1)
    times: torch.Tensor  # (evaluations,) the grid times the velocity is evaluated at
    schedule: list[Coefficients]  # the sampler's per-step scalars (``Sampler.schedule``)


def decode_step(
    model: NextStepModel, state: StepState, sampler: Sampler, branches: int, use_norm: bool, position_table: bool
) -> None:
    """Sample token ``state.token`` of every image, store it, feed it back through the backbone and
    advance the state by one token. The Python arguments are fixed for a batch; after the last
    token the backbone pass is unused, as in the reference."""
    token = state.token
    cond = model.condition(state.hidden, token if position_table else None)
    velocity_at = model.image_head.velocity_field(cond, state.times)
    guided_velocity = guided(velocity_at, branches, state.cfg[token][0], state.cfg_img[token][0])
    x = integrate(sampler, state.schedule, guided_velocity, state.noise[token][0])  # (images, D)
    if use_norm:
        x = normalize_tokens(x)
    state.tokens.index_copy_(1, token, x[:, None])
    embed = model.image_in_projector(x.to(model.dtype)).repeat(branches, 1)[:, None]  # (rows, 1, hidden)
    hidden = model.forward_backbone(embed, state.slot, state.valid, state.cache, state.positions)
    state.hidden.copy_(hidden[:, -1])
    token += 1
    state.slot += 1
    state.positions += 1


Step = Callable[..., None]  # decode_step or a compiled decode_step


def compile_step() -> Step:
    """``decode_step`` compiled whole with inductor (no graph breaks, static shapes): one graph per
    batch shape, reused by every decoder of that shape and every token. Pass it to
    ``BatchDecoder(step=...)``; keep one per process. On CUDA, combine it with ``cuda_graph=True``
    rather than a "reduce-overhead" mode: the decoder captures the whole step itself."""
    compiled = torch.compile(decode_step, fullgraph=True, dynamic=False)

    def step(*args) -> None:
        # A server meets more batch shapes than dynamo's default of 8 graphs per function, and
        # with fullgraph the next one would be an error.
        with torch._dynamo.config.patch(recompile_limit=STEP_GRAPHS):
            compiled(*args)

    return step


class BatchDecoder:
    """Decodes the image tokens of jobs with one batch key together; ``drop`` removes a job.

    step: ``decode_step`` or ``compile_step()``'s. cuda_graph: on CUDA, capture the step once
    after the first token and replay it for the others (no launch per operation).
    """

    def __init__(
        self, model: NextStepModel, jobs: list[DecodeJob], position_table: bool, step: Step = decode_step,
        cuda_graph: bool = False,
    ):
        """position_table: add the model's generation position table to the condition
        (``config.use_gen_pos_embed``, where the model's family honours it)."""
        keys = {job.batch_key for job in jobs}
        if len(keys) != 1:
            raise ValueError("jobs decoded together must share grid, sampler, steps, shift, branches and use_norm")
        if cuda_graph and model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA model, this one is on {model.device}")
        self.model = model
        self.jobs = list(jobs)
        first = jobs[0]
        self.total = first.total
        self.next_token = 0
        sampler = SAMPLERS[first.sampler]
        self._step = step
        self._arguments = (sampler, first.branches, first.use_norm, position_table)
        self._cuda_graph = cuda_graph
        self._graph: torch.cuda.CUDAGraph | None = None  # captured after the first token
        self.state = self._prefill(sampler, first.branches, first.times)

    @torch.inference_mode()
    def _prefill(self, sampler: Sampler, branches: int, times: torch.Tensor) -> StepState:
        model, device, jobs = self.model, self.model.device, self.jobs
        length = max(job.input_ids.shape[1] for job in jobs)
        job_embeds = [model.embed(job.input_ids.to(device), job.image_latents) for job in jobs]
        embeds, valid, positions = [], [], []
        for branch in range(branches):
            for job, all_rows in zip(jobs, job_embeds):
                rows = slice(branch * job.images, (branch + 1) * job.images)
                pad = length - job.input_ids.shape[1]
                embeds.append(F.pad(all_rows[rows], (0, 0, pad, 0)))
                valid.append(F.pad(job.attention_mask[rows].to(device).bool(), (pad, 0)))
                positions.append((torch.arange(length, device=device) - pad).clamp(min=0).expand(job.images, -1))
        embeds, positions = torch.cat(embeds), torch.cat(positions)  # positions: each job's own
        slots = cache_slots(length + self.total)
        cache = model.new_cache(embeds.shape[0], slots)
        hidden = model.forward_backbone(embeds, torch.arange(length, device=device), torch.cat(valid), cache, positions)
        # The batch's tokens live in one tensor written by the step; each job's are a view of it.
        tokens = torch.cat([job.tokens for job in jobs])
        start = 0
        for job in jobs:
            job.tokens = tokens[start : start + job.images]
            start += job.images
        schedule = sampler.schedule(times)

        def per_token(values: torch.Tensor, job: DecodeJob) -> torch.Tensor:  # (N,) -> (N, images, 1)
            return values[:, None, None].expand(-1, job.images, 1)

        return StepState(
            cache=cache,
            hidden=hidden[:, -1].clone(),
            tokens=tokens,
            token=torch.zeros(1, dtype=torch.long, device=device),
            slot=torch.full((1,), length, device=device),
            positions=positions[:, -1:] + 1,
            valid=torch.ones(embeds.shape[0], 1, dtype=torch.bool, device=device),
            noise=torch.cat([job.head_noise for job in jobs], dim=2),
            cfg=torch.cat([per_token(job.cfg, job) for job in jobs], dim=1),
            cfg_img=torch.cat([per_token(job.cfg_img, job) for job in jobs], dim=1),
            times=times[: len(schedule)],
            schedule=schedule,
        )

    # ---- the loop ------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self.next_token >= self.total or not self.jobs

    @torch.inference_mode()
    def step(self) -> int:
        """Sample token ``k`` of every job, store it in ``job.tokens``, feed it back; return k."""
        if self._graph is not None:
            self._graph.replay()
        elif self._cuda_graph:
            self._graph = self._first_step_then_capture()
        else:
            self._step(self.model, self.state, *self._arguments)
        self.next_token += 1
        return self.next_token - 1

    def _first_step_then_capture(self) -> torch.cuda.CUDAGraph:
        # The first token runs on a side stream (warm-up, as CUDA graph capture asks), then the step
        # is recorded (recording runs nothing) and replayed for the other tokens.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._step(self.model, self.state, *self._arguments)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step(self.model, self.state, *self._arguments)
        return graph

    def drop(self, job: DecodeJob) -> None:
        """Remove a job (cancelled); the others go on from the same token.

        Its rows stay in the batch and keep being computed, unseen: the batch keeps its shape, so
        a compiled or captured step goes on serving it (compacting the rows would compile or
        capture again), and at the batch sizes decoded together a step costs about the same
        with a few rows fewer. The job keeps the tokens sampled so far."""
        self.jobs.remove(job)
        job.tokens = job.tokens.clone()  # no longer a view of the batch's tokens
