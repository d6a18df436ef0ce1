"""The per-token step is one static function: ``torch.compile(fullgraph=True)`` takes it whole,
compiles it once for a batch shape (not once per token), and samples the tokens the eager step
samples; the fixtures' full generations come out the same with the compiled step."""

import pytest
import torch

from nextstep import NextStepPipeline
from nextstep.engine.sampling import noise_draws, time_grid
from nextstep.engine.token_loop import (
    BatchDecoder,
    DecodeJob,
    compile_step,
    decode_step,
)
from nextstep.models.backbone import CACHE_SLOTS_MULTIPLE

from ..conftest import TINY, TINY11, api_kwargs, images_as_array, load_case

TOKEN_TOL = 1e-4  # the parity tolerance


def compiled_step_graphs() -> int:
    """Graphs compiled for ``decode_step`` so far (dynamo's per-function cache, a debugging API)."""
    return len(torch._dynamo.eval_frame._debug_get_cache_entry_list(decode_step.__code__))


def job(model, prompt_length: int, sampler: str, seed: int, grid=(2, 2), steps=3, images=2, branches=2) -> DecodeJob:
    """A job of random prompt ids (the first row left padded by 2) and noise, linear guidance."""
    generator = torch.Generator().manual_seed(seed)
    rows, total = branches * images, grid[0] * grid[1]
    input_ids = torch.randint(3, model.config.vocab_size, (rows, prompt_length), generator=generator)
    attention_mask = torch.ones(rows, prompt_length, dtype=torch.long)
    attention_mask[0, :2] = 0
    draws, device = noise_draws(sampler, steps), model.device
    return DecodeJob(
        input_ids=input_ids, attention_mask=attention_mask, image_latents=None,
        head_noise=torch.randn(total, draws, images, model.config.token_dim, generator=generator).to(device),
        cfg=torch.linspace(4.0, 1.5, total, device=device), cfg_img=torch.linspace(2.0, 1.0, total, device=device),
        grid=grid, branches=branches, sampler=sampler, times=time_grid(sampler, steps, 2.0).to(device),
        use_norm=True, num_sampling_steps=steps, timesteps_shift=2.0,
    )


def decode(model, jobs, step, cuda_graph=False) -> list[torch.Tensor]:
    decoder = BatchDecoder(model, jobs, position_table=True, step=step, cuda_graph=cuda_graph)
    while not decoder.finished:
        decoder.step()
    return [job.tokens for job in jobs]


@pytest.mark.parametrize("sampler, branches", [("v1", 2), ("sde", 3)])
def test_the_step_compiles_whole_once_per_batch_shape_and_matches_eager(tiny_pipe, sampler, branches):
    model = tiny_pipe.model
    compiled = compile_step()  # fullgraph: a graph break anywhere in the step is an error
    before = compiled_step_graphs()
    # Two decoders of one batch shape: prompt lengths in one cache bucket, other noise and guidance.
    for length, seed in [(7, 0), (9, 1)]:
        assert (length + 4) // CACHE_SLOTS_MULTIPLE == 0  # the same cache length for both
        eager = decode(model, [job(model, length, sampler, seed, branches=branches)], decode_step)
        fast = decode(model, [job(model, length, sampler, seed, branches=branches)], compiled)
        assert (fast[0] - eager[0]).abs().max() <= TOKEN_TOL
        assert fast[0].abs().sum() > 0  # every token written
    assert compiled_step_graphs() == before + 1  # one graph for the batch shape: none per token or prompt


def test_compiled_batch_with_a_dropped_job_matches_eager(tiny_pipe):
    model = tiny_pipe.model
    compiled = compile_step()

    def run(step):
        jobs = [job(model, 6, "v1", seed, images=1) for seed in (3, 4)]
        decoder = BatchDecoder(model, jobs, True, step=step)
        while not decoder.finished:
            if decoder.step() == 1:
                decoder.drop(jobs[0])
        return [j.tokens for j in jobs]

    eager, fast = run(decode_step), run(compiled)
    assert torch.all(eager[0][:, 2:] == 0) and torch.all(fast[0][:, 2:] == 0)  # dropped after token 1
    for mine, expected in zip(fast, eager):
        assert (mine - expected).abs().max() <= TOKEN_TOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compiled", [False, True])
def test_the_step_captured_as_a_cuda_graph_matches_eager(compiled):
    model = NextStepPipeline.from_pretrained(TINY / "model", vae=TINY / "vae", device="cuda").model
    step = compile_step() if compiled else decode_step
    for sampler in ("v1", "sde"):
        eager = decode(model, [job(model, 7, sampler, 0)], decode_step)
        replayed = decode(model, [job(model, 7, sampler, 0)], step, cuda_graph=True)
        assert (replayed[0] - eager[0]).abs().max() <= TOKEN_TOL


CASES = [(TINY, "t2i_cfg"), (TINY, "t2i_nocfg"), (TINY, "edit")] + [
    (TINY11, case) for case in ["t2i_sde", "t2i_ode", "t2i_cps", "t2i_usenorm", "edit"]
]


@pytest.fixture(scope="module")
def compiled_pipes():
    """Pipelines of their own (the shared ones stay eager), compiled."""
    pipes = {TINY: NextStepPipeline.from_pretrained(TINY / "model", vae=TINY / "vae"),
             TINY11: NextStepPipeline.from_pretrained(TINY11 / "model")}
    for pipe in pipes.values():
        pipe.compile()
    return pipes


@pytest.mark.slow  # one compile per case: a minute or more each on a 2-core machine without a warm inductor cache
@pytest.mark.parametrize("directory, case", CASES, ids=[f"{d.name}-{c}" for d, c in CASES])
def test_full_generations_with_the_compiled_step_match_the_fixtures(compiled_pipes, directory, case):
    pipe = compiled_pipes[directory]
    args, ref, image = load_case(directory, case)
    extra = {"sampler": args["sde_type"]} if directory == TINY11 else {}
    before = compiled_step_graphs()
    result = pipe.generate(args["captions"], image, **api_kwargs(args), **extra)
    assert compiled_step_graphs() == before + 1  # the token loop ran the compiled step (a new shape)
    assert (result.tokens - ref["tokens"]).abs().max() <= TOKEN_TOL
    assert (images_as_array(result.images).int() - ref["image"].int()).abs().max() <= 1
