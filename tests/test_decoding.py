"""Several requests decoded in one token loop give what each gives alone."""

import pytest
import torch

from nextstep.decoding import BatchDecoder
from nextstep.pipeline import GenerationRequest

TOKEN_TOL = 1e-4  # the parity tolerance: batch size changes CPU kernels' rounding, not results


def requests():
    return [
        GenerationRequest(prompt="a red circle", negative_prompt="blurry", hw=(64, 64), cfg=3.0, num_sampling_steps=4, seed=1),
        GenerationRequest(
            prompt="two blue squares on the left of a big green triangle", negative_prompt="", hw=(64, 64),
            cfg=5.0, cfg_schedule="linear", num_sampling_steps=4, seed=2, num_images=2,
        ),
        GenerationRequest(prompt="green", negative_prompt="bad", hw=(64, 64), cfg=3.0, num_sampling_steps=4, seed=3),
    ]


def decode(pipe, jobs, drop_after=None):
    decoder = pipe.decoder(jobs)
    while not decoder.finished:
        k = decoder.step()
        if drop_after is not None and k == drop_after[0]:
            decoder.drop(drop_after[1])


def alone_tokens(pipe):
    out = []
    for request in requests():
        pipe.validate(request)
        job, _ = pipe.prepare(request)
        decode(pipe, [job])
        out.append(job.tokens)
    return out


def batch_jobs(pipe):
    jobs = []
    for request in requests():
        pipe.validate(request)
        jobs.append(pipe.prepare(request)[0])
    return jobs


def test_batched_equals_alone(tiny_pipe):
    alone = alone_tokens(tiny_pipe)
    jobs = batch_jobs(tiny_pipe)
    decode(tiny_pipe, jobs)
    for job, expected in zip(jobs, alone):
        assert (job.tokens - expected).abs().max() <= TOKEN_TOL


def test_dropping_one_job_leaves_the_others_intact(tiny_pipe):
    alone = alone_tokens(tiny_pipe)
    jobs = batch_jobs(tiny_pipe)
    decode(tiny_pipe, jobs, drop_after=(5, jobs[1]))
    for index in (0, 2):
        assert (jobs[index].tokens - alone[index]).abs().max() <= TOKEN_TOL
    assert torch.all(jobs[1].tokens[:, 7:] == 0)  # the dropped job stopped early


def test_jobs_with_different_settings_are_refused_together(tiny_pipe):
    first, second = requests()[0], requests()[2]
    second.num_sampling_steps = 5
    jobs = []
    for request in (first, second):
        tiny_pipe.validate(request)
        jobs.append(tiny_pipe.prepare(request)[0])
    with pytest.raises(ValueError, match="share"):
        BatchDecoder(tiny_pipe.model, jobs, position_table=False)
