"""What a request needs, counted from configs alone (nothing is allocated): the bench's ``--plan``
(the memory plan, and the seconds a ZeroGPU task would reserve) and ``--count-ops`` (the
operations one eager token dispatches, by part)."""

from __future__ import annotations

import torch
from PIL import Image

from ..engine.families import detect_family, get_family
from ..engine.opcount import count_token_ops
from ..engine.settings import OFFICIAL_EDIT, GenerationRequest, given_settings, resolve
from ..loading.checkpoints import read_vae_config
from ..loading.devices import pick_dtype
from ..loading.hub import CONFIG_FILES, resolve_directory
from ..loading.memory import Workload, one_request, plan, prompt_tokens
from ..loading.traffic import WeightReads
from ..models.config import NextStepConfig
from ..models.model import NextStepModel
from ..serving.reservation import Reservation
from .shapes import random_config

PROMPT = "a picture"


def configs_of(args) -> tuple[NextStepConfig, object, str]:
    """(model config, VAE config, name) of ``--model`` (its configs only) or ``--config``."""
    if args.model:
        directory = resolve_directory(args.model, "model", files=CONFIG_FILES)
        vae = directory / "vae" if (directory / "vae").is_dir() else None
        return NextStepConfig.from_pretrained(directory), read_vae_config(vae), args.model
    config, vae_config, _ = random_config(args.config)
    return config, vae_config, args.config


def request_of(config: NextStepConfig, vae_config, args) -> GenerationRequest:
    """The bench's request, complete: the family's defaults, the official edit ones for ``--edit``,
    the model's native square, then the flags."""
    family = get_family(detect_family(config))
    base = dict(family.defaults, size=one_request(config, vae_config).size, num_images=1, negative_prompt="",
                positive_prompt="")
    values = resolve([base, OFFICIAL_EDIT if args.edit else {}], dict(given_settings(args), seed=0))
    down = vae_config.downsample_factor * config.latent_patch_size
    size = values["size"]
    image = Image.new("RGB", (size.width, size.height)) if args.edit else None
    return GenerationRequest(prompt=PROMPT, image=image, grid=(size.height // down, size.width // down), **values)


def plan_report(args, dtype: torch.dtype, quantize: str | None) -> dict:
    """The memory plan of the request with the weights held as ``quantize`` says (``to_dict``); the
    bytes a token reads on the plan's device (``traffic``) and the seconds per image they take at
    ``--bandwidth`` at least; ``zerogpu_seconds``, what a ZeroGPU task would reserve for it (on
    ZeroGPU's default step, a replayed CUDA graph, unless ``--step eager``), and ``zerogpu_basis``,
    its inputs."""
    config, vae_config, name = configs_of(args)
    request = request_of(config, vae_config, args)
    workload = (Workload.edit if args.edit else Workload.text_to_image)(request.size, request.num_images)
    memory = plan(config, vae_config, dtype, quantize, args.device, workload, name=name)
    # int8 converts its weights at every call on a GPU unless the step is compiled (counted as fused).
    converts = torch.device(args.device).type != "cpu" and args.step not in ("compiled", "background")
    prompt, tokens = prompt_tokens(config, vae_config, workload)
    traffic = WeightReads.of(config, dtype, quantize, converts).token(workload.rows, prompt + tokens // 2,
                                                                        request.num_sampling_steps)
    with torch.device("meta"):
        model = NextStepModel(config).to(dtype)
    model.quantization = quantize  # as it would be held: the reservation counts the weights' bytes from it
    basis = Reservation([model], graph=args.zero_gpu_graph).basis(0, request)
    return dict(memory.to_dict(), describe=memory.describe(), traffic=traffic.to_dict(),
                sampling_steps=request.num_sampling_steps, gpu_bandwidth_gb_s=args.bandwidth,
                seconds_per_image_from_bytes=tokens * traffic.seconds(args.bandwidth * 1e9),
                zerogpu_seconds=basis["seconds"], zerogpu_basis=basis)


def count_report(args) -> dict:
    """Operations one eager token of the request dispatches, by part."""
    dtype = pick_dtype(args.dtype, args.device)
    config, vae_config, name = configs_of(args)
    request = request_of(config, vae_config, args)
    count = count_token_ops(config, request.sampler, request.num_sampling_steps, request.branches,
                            request.num_images, request.use_norm, dtype=dtype)
    return dict(model=name, request=dict(sampler=request.sampler, num_sampling_steps=request.num_sampling_steps,
                                         rows=request.rows), operations=count.to_dict())


def format_plan(report: dict) -> str:
    basis, traffic = report["zerogpu_basis"], report["traffic"]
    return (f"{report['describe']}\n  {traffic['total_mb']:,.1f} MB read per token (backbone "
            f"{traffic['backbone_mb']:,.1f} + flow head {traffic['head_mb']:,.1f} at {report['sampling_steps']} steps + "
            f"KV cache {traffic['kv_cache_mb']:,.1f}): at least {report['seconds_per_image_from_bytes']:.3g} s per image "
            f"at {report['gpu_bandwidth_gb_s']:,.0f} GB/s\n  ZeroGPU reservation: {report['zerogpu_seconds']} s for {basis['tokens']} tokens "
            f"({basis['estimated_seconds_per_token'] * 1000:.1f} ms a token estimated: "
            f"{basis['bytes_per_token'] / 1e9:.1f} GB read, {basis['operations_per_token']} operations; "
            f"{basis['once_seconds']:.0f} s to start; margin x{basis['margin']})")


def format_count(report: dict) -> str:
    request, ops = report["request"], report["operations"]
    return (f"{report['model']}, {request['sampler']} {request['num_sampling_steps']} steps, {request['rows']} rows: "
            f"{ops['total']} operations a token (backbone {ops['backbone']}, flow head {ops['head']}, "
            f"sampler and guidance {ops['sampler']})")
