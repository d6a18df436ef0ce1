"""The per-token step is one static function: ``torch.compile(fullgraph=True)`` takes it whole
(flash-attn's kernels included, as custom ops), compiles it once for a batch shape (not once per
token), and samples the tokens the eager step samples; every batch of a shape reuses one static
state; a compile in the background changes no token; the fixtures' full generations come out the
same with the compiled step; the step exports whole and compiles ahead of time (AOTInductor)."""

import copy
import dataclasses

import pytest
import torch

from nextstep import NextStepPipeline
from nextstep.engine.sampling import noise_draws, time_grid
from nextstep.engine.steps import StepRunner
from nextstep.engine.token_loop import (
    CACHE_SLOTS_MULTIPLE,
    BatchDecoder,
    DecodeJob,
    decode_step,
)

from ..conftest import TINY, TINY11, api_kwargs, images_as_array, load_case
from ..models.test_flash_attention import STAND_IN

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


def decode(model, jobs, runner: StepRunner) -> list[torch.Tensor]:
    decoder = BatchDecoder(model, jobs, True, runner)
    while not decoder.finished:
        decoder.step()
    decoder.release()
    return [job.tokens for job in jobs]


EAGER = StepRunner(decode_step)


@pytest.mark.parametrize("sampler, branches", [("v1", 2), ("sde", 3)])
def test_the_step_compiles_whole_once_per_batch_shape_and_matches_eager(tiny_pipe, sampler, branches):
    model = tiny_pipe.model
    compiled = StepRunner(decode_step, "compiled")  # fullgraph: a graph break anywhere in the step is an error
    before = compiled_step_graphs()
    # Two decoders of one batch shape: prompt lengths in one cache bucket, other noise and guidance.
    for length, seed in [(7, 0), (9, 1)]:
        assert (length + 4) // CACHE_SLOTS_MULTIPLE == 0  # the same cache length for both
        eager = decode(model, [job(model, length, sampler, seed, branches=branches)], EAGER)
        fast = decode(model, [job(model, length, sampler, seed, branches=branches)], compiled)
        assert (fast[0] - eager[0]).abs().max() <= TOKEN_TOL
        assert fast[0].abs().sum() > 0  # every token written
    assert compiled_step_graphs() == before + 1  # one graph for the batch shape: none per token or prompt


def test_compiled_batch_with_a_dropped_job_matches_eager(tiny_pipe):
    model = tiny_pipe.model

    def run(runner):
        jobs = [job(model, 6, "v1", seed, images=1) for seed in (3, 4)]
        decoder = BatchDecoder(model, jobs, True, runner)
        while not decoder.finished:
            if decoder.step() == 1:
                decoder.drop(jobs[0])
        decoder.release()
        return [j.tokens for j in jobs]

    eager, fast = run(EAGER), run(StepRunner(decode_step, "compiled"))
    assert torch.all(eager[0][:, 2:] == 0) and torch.all(fast[0][:, 2:] == 0)  # dropped after token 1
    for mine, expected in zip(fast, eager):
        assert (mine - expected).abs().max() <= TOKEN_TOL


def test_the_step_with_flash_kernels_compiles_whole_and_matches_eager(tiny_pipe):
    """The decode kernel (here a plain-torch stand-in, registered as the flash ones are) is one
    operation of the fullgraph compile, and the tokens are SDPA's."""
    model = tiny_pipe.model
    eager = decode(model, [job(model, 7, "v1", 5)], EAGER)
    model.new_cache = lambda batch, slots, original=model.new_cache: _with_kernels(original(batch, slots))
    try:
        fast = decode(model, [job(model, 7, "v1", 5)], StepRunner(decode_step, "compiled"))
    finally:
        del model.new_cache
    assert (fast[0] - eager[0]).abs().max() <= TOKEN_TOL


def _with_kernels(cache):
    cache.kernels = STAND_IN
    return cache


def test_every_batch_of_a_shape_refills_one_static_state_and_keeps_its_own_tokens(tiny_pipe):
    model, runner = tiny_pipe.model, StepRunner(decode_step)
    first, second = job(model, 7, "v1", 0), job(model, 9, "v1", 1)  # one cache bucket: one shape
    decoders = []
    for decoding in (first, second):
        decoder = BatchDecoder(model, [decoding], True, runner)
        while not decoder.finished:
            decoder.step()
        decoder.release()
        decoders.append(decoder)
    assert decoders[0].static is decoders[1].static, "the second batch reused the first one's state"
    alone = decode(model, [job(model, 7, "v1", 0)], StepRunner(decode_step))
    assert torch.equal(first.tokens, alone[0]), "the first batch's tokens outlived the second batch"


def test_a_background_compile_changes_no_token(tiny_pipe):
    """Served eagerly while its shape compiles, then compiled: the same tokens."""
    model, runner = tiny_pipe.model, StepRunner(decode_step, "background")
    before = decode(model, [job(model, 7, "sde", 2)], runner)  # asks for the compile, served eagerly
    [shape] = runner.store._steps
    assert runner.compiler.wait(shape, timeout=900), "the compile finished"
    graphs = compiled_step_graphs()
    after = decode(model, [job(model, 7, "sde", 2)], runner)
    assert compiled_step_graphs() == graphs, "the compiled step served: no new compile"
    assert (after[0] - before[0]).abs().max() <= TOKEN_TOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["graph", "compiled"])
def test_the_step_captured_as_a_cuda_graph_matches_eager(mode):
    model = NextStepPipeline.from_pretrained(TINY / "model", vae=TINY / "vae", device="cuda").model
    runner = StepRunner(decode_step, mode, cuda_graphs=True)
    for sampler in ("v1", "sde"):
        for seed in (0, 1):  # the second batch of the shape replays the first one's graph
            eager = decode(model, [job(model, 7, sampler, seed)], EAGER)
            replayed = decode(model, [job(model, 7, sampler, seed)], runner)
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


class ExportedStep(torch.nn.Module):
    """``decode_step`` on a state given as flat tensors, as ``torch.export`` takes a module."""

    def __init__(self, model, state, arguments):
        super().__init__()
        self.model, self.state, self.arguments = model, state, arguments

    def forward(self, hidden, tokens, token, slot, positions, key_valid, *keys_and_values):
        layers = len(keys_and_values) // 2
        cache = copy.copy(self.state.cache)
        cache.keys, cache.values, cache.key_valid = list(keys_and_values[:layers]), list(keys_and_values[layers:]), key_valid
        state = dataclasses.replace(self.state, cache=cache, hidden=hidden, tokens=tokens, token=token, slot=slot,
                                    positions=positions)
        decode_step(self.model, state, *self.arguments)
        return tokens


def flat_state(state) -> tuple:
    """The tensors a step writes, copied: ``ExportedStep``'s inputs."""
    with torch.no_grad():
        return tuple(tensor.clone() for tensor in (state.hidden, state.tokens, state.token, state.slot, state.positions,
                                                   state.cache.key_valid, *state.cache.keys, *state.cache.values))


@pytest.mark.slow  # an ahead-of-time compile: a minute on a 2-core machine
def test_the_step_exports_and_its_ahead_of_time_compile_matches_eager(tiny_pipe, tmp_path):
    """What spaces' AOTInductor path on ZeroGPU needs: the static step exported whole
    (``torch.export``, state written in place) and compiled ahead of time by AOTInductor; its
    package, loaded back, samples every token the eager step samples."""
    model = tiny_pipe.model
    decoder = BatchDecoder(model, [job(model, 7, "sde", 4)], True, EAGER)  # prefilled
    state = dataclasses.replace(decoder.state, times=decoder.state.times.clone())  # not an inference tensor
    step = ExportedStep(model, state, decoder._arguments)
    eager, ahead = flat_state(state), flat_state(state)
    with torch.no_grad():
        exported = torch.export.export(step, flat_state(state), strict=False)
    package = torch._inductor.aoti_load_package(
        torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp_path / "step.pt2")))
    with torch.inference_mode():
        for _ in range(decoder.total):
            step(*eager)
            package(*ahead)
    decoder.release()
    assert torch.equal(ahead[2], eager[2]) and int(ahead[2]) == decoder.total, "both advanced to the last token"
    assert eager[1].abs().amin(dim=-1).gt(0).all(), "every token was written"
    assert (ahead[1] - eager[1]).abs().max() <= TOKEN_TOL
