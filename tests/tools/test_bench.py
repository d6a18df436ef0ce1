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


def test_schemes_on_tiny(capsys):
    """Every scheme this machine runs, against unquantized: speed, bytes per token and quality."""
    assert bench.main(["--config", "tiny", "--size", "32x32", "--num-sampling-steps", "2", "--repeat", "1",
                       "--schemes", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    runs = {run["quantize"]: run for run in report["runs"]}
    assert list(runs) == ["none", "int8", "int4", "fp8"]
    assert runs["none"]["max_token_difference"] == 0 and runs["none"]["min_psnr_db"] == float("inf")
    for run in runs.values():
        assert run["seconds_per_image"] > 0 and run["gpu_seconds_per_image"] > 0
    # Packed weights read fewer bytes; int8 converted per call in eager mode reads more on a GPU.
    assert runs["int4"]["mb_per_token"] < runs["int8"]["mb_per_token"] < runs["none"]["mb_per_token"]
    assert runs["int4"]["gpu_mb_per_token"] < runs["none"]["gpu_mb_per_token"] < runs["int8"]["gpu_mb_per_token"]
    assert runs["int8"]["gpu_seconds_per_image_compiled"] < runs["none"]["gpu_seconds_per_image_compiled"]


def test_kernels_on_tiny(capsys):
    assert bench.main(["--config", "tiny", "--kernels", "--repeat", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    runs = {run["quantize"]: run for run in report["runs"]}
    assert report["rows"] == 2 and report["layers"] == 2
    assert runs["int4"]["mb_per_layer"] < runs["int8"]["mb_per_layer"] < runs["none"]["mb_per_layer"]
    assert all(run["ms_per_token"] > 0 for run in runs.values())


def test_the_plans_of_every_scheme_at_the_real_shape(capsys):
    assert bench.main(["--config", "nextstep-1-large", "--plan", "--schemes", "--dtype", "bfloat16", "--device", "cuda",
                       "--json"]) == 0
    plans = {p["quantize"]: p for p in json.loads(capsys.readouterr().out)}
    assert list(plans) == [None, "int8", "int4", "fp8"]
    assert plans["int4"]["peak_gib"] <= 11.5
    assert plans["int4"]["traffic"]["total_mb"] < plans["fp8"]["traffic"]["total_mb"] < plans[None]["traffic"]["total_mb"]
    assert plans[None]["seconds_per_image_from_bytes"] == pytest.approx(
        1024 * plans[None]["traffic"]["total_mb"] * 1e6 / 3.35e12)
