"""``python -m nextstep.tools.bench``: how fast one image is generated, and where the time goes.

Generates with a model directory (``--model``) or a named random configuration (``--config``:
speed does not depend on the weights' values) and reports seconds per image, milliseconds per
image token split into the token step (backbone and flow head; the backbone's share timed
apart) and preview decoding, the final VAE decode, time to first preview, preview overhead
(previews on versus off, same run), peak memory, and the bytes a token reads with the time they
would take on a GPU. ``--compare-baseline`` also times a plain loop (KV cache grown per token, the
flow head evaluated from scratch at every step, tokens gathered in a list) and reports the
speedup; ``--schemes`` and ``--kernels`` compare the weight quantizations (``tools.schemes``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable

import torch

from ..engine.preview import PREVIEW_MODES
from ..engine.sampling import sample_token
from ..engine.settings import GenerationRequest, add_setting_flags, given_settings
from ..loading.devices import pick_dtype, set_threads
from ..loading.options import add_runtime_flags, runtime_options
from ..loading.traffic import H100_BANDWIDTH
from ..models.attention import AttentionPlan, attention_mask
from ..models.tokens import normalize_tokens
from ..pipeline import NextStepPipeline
from ..serving.scheduler import Scheduler
from ..serving.service import FRAME_INTERVAL
from .plan import count_report, format_count, format_plan, plan_report
from .schemes import (
    format_kernels,
    format_schemes,
    format_traffic,
    kernels,
    scheme_choices,
    schemes,
    traffic_fields,
)
from .shapes import (
    CONFIGS,
    INSTRUCTION,
    NEGATIVE,
    PROMPT,
)
from .timing import (
    backbone_step_seconds,
    bench_pipeline,
    edit_input,
    paired,
    peak_memory_mb,
    synchronize,
    timed_generation,
    timed_on_page,
    timed_phases,
)


class GrowingKVCache:
    """The plain loop's cache: keys and values concatenated one token at a time."""


    def __init__(self, layers: int):
        self.keys: list[torch.Tensor | None] = [None] * layers
        self.values: list[torch.Tensor | None] = [None] * layers
        self.key_valid: torch.Tensor | None = None

    def plan(self, slots: torch.Tensor, valid: torch.Tensor, prompt_valid=None) -> AttentionPlan:
        self.key_valid = valid if self.key_valid is None else torch.cat([self.key_valid, valid], dim=1)
        key_slots = torch.arange(self.key_valid.shape[1], device=valid.device)
        return AttentionPlan(mask=attention_mask(slots, key_slots, self.key_valid))  # SDPA, as plain as it gets

    def update(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        if self.keys[layer] is None:
            self.keys[layer], self.values[layer] = k, v
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)
            self.values[layer] = torch.cat([self.values[layer], v], dim=2)
        return self.keys[layer], self.values[layer]


@torch.inference_mode()
def plain_generate(pipe: NextStepPipeline, request: GenerationRequest) -> torch.Tensor:
    """The baseline token loop: same prompt rows and noise as the pipeline (for a complete
    request, ``Engine.request``), none of its speedups. Returns the tokens (images, N, token_dim)."""
    job = pipe.engine.prepare(request)
    model = pipe.model
    cache = GrowingKVCache(model.config.num_hidden_layers)
    embeds = model.embed(job.input_ids.to(pipe.device), job.image_latents)
    length = embeds.shape[1]
    hidden = model.forward_backbone(
        embeds, torch.arange(length, device=pipe.device), job.attention_mask.to(pipe.device).bool(), cache
    )[:, -1]
    tokens = []
    times = job.times
    for k in range(job.total):
        cond = model.condition(hidden, k if pipe.engine.uses_position_table else None)

        def velocity_at(x, i, cond=cond):
            return model.image_head(x.to(model.dtype), times[i].expand(cond.shape[0]), cond).float()

        x = sample_token(job.sampler, velocity_at, job.head_noise[k], times, job.branches, job.cfg[k], job.cfg_img[k])
        if job.use_norm:
            x = normalize_tokens(x)
        tokens.append(x)
        embed = model.image_in_projector(x.to(model.dtype)).repeat(job.branches, 1)[:, None]
        valid = torch.ones(embed.shape[0], 1, dtype=torch.bool, device=pipe.device)
        hidden = model.forward_backbone(embed, torch.tensor([length + k], device=pipe.device), valid, cache)[:, -1]
    return torch.stack(tokens, dim=1).float().cpu()


def run(args) -> dict:
    pipe = bench_pipeline(args, args.quantize)
    pipe.compile(args.step)
    # The model's defaults (as the page and the CLI start from), then the flags.
    settings = dict(dict(negative_prompt=NEGATIVE, seed=0), **given_settings(args))
    size = pipe.engine.request(PROMPT, **settings).size
    work = (INSTRUCTION, edit_input(size)) if args.edit else (PROMPT, None)
    request = pipe.engine.request(*work, **settings)  # the complete request, to report
    tokens = request.tokens

    # Warm-up, with previews: the first fast preview fits its latent-to-RGB map once per VAE.
    timed_generation(pipe, work, dict(settings, size=(pipe.engine.down_factor * 2,) * 2), args.preview, 1)
    # Previews off and on in pairs, --repeat of them, which goes first alternating, so that neither
    # a busy moment of the machine nor the order lands on one side of the comparison only.
    runs = paired(lambda preview: timed_generation(pipe, work, settings, preview, args.preview_every),
                  args.preview, args.repeat)
    plain = min((off for off, _ in runs), key=lambda timing: timing["seconds"])
    with_previews = min((on for _, on in runs), key=lambda timing: timing["seconds"])
    scheduler = Scheduler(pipe.engine, gather_seconds=0.0, preview_interval=FRAME_INTERVAL)
    try:
        page = paired(lambda preview: timed_on_page(scheduler, work, settings, preview, args.preview_every),
                      args.preview, args.repeat)
    finally:
        scheduler.close()
    timer, previews = timed_phases(pipe, work, settings, args.preview, args.preview_every)
    split = timer.seconds
    prompt_rows = pipe.engine.prepare(request).input_ids  # (branches * images, prompt length)
    backbone = backbone_step_seconds(pipe, prompt_rows.shape[0], prompt_rows.shape[1] + tokens // 2)
    report = dict(
        model=pipe.name, device=str(pipe.device), dtype=args.dtype, quantize=pipe.model.quantization, edit=args.edit,
        rows=prompt_rows.shape[0], size=size.value, tokens=tokens,
        num_sampling_steps=request.num_sampling_steps, cfg=request.cfg, sampler=request.sampler,
        preview=args.preview,
        preview_every=args.preview_every, threads=torch.get_num_threads(), step=args.step,
        seconds_per_image=plain["seconds"],
        seconds_per_image_with_previews=with_previews["seconds"],
        ms_per_token=1000 * plain["seconds"] / tokens,
        ms_per_token_split=dict(
            token_step=1000 * split["step"] / tokens,
            backbone_alone=1000 * backbone,
        ),
        previews_decoded=previews.decoded,  # of those due, beside the loop: none is waited for
        preview_decode_ms=1000 * previews.decode_seconds / previews.decoded if previews.decoded else None,
        final_decode_ms=1000 * split["finish"],
        first_preview_seconds=with_previews["first_preview"],
        # The median of the pairs' ratios: steadier than a ratio of two bests where runs vary by 5-10 %.
        preview_overhead=statistics.median(on["seconds"] / off["seconds"] for off, on in runs),
        # The page's path: the scheduler, its previews capped at one per frame the page sends.
        seconds_per_image_on_page=min(off for off, _ in page),
        preview_overhead_on_page=statistics.median(on / off for off, on in page),
    )
    if args.compare_baseline:
        baseline_seconds = math.inf
        for _ in range(args.repeat):
            synchronize(pipe.device)
            start = time.perf_counter()
            baseline_tokens = plain_generate(pipe, request)
            synchronize(pipe.device)
            baseline_seconds = min(baseline_seconds, time.perf_counter() - start)
        # The plain loop stops at the tokens; the final decode is the same work in both.
        report["baseline_seconds_per_image"] = baseline_seconds + split["finish"]
        report["speedup_over_baseline"] = report["baseline_seconds_per_image"] / plain["seconds"]
        report["baseline_max_token_difference"] = (baseline_tokens - plain["result"].tokens).abs().max().item()
    report.update(traffic_fields(pipe, args, prompt_rows.shape[0], prompt_rows.shape[1] + tokens // 2,
                                 request.num_sampling_steps, tokens))
    report["peak_memory_mb"] = peak_memory_mb(pipe.device)
    return report


def format_table(report: dict) -> str:
    split = report["ms_per_token_split"]
    first, decode_ms = report["first_preview_seconds"], report["preview_decode_ms"]
    lines = [
        f"model               {report['model']}  ({report['device']}, {report['dtype']}"
        f"{', weights ' + report['quantize'] if report['quantize'] else ''}, {report['threads']} threads"
        f", step {report['step']})",
        f"image               {'edit, ' if report['edit'] else ''}{report['size']}, {report['tokens']} tokens, "
        f"{report['rows']} backbone rows, {report['num_sampling_steps']} steps, cfg {report['cfg']}, "
        f"sampler {report['sampler']}",
        f"seconds per image   {report['seconds_per_image']:.3f}  (previews off)",
        f"ms per token        {report['ms_per_token']:.2f}",
        f"  token step        {split['token_step']:.2f}  (backbone alone, timed apart: "
        f"{split['backbone_alone']:.2f})",
        f"preview decode      {'-' if decode_ms is None else f'{decode_ms:.1f} ms'} each, beside the loop "
        f"({report['previews_decoded']} decoded; {report['preview']} every {report['preview_every']} tokens)",
        f"final VAE decode    {report['final_decode_ms']:.1f} ms",
        f"first preview       {'-' if first is None else f'{first:.3f} s'}",
        f"preview overhead    x{report['preview_overhead']:.3f}  "
        f"({report['seconds_per_image_with_previews']:.3f} s with previews: pipe.stream)",
        f"  on the page       x{report['preview_overhead_on_page']:.3f}  "
        f"(at most one per {FRAME_INTERVAL:g} s frame; {report['seconds_per_image_on_page']:.3f} s without previews)",
    ]
    if "speedup_over_baseline" in report:
        lines.append(
            f"plain loop          {report['baseline_seconds_per_image']:.3f} s per image: "
            f"speedup x{report['speedup_over_baseline']:.2f} (max token difference "
            f"{report['baseline_max_token_difference']:.1e})"
        )
    lines.append(format_traffic(report))
    lines.append(f"peak memory         {report['peak_memory_mb']:.0f} MB")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nextstep.tools.bench", description=__doc__.split("\n\n")[0])
    add_runtime_flags(parser, embedded_default=False, edit=False)
    parser.add_argument("--config", choices=sorted(CONFIGS),
                        help="random weights of this shape, instead of --model [default: tiny]")
    add_setting_flags(parser)
    parser.add_argument("--preview", choices=list(PREVIEW_MODES), default="fast")
    parser.add_argument("--preview-every", type=int, default=8)
    parser.add_argument("--edit", action="store_true", help="an edit of a synthetic picture (3 guidance rows)")
    parser.add_argument("--compare-baseline", action="store_true", help="also time the plain loop")
    reports = parser.add_argument_group("other reports (one at a time)")
    for flag, help_text in REPORT_HELP.items():
        reports.add_argument(flag, action="store_true", help=help_text)
    parser.add_argument("--bandwidth", type=float, default=H100_BANDWIDTH / 1e9,
                        help="GPU memory bandwidth in GB/s for the time the bytes per token imply "
                             "[default: an H100 SXM's 3350]")
    parser.add_argument("--repeat", type=int, default=5,
                        help="time each variant this many times, keep the best (previews off and on: in "
                             "pairs, the median of their ratios)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser


REPORT_HELP = {
    "--plan": "print the memory plan for the request, the bytes a token reads, and what a ZeroGPU task would "
              "reserve for it (nothing is allocated; with --schemes: for each weight quantization)",
    "--count-ops": "print the operations one eager token dispatches, by part, counted on the meta device",
    "--schemes": "each weight quantization the device runs, unquantized first, on the same requests: seconds per "
                 "image, bytes per token and the GPU time they imply, and the largest token difference and image "
                 "PSNR against unquantized over three prompts",
    "--kernels": "the backbone's matrix products alone, at the model's shapes (one decoder layer's linears, random "
                 "weights), for each weight quantization the device runs: ms per token for all layers and the GB/s "
                 "of weights read (with --step compiled: compiled)",
    "--break-even": "whether compiling the step pays here: eager and compiled seconds per image, the compile's cost "
                    "(with the inductor cache as it is) and the images that repay it",
    "--fairness": "how long a 1-image request takes alone and batched with a 4-image one that wants exact "
                  "previews every token, on the page's scheduler",
}


def report_of(args) -> tuple[object, Callable]:
    """The report the flags ask for, and how to print it as text."""
    if args.plan:
        dtype = pick_dtype(args.dtype, args.device)
        plans = [plan_report(args, dtype, quantize)
                 for quantize in (scheme_choices(args) if args.schemes else [args.quantize])]
        return (plans, lambda plans: "\n".join(map(format_plan, plans))) if args.schemes else (plans[0], format_plan)
    for flag, (make, text) in {
        "count_ops": (count_report, format_count), "kernels": (kernels, format_kernels),
        "schemes": (schemes, format_schemes), "break_even": (break_even, format_break_even),
        "fairness": (fairness, format_fairness),
    }.items():
        if getattr(args, flag):
            return make(args), text
    return run(args), format_table


def main(argv: list[str] | None = None) -> int:
    flags = parser()
    args = flags.parse_args(argv)
    if args.model and args.config:
        flags.error("--model and --config name two models: give one")
    args.config = args.config or "tiny"
    options = runtime_options(args)
    args.device, args.dtype = options.torch_device, str(options.torch_dtype).removeprefix("torch.")
    # The bench times the step it is told (eager by default); a plan's ZeroGPU reservation is for
    # ZeroGPU's default step, a replayed CUDA graph, unless told eager.
    args.step, args.zero_gpu_graph = ("eager" if options.step == "auto" else options.step), options.step != "eager"
    set_threads(args.device, args.threads)
    report, text = report_of(args)
    print(json.dumps(report) if args.json else text(report))
    return 0


def break_even(args) -> dict:
    """Eager seconds per image (best of ``--repeat``, after a warm-up), then with the compiled step:
    the first generation (the compile included) and the best of ``--repeat``; the compile's cost
    over what it saves per image is the number of images after which it has paid for itself."""
    pipe = bench_pipeline(args, args.quantize)
    settings = dict(dict(negative_prompt=NEGATIVE, seed=0), **given_settings(args))

    def seconds() -> float:
        return timed_generation(pipe, (PROMPT, None), settings, "none", 8)["seconds"]

    seconds()  # warm-up
    eager = min(seconds() for _ in range(args.repeat))
    pipe.compile("compiled")
    first = seconds()
    compiled = min(seconds() for _ in range(args.repeat))
    saving = eager - compiled
    return dict(model=pipe.name, size=pipe.engine.request(PROMPT, **settings).size.value,
                eager_seconds_per_image=eager, compiled_seconds_per_image=compiled,
                compile_seconds=first - compiled, speedup=eager / compiled,
                break_even_images=(first - compiled) / saving if saving > 0 else None)


def format_break_even(report: dict) -> str:
    images = report["break_even_images"]
    return (f"{report['model']}, {report['size']}: eager {report['eager_seconds_per_image']:.3f} s per image, "
            f"compiled {report['compiled_seconds_per_image']:.3f} s (x{report['speedup']:.2f}); the compile took "
            f"{report['compile_seconds']:.1f} s and pays for itself after "
            f"{'no number of' if images is None else f'{images:.0f}'} images")


def fairness(args) -> dict:
    """Seconds to the result of a plain request (1 image, no previews) alone, and submitted right
    after the most expensive one the page allows (4 images, exact previews every token), so both
    share a token loop; median of ``--repeat`` each."""
    pipe = bench_pipeline(args, args.quantize)
    settings = dict(dict(seed=0), **given_settings(args))
    # As the page's, but a request alone never waits for the users of the batch before to come back.
    scheduler = Scheduler(pipe.engine, preview_interval=FRAME_INTERVAL, regather_seconds=0.0)
    try:
        timed_on_page(scheduler, (PROMPT, None), settings, "none", 8)  # warm-up
        alone, beside = [], []
        for _ in range(args.repeat):
            alone.append(timed_on_page(scheduler, (PROMPT, None), settings, "none", 8))
            expensive = scheduler.submit(PROMPT, preview="vae", preview_every=1, **dict(settings, num_images=4))
            beside.append(timed_on_page(scheduler, (PROMPT, None), settings, "none", 8))
            for _ in expensive:
                pass
    finally:
        scheduler.close()
    size = pipe.engine.request(PROMPT, **settings).size.value
    return dict(model=pipe.name, size=size, seconds_alone=statistics.median(alone),
                seconds_beside_expensive=statistics.median(beside),
                factor=statistics.median(beside) / statistics.median(alone))


def format_fairness(report: dict) -> str:
    return (f"{report['model']}, {report['size']}: a 1-image request takes {report['seconds_alone']:.2f} s alone and "
            f"{report['seconds_beside_expensive']:.2f} s beside a 4-image one with exact previews every token: "
            f"x{report['factor']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
