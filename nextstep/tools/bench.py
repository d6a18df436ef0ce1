"""``python -m nextstep.tools.bench``: how fast one image is generated, and where the time goes.

Generates with a model directory (``--model``) or a named random configuration (``--config``:
speed does not depend on the weights' values) and reports seconds per image, milliseconds per
image token split into the token step (backbone and flow head; the backbone's share timed
apart) and preview decoding, the final VAE decode, time to first preview, preview overhead (previews on versus off, same run) and peak
memory, and the bytes a token reads with the time they would take on a GPU. ``--compare-baseline``
also times a plain loop (KV cache grown per token, the flow head evaluated from scratch at every
step, tokens gathered in a list) and reports the speedup. ``--schemes`` compares the weight
quantizations (``nextstep.models.quantize``) on the same requests: speed, bytes and quality.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image

from ..engine.core import Hooks, Run
from ..engine.families import detect_family, get_family
from ..engine.preview import PREVIEW_MODES, PreviewWorker
from ..engine.prompts import BEGIN_OF_IMAGE, END_OF_IMAGE, IMAGE_PLACEHOLDER
from ..engine.sampling import sample_token
from ..engine.settings import GenerationRequest, add_setting_flags, given_settings
from ..engine.sizes import Size
from ..engine.token_loop import decode_step
from ..engine.vocab import build_tokenizer
from ..loading.devices import pick_dtype, set_threads
from ..loading.hub import CONFIG_FILES, resolve_directory
from ..loading.memory import Workload, one_request, plan, prompt_tokens
from ..loading.options import add_runtime_flags, runtime_options
from ..loading.traffic import H100_BANDWIDTH, TokenTraffic, token_traffic, workload_traffic
from ..models.backbone import DecoderLayer, attention_mask, flash_attn_module
from ..models.config import NextStepConfig
from ..models.model import NextStepModel
from ..models.quantize import QUANTIZATIONS, SCHEMES, fits, supported
from ..models.tokens import normalize_tokens
from ..models.vae import AutoencoderKL, VAEConfig
from ..pipeline import NextStepPipeline
from ..serving.scheduler import Scheduler
from ..serving.service import FRAME_INTERVAL

PROMPT = "a large red circle in the top left corner of a blue background, high quality"
NEGATIVE = "blurry, low quality"
INSTRUCTION = "make the circle green"  # with --edit, of a synthetic picture (``edit_input``)
# --schemes' quality prompts (in the random configurations' vocabulary), each with its own seed.
QUALITY_PROMPTS = (PROMPT, "a green circle in the top left corner of a red background",
                   "a large blue circle in the corner of a green background")
_BACKBONE_BASE = dict(
    attention_bias=True, o_attention_bias=False, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=8192
)
CONFIGS = {
    "tiny": (
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, fm_head_dim=32, fm_head_layers=2),
        VAEConfig(ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=1),
    ),
    "small": (
        dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
             intermediate_size=768, fm_head_dim=256, fm_head_layers=3),
        VAEConfig(ch=32, ch_mult=[1, 1, 2, 2], num_res_blocks=1),
    ),
    # Qwen2.5-14B-shaped backbone, 1536 x 12 flow head and the release VAE, as NextStep-1-Large.
    "nextstep-1-large": (
        dict(hidden_size=5120, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
             intermediate_size=13824, fm_head_dim=1536, fm_head_layers=12, vocab_size=152064),
        VAEConfig(),
    ),
}


def random_config(name: str) -> tuple[NextStepConfig, VAEConfig, object]:
    """The named shape's model and VAE configs, and a small word-level tokenizer for the bench's prompts."""
    backbone, vae_config = CONFIGS[name]
    tokenizer = build_tokenizer(sorted(set(f"{PROMPT} {NEGATIVE} {INSTRUCTION}".replace(",", " ").split())))
    config = NextStepConfig(
        **_BACKBONE_BASE,
        **dict(backbone, vocab_size=max(backbone.get("vocab_size", 0), len(tokenizer))),
        boi=tokenizer.convert_tokens_to_ids(BEGIN_OF_IMAGE),
        eoi=tokenizer.convert_tokens_to_ids(END_OF_IMAGE),
        image_placeholder_id=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
        pad_token_id=tokenizer.pad_token_id,
    )
    return config, vae_config, tokenizer


def random_pipeline(name: str, device: str, dtype: torch.dtype, quantize: str | None = None) -> NextStepPipeline:
    """A pipeline of the named shape with random weights (the same ones every time: ``--schemes``
    compares pictures) and a small word-level tokenizer."""
    config, vae_config, tokenizer = random_config(name)
    model = NextStepModel.with_random_weights(config, device, dtype)
    if quantize:
        model.quantize_weights(quantize)
    with torch.device("meta"):
        vae = AutoencoderKL(vae_config).to(dtype)
    vae.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    for parameter in vae.parameters():
        parameter.data.normal_(0.0, 0.02, generator=generator)
    return NextStepPipeline(model, vae.eval(), tokenizer, name=f"random {name}")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer(Hooks):
    """The engine's hooks, adding up wall time per phase; synchronises the GPU around each phase."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = defaultdict(float)

    @contextmanager
    def timed(self, phase: str):
        _synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            _synchronize(self.device)
            self.seconds[phase] += time.perf_counter() - start


def timed_phases(pipe: NextStepPipeline, work: tuple, settings: dict, preview: str,
                 preview_every: int) -> tuple[PhaseTimer, PreviewWorker]:
    """One generation of ``work`` (prompt, input image or None) through the engine with a
    ``PhaseTimer`` (its synchronisation makes it for the split only), and the preview worker
    that decoded its previews (with their count and time)."""
    engine, timer = pipe.engine, PhaseTimer(pipe.device)
    previews = PreviewWorker(engine.previewer, engine.device)
    run = Run(engine.request(*work, **settings), None, _Discard(), preview, preview_every)
    run.job = engine.prepare(run.request)
    for _ in engine.decode([run], timer, previews):
        pass
    engine.finish(run, timer)
    previews.wait_idle()
    return timer, previews


class _Discard:
    """A sink that keeps nothing: the split needs only the timer."""

    def should_stop(self) -> bool:
        return False

    def wants_progress(self) -> bool:
        return False

    def progress(self, event) -> None:
        pass

    def dropped(self) -> None:
        pass


@torch.inference_mode()
def backbone_step_seconds(pipe: NextStepPipeline, rows: int, context: int, repeat: int = 20) -> float:
    """Seconds of one backbone decode step for ``rows`` rows after ``context`` cached slots, timed
    apart from the token loop (the loop's step runs backbone and flow head together)."""
    model, device = pipe.model, pipe.device
    cache = model.new_cache(rows, context + 1)
    cache.key_valid[:, :context] = True
    embed = torch.zeros(rows, 1, model.config.hidden_size, device=device, dtype=model.dtype)
    slot = torch.tensor([context], device=device)
    valid = torch.ones(rows, 1, dtype=torch.bool, device=device)
    model.forward_backbone(embed, slot, valid, cache)  # warm-up
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(repeat):
        model.forward_backbone(embed, slot, valid, cache)
    _synchronize(device)
    return (time.perf_counter() - start) / repeat


def edit_input(size: Size) -> Image.Image:
    """A smooth synthetic picture to edit (speed does not depend on what it shows)."""
    ramp = Image.linear_gradient("L").resize((size.width, size.height))
    return Image.merge("RGB", (ramp, ramp.transpose(Image.Transpose.ROTATE_90), ramp.transpose(Image.Transpose.FLIP_TOP_BOTTOM)))


def timed_generation(pipe: NextStepPipeline, work: tuple, settings: dict, preview: str, preview_every: int) -> dict:
    _synchronize(pipe.device)
    start = time.perf_counter()
    first_preview = None
    for event in pipe.stream(*work, preview=preview, preview_every=preview_every, **settings):
        if event.preview is not None and first_preview is None:
            first_preview = time.perf_counter() - start
        if event.result is not None:
            result = event.result
    _synchronize(pipe.device)
    return dict(seconds=time.perf_counter() - start, first_preview=first_preview, result=result)


def paired(timed: Callable, preview: str, repeat: int) -> list[tuple]:
    """``repeat`` pairs (``timed("none")``, ``timed(preview)``), the one with previews first in every other."""
    pairs = []
    for index in range(repeat):
        if index % 2:
            on = timed(preview)
            pairs.append((timed("none"), on))
        else:
            pairs.append((timed("none"), timed(preview)))
    return pairs


def timed_on_page(scheduler: Scheduler, work: tuple, settings: dict, preview: str, preview_every: int) -> float:
    """Seconds to the result of one request through the scheduler, as the page runs it (previews
    decoded beside the token loop, at most one per frame the page sends)."""
    _synchronize(scheduler.engine.device)
    start = time.perf_counter()
    for _ in scheduler.submit(*work, preview=preview, preview_every=preview_every, **settings):
        pass
    return time.perf_counter() - start


class GrowingKVCache:
    """The plain loop's cache: keys and values concatenated one token at a time."""

    flash = None  # the plain loop attends with SDPA

    def __init__(self, layers: int):
        self.keys: list[torch.Tensor | None] = [None] * layers
        self.values: list[torch.Tensor | None] = [None] * layers
        self.key_valid: torch.Tensor | None = None

    def mark(self, slots: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        self.key_valid = valid if self.key_valid is None else torch.cat([self.key_valid, valid], dim=1)
        key_slots = torch.arange(self.key_valid.shape[1], device=valid.device)
        return attention_mask(slots, key_slots, self.key_valid)

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


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def bench_pipeline(args, quantize: str | None) -> NextStepPipeline:
    """The model the flags name (``--model``), or random weights of ``--config``'s shape."""
    dtype = pick_dtype(args.dtype, args.device)
    if args.model:
        return NextStepPipeline.from_pretrained(args.model, vae=args.vae, device=args.device, dtype=dtype,
                                                quantize=quantize)
    return random_pipeline(args.config, args.device, dtype, quantize)


def run(args) -> dict:
    pipe = bench_pipeline(args, args.quantize)
    if args.compile:
        pipe.compile()
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
        preview_every=args.preview_every, threads=torch.get_num_threads(), compiled=args.compile,
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
            _synchronize(pipe.device)
            start = time.perf_counter()
            baseline_tokens = plain_generate(pipe, request)
            _synchronize(pipe.device)
            baseline_seconds = min(baseline_seconds, time.perf_counter() - start)
        # The plain loop stops at the tokens; the final decode is the same work in both.
        report["baseline_seconds_per_image"] = baseline_seconds + split["finish"]
        report["speedup_over_baseline"] = report["baseline_seconds_per_image"] / plain["seconds"]
        report["baseline_max_token_difference"] = (baseline_tokens - plain["result"].tokens).abs().max().item()
    report.update(traffic_fields(pipe, args, prompt_rows.shape[0], prompt_rows.shape[1] + tokens // 2,
                                 request.num_sampling_steps, tokens))
    report["peak_memory_mb"] = peak_memory_mb(pipe.device)
    return report


def traffic_fields(pipe: NextStepPipeline, args, rows: int, context: int, steps: int, tokens: int) -> dict:
    """The bytes a token read here, and what the same model reads on a GPU in bfloat16 with the
    seconds per image those bytes take at ``--bandwidth`` at least, eager and compiled (int8
    converts its weights per call in eager mode off the CPU; compiled, counted as fused)."""
    config, quantize = pipe.model.config, pipe.model.quantization  # a stored checkpoint's: counted from its config

    def traffic(dtype: torch.dtype, converts: bool) -> TokenTraffic:
        return token_traffic(config, dtype, quantize, rows, context, steps, converts)

    here = traffic(pipe.model.dtype, pipe.device.type != "cpu" and not args.compile)
    eager, compiled = traffic(torch.bfloat16, True), traffic(torch.bfloat16, False)
    bandwidth = args.bandwidth * 1e9
    return dict(traffic=here.to_dict(), mb_per_token=here.total / 1e6, gpu_mb_per_token=eager.total / 1e6,
                gpu_bandwidth_gb_s=args.bandwidth, gpu_seconds_per_image=tokens * eager.seconds(bandwidth),
                gpu_seconds_per_image_compiled=tokens * compiled.seconds(bandwidth))


def format_traffic(report: dict) -> str:
    return (f"bytes per token     {report['mb_per_token']:,.2f} MB here; in bfloat16 on a GPU "
            f"{report['gpu_mb_per_token']:,.2f} MB: at least {report['gpu_seconds_per_image']:.3g} s per image at "
            f"{report['gpu_bandwidth_gb_s']:,.0f} GB/s ({report['gpu_seconds_per_image_compiled']:.3g} s compiled)")


def format_table(report: dict) -> str:
    split = report["ms_per_token_split"]
    first, decode_ms = report["first_preview_seconds"], report["preview_decode_ms"]
    lines = [
        f"model               {report['model']}  ({report['device']}, {report['dtype']}"
        f"{', weights ' + report['quantize'] if report['quantize'] else ''}, {report['threads']} threads"
        f"{', compiled' if report['compiled'] else ''})",
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nextstep.tools.bench", description=__doc__.split("\n\n")[0])
    add_runtime_flags(parser, embedded_default=False, edit=False)
    parser.add_argument("--config", choices=sorted(CONFIGS),
                        help="random weights of this shape, instead of --model [default: tiny]")
    add_setting_flags(parser)
    parser.add_argument("--preview", choices=list(PREVIEW_MODES), default="fast")
    parser.add_argument("--preview-every", type=int, default=8)
    parser.add_argument("--edit", action="store_true", help="an edit of a synthetic picture (3 guidance rows)")
    parser.add_argument("--acceptance", action="store_true",
                        help="the GPU acceptance run: text-to-image and edit, eager and compiled, SDPA and "
                             "flash-attn (if installed), unquantized and with --quantize (int8 by default)")
    parser.add_argument("--fairness", action="store_true",
                        help="how long a 1-image request takes alone and batched with a 4-image one that "
                             "wants exact previews every token, on the page's scheduler")
    parser.add_argument("--plan", action="store_true",
                        help="print the memory plan for the request instead (nothing is allocated)")
    parser.add_argument("--compare-baseline", action="store_true", help="also time the plain loop")
    parser.add_argument("--schemes", action="store_true",
                        help="each weight quantization the device runs, unquantized first, on the same requests: "
                             "seconds per image, bytes per token and the GPU time they imply, and the largest "
                             "token difference and image PSNR against unquantized over three prompts (with "
                             "--plan: each one's memory plan and bytes, nothing allocated)")
    parser.add_argument("--kernels", action="store_true",
                        help="the backbone's matrix products alone, at the model's shapes (one decoder layer's "
                             "linears, random weights), for each weight quantization the device runs: ms per "
                             "token for all layers and the GB/s of weights read (with --compile: compiled)")
    parser.add_argument("--bandwidth", type=float, default=H100_BANDWIDTH / 1e9,
                        help="GPU memory bandwidth in GB/s for the time the bytes per token imply "
                             "[default: an H100 SXM's 3350]")
    parser.add_argument("--repeat", type=int, default=5,
                        help="time each variant this many times, keep the best (previews off and on: in "
                             "pairs, the median of their ratios)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    if args.model and args.config:
        parser.error("--model and --config name two models: give one")
    args.config = args.config or "tiny"
    options = runtime_options(args)
    args.device, args.dtype = options.torch_device, str(options.torch_dtype).removeprefix("torch.")
    set_threads(args.device, args.threads)
    if args.plan:
        plans = [plan_of(args, quantize) for quantize in (scheme_choices(args) if args.schemes else [args.quantize])]
        print(json.dumps(plans if args.schemes else plans[0]) if args.json else "\n".join(format_plan(p) for p in plans))
        return 0
    if args.kernels:
        report = kernels(args)
        print(json.dumps(report) if args.json else format_kernels(report))
        return 0
    if args.schemes:
        report = schemes(args)
        print(json.dumps(report) if args.json else format_schemes(report))
        return 0
    if args.acceptance:
        report = acceptance(args)
        print(json.dumps(report) if args.json else format_acceptance(report))
        return 0
    if args.fairness:
        report = fairness(args)
        print(json.dumps(report) if args.json else format_fairness(report))
        return 0
    report = run(args)
    print(json.dumps(report) if args.json else format_table(report))
    return 0


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


def acceptance(args) -> dict:
    """The GPU acceptance run: text-to-image and edit, each eager and with the compiled step
    (captured as a CUDA graph on CUDA), with SDPA and, where installed, flash-attn, unquantized and
    with ``--quantize`` (int8 by default): seconds per image, ms per token, first preview, peak
    memory, and each compiled run's largest token difference from the eager one with the same settings."""
    quantizations = [None, args.quantize or "int8"]
    rows = []
    for quantize in quantizations:
        pipe = bench_pipeline(args, quantize)
        engine = pipe.engine
        settings = dict(dict(negative_prompt=NEGATIVE, seed=0), **given_settings(args))
        size = engine.request(PROMPT, **settings).size
        attentions = ["sdpa"] + (["flash"] if flash_attn_module(pipe.device, pipe.model.dtype) else [])
        for work in ((PROMPT, None), (INSTRUCTION, edit_input(size))):
            request = engine.request(*work, **settings)
            tokens = request.tokens
            for attention in attentions:
                pipe.model.use_flash_attention = attention == "flash"
                eager = None
                for variant in ("eager", "compiled"):
                    engine.step, engine.cuda_graph = decode_step, False
                    if variant == "compiled":
                        engine.compile(cuda_graph=pipe.device.type == "cuda")
                    _synchronize(pipe.device)
                    warm_start = time.perf_counter()
                    timed_generation(pipe, work, settings, args.preview, args.preview_every)  # compiles, captures
                    warm_up = time.perf_counter() - warm_start
                    if pipe.device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(pipe.device)
                    timing = timed_generation(pipe, work, settings, args.preview, args.preview_every)
                    tokens_out = timing["result"].tokens
                    eager = tokens_out if variant == "eager" else eager
                    rows.append(dict(
                        work="edit" if work[1] is not None else "text_to_image", rows=request.rows, quantize=quantize,
                        attention=attention, variant=variant, seconds_per_image=timing["seconds"],
                        ms_per_token=1000 * timing["seconds"] / tokens, first_preview_seconds=timing["first_preview"],
                        warm_up_seconds=warm_up, peak_memory_mb=peak_memory_mb(pipe.device),
                        max_token_difference_vs_eager=(tokens_out - eager).abs().max().item(),
                    ))
        del pipe, engine
    return dict(model=args.model or f"random {args.config}", device=args.device, dtype=args.dtype, size=size.value,
                num_sampling_steps=request.num_sampling_steps, cfg=request.cfg, preview=args.preview, runs=rows)


def format_acceptance(report: dict) -> str:
    lines = [f"{report['model']} on {report['device']} ({report['dtype']}), {report['size']}, "
             f"{report['num_sampling_steps']} steps, cfg {report['cfg']}, previews {report['preview']}",
             "work           rows  weights  attention  variant    s/image  ms/token  1st preview  warm-up  "
             "peak MB  max diff vs eager"]
    for row in report["runs"]:
        first = row["first_preview_seconds"]
        lines.append(
            f"{row['work']:<14} {row['rows']:>4}  {row['quantize'] or 'none':<7}  {row['attention']:<9}  "
            f"{row['variant']:<9} {row['seconds_per_image']:>8.3f}  {row['ms_per_token']:>8.2f}  "
            f"{'-' if first is None else f'{first:.3f} s':>11}  {row['warm_up_seconds']:>6.1f}s  "
            f"{row['peak_memory_mb']:>7.0f}  {row['max_token_difference_vs_eager']:.1e}"
        )
    return "\n".join(lines)


def plan_of(args, quantize: str | None) -> dict:
    """The memory plan of the bench's request under ``quantize``, from configs alone, with the bytes a
    token reads on the plan's device and the seconds per image they imply at ``--bandwidth``."""
    dtype = pick_dtype(args.dtype, args.device)
    if args.model:
        config = NextStepConfig.from_pretrained(resolve_directory(args.model, "model", files=CONFIG_FILES))
        vae_config, name = None, args.model
    else:
        config, vae_config, _ = random_config(args.config)
        name = args.config
    default = one_request(config, vae_config)
    size = Size.parse(args.size) if args.size else default.size
    images = int(args.num_images or 1)
    workload = Workload.edit(size, images) if args.edit else Workload.text_to_image(size, images)
    memory = plan(config, vae_config, dtype, quantize, args.device, workload, name=name)
    steps = int(args.num_sampling_steps or get_family(detect_family(config)).defaults["num_sampling_steps"])
    converts = torch.device(args.device).type != "cpu" and not args.compile
    traffic = workload_traffic(config, vae_config or VAEConfig(), dtype, quantize, workload, steps, converts)
    tokens = prompt_tokens(config, vae_config or VAEConfig(), workload)[1]
    return dict(memory.to_dict(), plan=memory.describe(), traffic=traffic.to_dict(), sampling_steps=steps,
                gpu_bandwidth_gb_s=args.bandwidth, seconds_per_image_from_bytes=tokens * traffic.seconds(args.bandwidth * 1e9))


def format_plan(report: dict) -> str:
    traffic = report["traffic"]
    return (f"{report['plan']}\n  {traffic['total_mb']:,.1f} MB read per token (backbone {traffic['backbone_mb']:,.1f} + "
            f"flow head {traffic['head_mb']:,.1f} at {report['sampling_steps']} steps + KV cache "
            f"{traffic['kv_cache_mb']:,.1f}): at least {report['seconds_per_image_from_bytes']:.3g} s per image at "
            f"{report['gpu_bandwidth_gb_s']:,.0f} GB/s")


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
                threads=torch.get_num_threads(), compiled=args.compile, runs=rows)


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

        step = torch.compile(products) if args.compile else products
        step()  # warm-up (and compile)
        best = math.inf
        for _ in range(args.repeat):
            _synchronize(device)
            start = time.perf_counter()
            step()
            _synchronize(device)
            best = min(best, time.perf_counter() - start)
        weights = sum(t.numel() * t.element_size() for layer in layers for t in (*layer.parameters(), *layer.buffers()))
        runs.append(dict(quantize=quantize or "none", ms_per_token=1000 * best * config.num_hidden_layers,
                         mb_per_layer=weights / 1e6, gb_per_second=weights / best / 1e9))
        del layers
    return dict(model=args.model or f"random {args.config}", device=str(device), dtype=str(dtype).removeprefix("torch."),
                rows=rows, layers=config.num_hidden_layers, threads=torch.get_num_threads(), compiled=args.compile,
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


if __name__ == "__main__":
    sys.exit(main())
