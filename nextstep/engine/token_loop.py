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
serves every token and every batch of the same shape: compiled once per shape, captured once per
shape as a CUDA graph on CUDA (``steps``: the step modes and the static state every batch of a
shape refills).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..models.backbone import StaticKVCache
from ..models.model import NextStepModel
from ..models.tokens import normalize_tokens
from .sampling import SAMPLERS, Coefficients, Sampler, guided, integrate
from .steps import StepRunner, capture

# Cache lengths are rounded up to this many slots (prompt and image together): with the image's
# tokens, prompts of up to about this many tokens share one length, so one compiled graph and one
# captured step per grid and batch size. Unused slots are masked as padding is (flash reads only
# the valid ones; SDPA reads them all, a few per cent of a step's bytes at the 14B shape).
CACHE_SLOTS_MULTIPLE = 512
# Steps in flight between the host and the GPU: the loop waits for the step before last, so Stop,
# the time limit and the progress shown are true within a token.
IN_FLIGHT = 2


def cache_slots(needed: int) -> int:
    """The cache length a batch needing ``needed`` slots gets: rounded up to CACHE_SLOTS_MULTIPLE."""
    return -(-needed // CACHE_SLOTS_MULTIPLE) * CACHE_SLOTS_MULTIPLE


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


@torch.inference_mode()  # whoever makes it: a compiled step's guards tell inference tensors apart
def new_state(model: NextStepModel, rows: int, images: int, total: int, draws: int, slots: int,
              times: torch.Tensor, schedule: list[Coefficients]) -> tuple[StepState, int]:
    """A batch shape's state, zeroed, and its bytes; the time grid and its scalars are the shape's own."""
    device, dim = model.device, model.config.token_dim
    cache = model.new_cache(rows, slots)
    state = StepState(
        cache=cache,
        hidden=torch.zeros(rows, model.config.hidden_size, device=device, dtype=model.dtype),
        tokens=torch.zeros(images, total, dim, device=device),
        token=torch.zeros(1, dtype=torch.long, device=device),
        slot=torch.zeros(1, dtype=torch.long, device=device),
        positions=torch.zeros(rows, 1, dtype=torch.long, device=device),
        valid=torch.ones(rows, 1, dtype=torch.bool, device=device),
        noise=torch.zeros(total, draws, images, dim, device=device),
        cfg=torch.zeros(total, images, 1, device=device),
        cfg_img=torch.zeros(total, images, 1, device=device),
        times=times[: len(schedule)],
        schedule=schedule,
    )
    tensors = [*cache.keys, *cache.values, state.tokens, state.noise]
    return state, sum(t.numel() * t.element_size() for t in tensors)


def batch_shape(model: NextStepModel, jobs: list[DecodeJob], position_table: bool) -> tuple:
    """(the batch's shape, ``make()`` -> a zeroed state of that shape and its bytes, the step's
    Python arguments after the state) for jobs sharing one batch key."""
    first = jobs[0]
    sampler = SAMPLERS[first.sampler]
    images = sum(job.images for job in jobs)
    slots = cache_slots(max(job.input_ids.shape[1] for job in jobs) + first.total)
    schedule = sampler.schedule(first.times)
    draws = first.head_noise.shape[1]

    def make() -> tuple[StepState, int]:
        return new_state(model, first.branches * images, images, first.total, draws, slots, first.times, schedule)

    return (first.batch_key, images, slots), make, (sampler, first.branches, first.use_norm, position_table)


class BatchDecoder:
    """Decodes the image tokens of jobs with one batch key together; ``drop`` removes a job,
    ``release`` ends the batch (the jobs keep their tokens, the shape's state goes back).

    runner: how the step runs (``steps.StepRunner``): eager, captured, compiled.
    """

    def __init__(self, model: NextStepModel, jobs: list[DecodeJob], position_table: bool, runner: StepRunner):
        """position_table: add the model's generation position table to the condition
        (``config.use_gen_pos_embed``, where the model's family honours it)."""
        keys = {job.batch_key for job in jobs}
        if len(keys) != 1:
            raise ValueError("jobs decoded together must share grid, sampler, steps, shift, branches and use_norm")
        if runner.cuda_graphs and model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA model, this one is on {model.device}")
        self.model, self.jobs, self.runner = model, list(jobs), runner
        self.total, self.next_token = jobs[0].total, 0
        self.shape, self._make, self._arguments = batch_shape(model, jobs, position_table)
        self.static = runner.store.take(self.shape, self._make)
        self._in_flight: list = []
        try:
            self._prefill(self.static.state, max(job.input_ids.shape[1] for job in jobs))
        except BaseException:
            runner.store.give_back(self.static)
            raise

    @property
    def state(self) -> StepState:
        return self.static.state

    @torch.inference_mode()
    def _prefill(self, state: StepState, length: int) -> None:
        """Fill the shape's state with this batch: the prompts through the backbone into its cache,
        every job's noise and guidance, the counters at the first image token."""
        model, device, jobs = self.model, self.model.device, self.jobs
        job_embeds = [model.embed(job.input_ids.to(device), job.image_latents) for job in jobs]
        branches = self._arguments[1]
        embeds, valid, positions = [], [], []
        for branch in range(branches):
            for job, all_rows in zip(jobs, job_embeds):
                rows = slice(branch * job.images, (branch + 1) * job.images)
                pad = length - job.input_ids.shape[1]
                embeds.append(F.pad(all_rows[rows], (0, 0, pad, 0)))
                valid.append(F.pad(job.attention_mask[rows].bool(), (pad, 0)))  # on the host
                positions.append((torch.arange(length, device=device) - pad).clamp(min=0).expand(job.images, -1))
        embeds, positions, valid = torch.cat(embeds), torch.cat(positions), torch.cat(valid)  # positions: each job's own
        state.cache.key_valid.zero_()  # slots an earlier batch of this shape filled are padding now
        hidden = model.forward_backbone(embeds, torch.arange(length, device=device), valid.to(device), state.cache,
                                        positions, prompt_valid=valid)
        state.hidden.copy_(hidden[:, -1])
        state.tokens.zero_()
        state.token.zero_()
        state.slot.fill_(length)
        state.positions.copy_(positions[:, -1:] + 1)
        state.noise.copy_(torch.cat([job.head_noise for job in jobs], dim=2))
        state.cfg.copy_(torch.cat([job.cfg[:, None, None].expand(-1, job.images, 1) for job in jobs], dim=1))
        state.cfg_img.copy_(torch.cat([job.cfg_img[:, None, None].expand(-1, job.images, 1) for job in jobs], dim=1))
        start = 0  # the batch's tokens live in the state; each job's are a view of them until release
        for job in jobs:
            job.tokens = state.tokens[start : start + job.images]
            start += job.images

    # ---- the loop ------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self.next_token >= self.total or not self.jobs

    @torch.inference_mode()
    def step(self) -> int:
        """Sample token ``k`` of every job, store it in ``job.tokens``, feed it back; return k."""
        step = self.runner.for_shape(self.shape, self._warm_up)
        static, arguments = self.static, (self.model, self.static.state, *self._arguments)
        if not self.runner.cuda_graphs:
            step(*arguments)
        elif static.graph is not None and static.graph_of is step:
            static.graph.replay()
        else:  # the first token of this shape with this step: it runs once, then is recorded
            static.graph, static.graph_of = capture(step, arguments, self.runner.store.pool), step
        self._bound_in_flight()
        self.next_token += 1
        return self.next_token - 1

    def _bound_in_flight(self) -> None:
        if self.model.device.type != "cuda":
            return  # the CPU runs each step to its end
        done = torch.cuda.Event()
        done.record()
        self._in_flight.append(done)
        if len(self._in_flight) >= IN_FLIGHT:
            self._in_flight.pop(0).synchronize()

    def _warm_up(self) -> tuple:
        """The arguments of a background compile run for this shape: a state of its own."""
        return (self.model, self._make()[0], *self._arguments)

    def drop(self, job: DecodeJob) -> None:
        """Remove a job (cancelled); the others go on from the same token.

        Its rows stay in the batch and keep being computed, unseen: the batch keeps its shape, so
        a compiled or captured step goes on serving it (compacting the rows would compile or
        capture again), and at the batch sizes decoded together a step costs about the same
        with a few rows fewer. The job keeps the tokens sampled so far."""
        self.jobs.remove(job)
        job.tokens = job.tokens.clone()  # no longer a view of the batch's tokens

    def release(self) -> None:
        """End the batch: every job keeps a copy of its tokens, and the shape's state is free for
        the next batch of its shape."""
        for job in self.jobs:
            job.tokens = job.tokens.clone()
        self.jobs = []
        self.runner.store.give_back(self.static)
