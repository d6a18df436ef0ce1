"""``python -m nextstep.tools.acceptance``: the GPU acceptance run, one command for a freshly started GPU machine.

Text-to-image at the 14B shape with random weights (speed does not depend on their values),
bf16, 256x256 (a 512x512 image has 4 times the tokens), 50 steps, cfg 7.5, through seven stages:
eager; graph (the eager step captured as a CUDA graph); flash (flash-attn's kernels, captured);
int8, int4 and fp8 (the backbone's weights packed, ``models.quantize``, captured); compiled
(inductor, captured). Each stage runs in a process
of its own, so that one that fails, runs out of memory or hangs is recorded and the next one
runs; the last is given what is left of ``--budget-seconds``. Each reports seconds per image,
ms per token split into prefill, token step, backbone alone (timed apart) and final decode,
peak memory, and the largest token difference from the eager stage. The report
(``OUT/acceptance.json``) is written after every stage. ``--dry-run`` runs the same stages on
the CPU at ``--config tiny``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..engine.settings import add_setting_flags, given_settings
from ..loading.devices import set_threads
from ..models.quantize import supported
from .shapes import CONFIGS, NEGATIVE, PROMPT
from .timing import (
    backbone_step_seconds,
    bench_pipeline,
    peak_memory_mb,
    timed_generation,
    timed_phases,
)

REPORT = "acceptance.json"
EAGER_TOKENS = "eager-tokens.pt"
LEAST_SECONDS = 30  # a stage is not started with less of the budget left


@dataclass(frozen=True)
class Stage:
    name: str
    step: str  # the step mode on CUDA (engine.steps.STEP_MODES); "graph" is the eager step on a CPU
    flash: bool = False
    quantize: str | None = None


STAGES = {stage.name: stage for stage in (
    Stage("eager", "eager"),
    Stage("graph", "graph"),
    Stage("flash", "graph", flash=True),
    Stage("int8", "graph", quantize="int8"),
    Stage("int4", "graph", quantize="int4"),
    Stage("fp8", "graph", quantize="fp8"),
    Stage("compiled", "compiled"),
)}


def skip_reason(stage: Stage, device: str) -> str | None:
    """Why ``stage`` cannot run on this machine, if it cannot."""
    if stage.name in ("graph", "flash") and device != "cuda":
        return "needs CUDA"
    if stage.flash and importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed"
    if stage.quantize and not supported(stage.quantize, device):
        return f"this device has no {stage.quantize} kernels"
    return None


# ---- one stage, in a process of its own --------------------------------------------------

def run_stage(args, stage: Stage) -> dict:
    """Builds the model for ``stage``, generates once to warm up (compile, capture), then times one
    generation as users get it and one split into phases; returns the stage's figures."""
    started = time.perf_counter()
    pipe = bench_pipeline(args, stage.quantize)
    pipe.model.use_flash_attention = stage.flash
    pipe.compile(stage.step if pipe.device.type == "cuda" or stage.step == "compiled" else "eager")
    settings = dict(negative_prompt=NEGATIVE, seed=0, **given_settings(args))
    work = (PROMPT, None)
    timed_generation(pipe, work, settings, "none", 8)
    warm_up = time.perf_counter() - started
    if pipe.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(pipe.device)
    timing = timed_generation(pipe, work, settings, "none", 8)
    timer, _ = timed_phases(pipe, work, settings, "none", 8)
    request = pipe.engine.request(*work, **settings)
    prompt_rows = pipe.engine.prepare(request).input_ids
    backbone = backbone_step_seconds(pipe, prompt_rows.shape[0], prompt_rows.shape[1] + request.tokens // 2)
    tokens, eager_path = timing["result"].tokens, args.out / EAGER_TOKENS
    if stage.name == "eager":
        torch.save(tokens, eager_path)
    difference = (torch.load(eager_path) - tokens).abs().max().item() if eager_path.is_file() else None
    return dict(
        step=pipe.engine.runner.mode, cuda_graph=pipe.engine.runner.cuda_graphs,
        attention="flash" if stage.flash else "sdpa", weights=stage.quantize or args.dtype,
        device_name=torch.cuda.get_device_name(pipe.device) if pipe.device.type == "cuda" else "cpu",
        size=request.size.value, tokens=request.tokens, rows=prompt_rows.shape[0],
        seconds_per_image=timing["seconds"], ms_per_token=1000 * timing["seconds"] / request.tokens,
        ms_split=dict(prefill=1000 * timer.seconds["prefill"], token_step=1000 * timer.seconds["step"] / request.tokens,
                      backbone_alone=1000 * backbone, final_decode=1000 * timer.seconds["finish"]),
        warm_up_seconds=warm_up, peak_memory_mb=peak_memory_mb(pipe.device),
        max_token_difference_vs_eager=difference,
    )


def stage_main(args) -> int:
    """A stage's process: its row, or the error that ended it, in ``OUT/<stage>.json``."""
    stage = STAGES[args.stage]
    set_threads(args.device)
    try:
        row = dict(status="ok", **run_stage(args, stage))
    except Exception as error:  # noqa: BLE001 - recorded; the parent goes on with the next stage
        row = dict(status="failed", error=f"{type(error).__name__}: {error}"[:2000])
    write_json(args.out / f"{stage.name}.json", row)
    return 0


# ---- the run: every stage in turn, guarded ---------------------------------------------

def run_all(args, argv: list[str]) -> dict:
    """Each asked stage in a process of its own, stopped at the budget's end; the report is
    written after every stage."""
    deadline = time.monotonic() + args.budget_seconds
    (args.out / EAGER_TOKENS).unlink(missing_ok=True)  # another run's
    report = dict(model=args.model or f"random {args.config}", device=args.device, dtype=args.dtype,
                  settings=given_settings(args), budget_seconds=args.budget_seconds, torch=torch.__version__,
                  stages=[])
    for name in args.stages:
        stage, started = STAGES[name], time.monotonic()
        left = deadline - started
        reason = skip_reason(stage, args.device)
        if reason is None and left < LEAST_SECONDS:
            reason = f"{left:.0f} s of the budget left"
        row = dict(status="skipped", reason=reason) if reason else stage_process(args, argv, stage, left)
        report["stages"].append(dict(stage=name, seconds=round(time.monotonic() - started, 1), **row))
        write_json(args.out / REPORT, report)
        print(format_row(report["stages"][-1]), flush=True)
    return report


def stage_process(args, argv: list[str], stage: Stage, timeout: float) -> dict:
    row_path, log_path = args.out / f"{stage.name}.json", args.out / f"{stage.name}.log"
    row_path.unlink(missing_ok=True)
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "nextstep.tools.acceptance", *argv, "--stage", stage.name]
    with open(log_path, "w") as log:
        try:
            subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return dict(status="timed out", error=f"stopped after {timeout:.0f} s, at the budget's end")
    if row_path.is_file():
        return json.loads(row_path.read_text())
    lines = log_path.read_text().strip().splitlines()
    return dict(status="failed", error=lines[-1] if lines else "the stage's process ended without a word")


def write_json(path: Path, value: dict) -> None:
    """Written whole or not at all: a run stopped mid-write leaves the previous report."""
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(value, indent=1))
    os.replace(partial, path)


def format_row(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['stage']:<9} {row['status']}: {row.get('reason') or row.get('error')}"
    split, difference = row["ms_split"], row["max_token_difference_vs_eager"]
    return (f"{row['stage']:<9} {row['seconds_per_image']:8.2f} s/image  {row['ms_per_token']:7.2f} ms/token "
            f"(step {split['token_step']:.2f}, backbone alone {split['backbone_alone']:.2f}; prefill "
            f"{split['prefill']:.0f} ms, decode {split['final_decode']:.0f} ms)  peak {row['peak_memory_mb']:.0f} MB  "
            f"warm-up {row['warm_up_seconds']:.0f} s  vs eager {'-' if difference is None else f'{difference:.1e}'}"
            f"  [{row['device_name']}, {row['size']}, {row['rows']} rows]")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m nextstep.tools.acceptance",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="nextstep-1-large",
                        help="random weights of this shape [default: nextstep-1-large]")
    parser.add_argument("--model", help="a model directory or Hub id instead of random weights")
    parser.add_argument("--vae", help="the VAE, for a --model that names none")
    parser.add_argument("--device", help="[default: cuda where available]")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                        help="[default: bfloat16 on a GPU, float32 on the CPU]")
    parser.add_argument("--stages", type=lambda text: text.split(","), default=list(STAGES),
                        help=f"comma-separated, in this order [default: {','.join(STAGES)}]")
    parser.add_argument("--budget-seconds", type=float, default=450,
                        help="stop the stage running at this many seconds after the start [default: 450]")
    parser.add_argument("--out", type=Path, default=Path("acceptance"),
                        help="the folder for the report, each stage's log and the eager tokens")
    parser.add_argument("--dry-run", action="store_true",
                        help="the same stages on the CPU at --config tiny, 32x32, 4 steps (what the tests run)")
    parser.add_argument("--stage", choices=list(STAGES), help=argparse.SUPPRESS)  # a stage's own process
    add_setting_flags(parser)
    args = parser.parse_args(argv)
    unknown = set(args.stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages {', '.join(sorted(unknown))}: choose from {', '.join(STAGES)}")
    if args.dry_run:
        args.config, args.device, args.model = "tiny", "cpu", None
    small = dict(size="32x32", num_sampling_steps="4") if args.dry_run else {}
    for name, value in dict(dict(size="256x256", num_sampling_steps="50", cfg="7.5"), **small).items():
        setattr(args, name, getattr(args, name) or value)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage:
        return stage_main(args)
    run_all(args, argv)
    print(f"report: {args.out / REPORT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
