"""The benchmark runs end to end, and the plain baseline loop agrees with the pipeline."""

import json

import pytest
import torch

from nextstep.tools import bench

from ..conftest import TINY, load_case


def test_bench_json_on_tiny(capsys):
    code = bench.main(["--config", "tiny", "--size", "32x32", "--num-sampling-steps", "3", "--compare-baseline", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    for field in ("seconds_per_image", "ms_per_token", "first_preview_seconds", "preview_overhead", "peak_memory_mb"):
        assert field in report
    assert report["tokens"] == 4
    assert set(report["ms_per_token_split"]) == {"token_step", "backbone_alone"}
    assert {"previews_decoded", "preview_decode_ms"} <= set(report)
    assert report["baseline_max_token_difference"] <= 1e-4
    assert report["speedup_over_baseline"] > 0


def test_bench_table(capsys):
    bench.main(["--config", "tiny", "--size", "32x32", "--num-sampling-steps", "2", "--preview", "vae", "--preview-every", "1"])
    table = capsys.readouterr().out
    assert "seconds per image" in table and "preview overhead" in table


@pytest.mark.parametrize("case", ["t2i_cfg", "edit"])
def test_plain_loop_gives_the_pipeline_tokens(tiny_pipe, case):
    args, _, image = load_case(TINY, case)
    settings = dict(
        negative_prompt=args["negative_prompt"], size=(args["hw"][1], args["hw"][0]), cfg=args["cfg"], cfg_img=args["cfg_img"],
        timesteps_shift=args["timesteps_shift"], num_sampling_steps=args["num_sampling_steps"], seed=args["seed"],
    )
    fast = tiny_pipe.generate(args["captions"], image, **settings)
    plain = bench.plain_generate(tiny_pipe, tiny_pipe.engine.request(args["captions"], image, **settings))
    torch.testing.assert_close(plain, fast.tokens, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_compiled_head_gives_the_same_tokens():
    pipe = bench.random_pipeline("tiny", "cpu", torch.float32)
    settings = dict(prompt=bench.PROMPT, size=(32, 32), num_sampling_steps=3, cfg=3.0, seed=4)
    eager = pipe.generate(**settings)
    pipe.compile()
    compiled = pipe.generate(**settings)
    torch.testing.assert_close(compiled.tokens, eager.tokens, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_fairness_on_tiny(capsys):
    assert bench.main(["--config", "tiny", "--size", "32x32", "--num-sampling-steps", "2", "--repeat", "1",
                       "--fairness", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["seconds_alone"] > 0 and report["seconds_beside_expensive"] > 0 and report["factor"] > 0


def test_break_even_on_tiny(capsys):
    assert bench.main(["--config", "tiny", "--size", "32x32", "--num-sampling-steps", "4", "--cfg", "7.5",
                       "--repeat", "1", "--break-even", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["eager_seconds_per_image"] > 0 and report["compiled_seconds_per_image"] > 0
    images = report["break_even_images"]
    assert images is None or images * (report["eager_seconds_per_image"] - report["compiled_seconds_per_image"]) \
        == pytest.approx(report["compile_seconds"])
