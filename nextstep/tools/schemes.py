"""The weight quantizations compared (the bench's ``--schemes`` and ``--kernels``): speed, the bytes a
token reads and the GPU time they imply, and quality against unquantized weights."""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from PIL import Image

from ..engine.settings import given_settings
from ..loading.devices import pick_dtype
from ..loading.hub import CONFIG_FILES, resolve_directory
from ..loading.traffic import TokenTraffic, token_traffic
from ..models.backbone import DecoderLayer
from ..models.config import NextStepConfig
from ..models.quantize import QUANTIZATIONS, SCHEMES, fits, supported
from ..pipeline import NextStepPipeline
from .shapes import NEGATIVE, PROMPT, random_config
from .timing import bench_pipeline, synchronize, timed_generation

# The quality prompts (in the random configurations' vocabulary), each with its own seed.
QUALITY_PROMPTS = (PROMPT, "a green circle in the top left corner of a red background",
                   "a large blue circle in the corner of a green background")


def step_compiled(args) -> bool:
    """Whether the bench's step is compiled (int8's conversion then counts as fused)."""
    return args.step in ("compiled", "background")


def traffic_fields(pipe: NextStepPipeline, args, rows: int, context: int, steps: int, tokens: int) -> dict:
    """The bytes a token read here, and what the same model reads on a GPU in bfloat16 with the
    seconds per image those bytes take at ``--bandwidth`` at least, eager and compiled (int8
    converts its weights per call in eager mode off the CPU; compiled, counted as fused)."""
    config, quantize = pipe.model.config, pipe.model.quantization  # a stored checkpoint's: counted from its config

    def traffic(dtype: torch.dtype, converts: bool) -> TokenTraffic:
        return token_traffic(config, dtype, quantize, rows, context, steps, converts)

    here = traffic(pipe.model.dtype, pipe.device.type != "cpu" and not step_compiled(args))
    eager, fused = traffic(torch.bfloat16, True), traffic(torch.bfloat16, False)
    bandwidth = args.bandwidth * 1e9
    return dict(traffic=here.to_dict(), mb_per_token=here.total / 1e6, gpu_mb_per_token=eager.total / 1e6,
                gpu_bandwidth_gb_s=args.bandwidth, gpu_seconds_per_image=tokens * eager.seconds(bandwidth),
                gpu_seconds_per_image_compiled=tokens * fused.seconds(bandwidth))


def format_traffic(report: dict) -> str:
    return (f"bytes per token     {report['mb_per_token']:,.2f} MB here; in bfloat16 on a GPU "
            f"{report['gpu_mb_per_token']:,.2f} MB: at least {report['gpu_seconds_per_image']:.3g} s per image at "
            f"{report['gpu_bandwidth_gb_s']:,.0f} GB/s ({report['gpu_seconds_per_image_compiled']:.3g} s compiled)")


def scheme_choices(args) -> list[str | None]:
    """Unquantized, then each quantization (to run: those the device runs; a checkpoint stored
    quantized: as stored)."""
    if args.model and not args.kernels and getattr(NextStepConfig.from_pretrained(
            resolve_directory(args.model, "model", files=CONFIG_FILES)), "quantization_config", None):
        return [None]
    return [None] + [q for q in QUANTIZATIONS if args.plan or supported(q, args.device)]


def image_psnr(a: list[Image.Image], b: list[Image.Image]) -> float:
    """PSNR in dB between two lists of pictures of the same size (inf where equal)."""
    mse = float(np.mean([(np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64)) ** 2
                         for x, y in zip(a, b)]))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def schemes(args) -> dict:
    """Each scheme of ``scheme_choices`` on the same model and requests: seconds per image (best of
    ``--repeat``, previews off, the first quality prompt), the bytes a token reads and the GPU time
    they imply (``traffic_fields``), and over ``QUALITY_PROMPTS`` the largest token difference and
    the lowest image PSNR against unquantized."""
    rows, baseline = [], None
    for quantize in scheme_choices(args):
        pipe = bench_pipeline(args, quantize)
        settings = dict(dict(negative_prompt=NEGATIVE), **given_settings(args))
        timed_generation(pipe, (PROMPT, None), dict(settings, seed=0, size=(pipe.engine.down_factor * 2,) * 2),
                         "none", 8)  # warm-up
        results = [pipe.generate(prompt, **dict(settings, seed=seed)) for seed, prompt in enumerate(QUALITY_PROMPTS)]
        best = min(timed_generation(pipe, (PROMPT, None), dict(settings, seed=0), "none", 8)["seconds"]
                   for _ in range(args.repeat))
        request = pipe.engine.request(PROMPT, **dict(settings, seed=0))
        prompt_rows = pipe.engine.prepare(request).input_ids
        row = dict(quantize=pipe.model.quantization or "none", seconds_per_image=best,
                   ms_per_token=1000 * best / request.tokens)
        row.update(traffic_fields(pipe, args, prompt_rows.shape[0], prompt_rows.shape[1] + request.tokens // 2,
                                  request.num_sampling_steps, request.tokens))
        baseline = baseline or results
        row["max_token_difference"] = max((r.tokens - b.tokens).abs().max().item() for r, b in zip(results, baseline))
        row["min_psnr_db"] = min(image_psnr(r.images, b.images) for r, b in zip(results, baseline))
        rows.append(row)
        del pipe
    return dict(model=args.model or f"random {args.config}", device=args.device, dtype=args.dtype,
                size=request.size.value, tokens=request.tokens, num_sampling_steps=request.num_sampling_steps,
                threads=torch.get_num_threads(), compiled=step_compiled(args), runs=rows)


@torch.inference_mode()
def kernels(args) -> dict:
    """One decoder layer's linear layers at the model's shapes, for each scheme of
    ``scheme_choices``: the best of ``--repeat`` times for a token's worth of their products on the
    request's backbone rows (2 with guidance), scaled to all layers, and the weight bytes read per second."""
    if args.model:
        config = NextStepConfig.from_pretrained(resolve_directory(args.model, "model", files=CONFIG_FILES))
    else:
        config = random_config(args.config)[0]
    dtype, device = pick_dtype(args.dtype, args.device), torch.device(args.device)
    rows = int(args.num_images or 1) * (3 if args.edit else 2)
    with torch.device("meta"):
        shapes = [(m.in_features, m.out_features, m.bias is not None)
                  for m in DecoderLayer(config, 0).modules() if isinstance(m, torch.nn.Linear)]
    inputs = {k: torch.randn(rows, k, device=device, dtype=dtype) for k, _, _ in shapes}
    runs = []
    for quantize in scheme_choices(args):
        layers = []
        for k, n, bias in shapes:
            linear = torch.nn.Linear(k, n, bias=bias, device=device, dtype=dtype)
            torch.nn.init.normal_(linear.weight, std=0.02)
            layers.append(SCHEMES[quantize].from_linear(linear) if quantize and fits(quantize, n, k) else linear)

        def products(layers=layers):
            return [layer(inputs[layer.in_features]) for layer in layers]

        step = torch.compile(products) if step_compiled(args) else products
        step()  # warm-up (and compile)
        best = math.inf
        for _ in range(args.repeat):
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            best = min(best, time.perf_counter() - start)
        weights = sum(t.numel() * t.element_size() for layer in layers for t in (*layer.parameters(), *layer.buffers()))
        runs.append(dict(quantize=quantize or "none", ms_per_token=1000 * best * config.num_hidden_layers,
                         mb_per_layer=weights / 1e6, gb_per_second=weights / best / 1e9))
        del layers
    return dict(model=args.model or f"random {args.config}", device=str(device), dtype=str(dtype).removeprefix("torch."),
                rows=rows, layers=config.num_hidden_layers, threads=torch.get_num_threads(), compiled=step_compiled(args),
                runs=runs)


def format_kernels(report: dict) -> str:
    lines = [f"{report['model']}: the backbone's linears on {report['device']} ({report['dtype']}, "
             f"{report['threads']} threads{', compiled' if report['compiled'] else ''}), {report['rows']} rows, "
             f"{report['layers']} layers",
             "weights   ms per token   MB per layer   GB/s"]
    for row in report["runs"]:
        lines.append(f"{row['quantize']:<8} {row['ms_per_token']:>13.2f}  {row['mb_per_layer']:>13.1f}  "
                     f"{row['gb_per_second']:>5.1f}")
    return "\n".join(lines)


def format_schemes(report: dict) -> str:
    lines = [f"{report['model']} on {report['device']} ({report['dtype']}, {report['threads']} threads"
             f"{', compiled' if report['compiled'] else ''}), {report['size']}, {report['tokens']} tokens, "
             f"{report['num_sampling_steps']} steps; GPU: bfloat16 at {report['runs'][0]['gpu_bandwidth_gb_s']:,.0f} GB/s",
             "weights                                    s/image  ms/token  MB/token  GPU MB/token  GPU s/image "
             "(compiled)  max token diff  min PSNR dB"]
    for row in report["runs"]:
        lines.append(
            f"{row['quantize']:<42} {row['seconds_per_image']:>7.3f}  {row['ms_per_token']:>8.2f}  "
            f"{row['mb_per_token']:>8.2f}  {row['gpu_mb_per_token']:>12.2f}  {row['gpu_seconds_per_image']:>11.3g} "
            f"{row['gpu_seconds_per_image_compiled']:>10.3g}  {row['max_token_difference']:>14.3g}  "
            f"{row['min_psnr_db']:>11.1f}")
    return "\n".join(lines)
