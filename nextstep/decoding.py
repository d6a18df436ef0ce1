"""The token loop: prefill the prompts, then sample image tokens one at a time, for one
request or several decoded together.

Requests decode together when they share the token grid, sampler, step count, time shift,
guidance branch count and ``use_norm`` (``DecodeJob.batch_key``). Each keeps its own prompt,
noise (drawn from its own seed) and guidance weights, so its result does not depend on the
company it keeps. Backbone rows are branch-major across the batch: for each guidance branch,
every job's images in turn, which lets ``guide`` split the velocities with one ``chunk``.
A job's rows keep the positions they would have alone: left padding added to line up prompts
of different lengths shifts cache slots, not positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .model import NextStepModel
from .sampling import sample_token


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
    time_grid: torch.Tensor  # (grid points,) on the model's device
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


class BatchDecoder:
    """Decodes the image tokens of jobs with one batch key together; ``drop`` removes a job."""

    def __init__(self, model: NextStepModel, jobs: list[DecodeJob], position_table: bool):
        """position_table: add the model's generation position table to the condition
        (``config.use_gen_pos_embed``, where the model's family honours it)."""
        keys = {job.batch_key for job in jobs}
        if len(keys) != 1:
            raise ValueError("jobs decoded together must share grid, sampler, steps, shift, branches and use_norm")
        self.model = model
        self.position_table = position_table
        self.jobs = list(jobs)
        self.next_token = 0
        first = jobs[0]
        self.branches, self.total, self.time_grid = first.branches, first.total, first.time_grid
        self._prefill()

    # ---- rows ----------------------------------------------------------------------------

    def _rows_of(self, job_index: int) -> list[int]:
        """Indices of a job's rows in the branch-major batch."""
        offsets, start = [], 0
        for job in self.jobs:
            offsets.append(start)
            start += job.images
        images_in_batch = start
        job = self.jobs[job_index]
        return [
            branch * images_in_batch + offsets[job_index] + i for branch in range(self.branches) for i in range(job.images)
        ]

    @torch.inference_mode()
    def _prefill(self) -> None:
        model, device = self.model, self.model.device
        length = max(job.input_ids.shape[1] for job in self.jobs)
        job_embeds = [model.embed(job.input_ids.to(device), job.image_latents) for job in self.jobs]
        embeds, valid, positions = [], [], []
        for branch in range(self.branches):
            for job, all_rows in zip(self.jobs, job_embeds):
                rows = slice(branch * job.images, (branch + 1) * job.images)
                pad = length - job.input_ids.shape[1]
                embeds.append(F.pad(all_rows[rows], (0, 0, pad, 0)))
                valid.append(F.pad(job.attention_mask[rows].to(device).bool(), (pad, 0)))
                positions.append((torch.arange(length, device=device) - pad).clamp(min=0).expand(job.images, -1))
        embeds, positions = torch.cat(embeds), torch.cat(positions)  # positions: each job's own
        self.prompt_length = length
        self.cache = model.new_cache(embeds.shape[0], length + self.total)
        self.next_positions = positions[:, -1] + 1  # (rows,) position of each row's first image token
        slots = torch.arange(length, device=device)
        self.hidden = model.forward_backbone(embeds, slots, torch.cat(valid), self.cache, positions)[:, -1]

    # ---- the loop ------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self.next_token >= self.total or not self.jobs

    @torch.inference_mode()
    def step(self) -> int:
        """Sample token ``k`` of every job, store it in ``job.tokens``, feed it back; return k."""
        model, k = self.model, self.next_token
        first = self.jobs[0]
        cond = model.condition(self.hidden, k if self.position_table else None)
        noise = torch.cat([job.head_noise[k] for job in self.jobs], dim=1)  # (draws, images, D)
        cfg = torch.cat([job.cfg[k].expand(job.images) for job in self.jobs])[:, None]  # (images, 1)
        cfg_img = torch.cat([job.cfg_img[k].expand(job.images) for job in self.jobs])[:, None]
        velocity_at = model.image_head.velocity_field(cond, self.time_grid)
        x = sample_token(first.sampler, velocity_at, noise, self.time_grid, self.branches, cfg, cfg_img)
        if first.use_norm:
            x = F.layer_norm(x, (x.shape[-1],), eps=1e-6)
        start = 0
        for job in self.jobs:
            job.tokens[:, k] = x[start : start + job.images]
            start += job.images
        self.next_token = k + 1
        if self.next_token < self.total:  # the last token needs no backbone pass
            embed = model.image_in_projector(x.to(model.dtype)).repeat(self.branches, 1)[:, None]  # (rows, 1, hidden)
            slot = torch.tensor([self.prompt_length + k], device=model.device)
            valid = torch.ones(embed.shape[0], 1, dtype=torch.bool, device=model.device)
            positions = (self.next_positions + k)[:, None]
            self.hidden = model.forward_backbone(embed, slot, valid, self.cache, positions)[:, -1]
        return k

    @torch.inference_mode()
    def drop(self, job: DecodeJob) -> None:
        """Remove a job (cancelled); the others go on from the same token."""
        index = self.jobs.index(job)
        rows = self._rows_of(index)
        keep = torch.tensor([r for r in range(self.hidden.shape[0]) if r not in rows], device=self.model.device)
        self.jobs.pop(index)
        if not self.jobs:
            return
        self.cache.keep_rows(keep)
        self.hidden = self.hidden[keep]
        self.next_positions = self.next_positions[keep]
