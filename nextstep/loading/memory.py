"""How much memory a model needs on a device, known from ``config.json`` alone, and an early refusal.

``plan(config, vae, dtype, quantize, device, workload)`` counts, without allocating anything:

* weights: every parameter and buffer of the model built on the meta device (``lm_head`` is never
  built), quantized linear weights at their packed size (a checkpoint stored in 4 bits: the layers
  its ``quantization_config`` names), plus the VAE's;
* the KV cache of one batch: ``layers x rows x kv_heads x slots x head_dim`` keys and values,
  with ``slots`` the prompt and image tokens rounded up as the token loop allocates them;
* the largest transient working set: the prefill of one decoder layer over the whole prompt
  (hidden states, q/k/v, the MLP's intermediate activations, and attention scores as SDPA's math
  fallback materialises them: an upper bound where a fused kernel runs), or the VAE's decode or
  encode at full resolution, whichever is larger;
* a fixed headroom for allocator fragmentation and library workspaces.

``free_memory(device)`` reads what is free now; the ``NEXTSTEP_MEMORY_LIMIT`` environment variable
caps it (``24GiB``, ``80GB``, ``512MiB`` or bytes): to leave room for other programs, or to see
what a smaller card would allow.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..engine.sizes import Size, native_area
from ..engine.token_loop import cache_slots
from ..models.config import NextStepConfig
from ..models.model import NextStepModel
from ..models.quantize import (
    QUANTIZATIONS,
    quantized_linears,
    quantized_weight_bytes,
    supported,
)
from ..models.vae import AutoencoderKL, VAEConfig
from .autoround import StoredInt4, stored_quantization
from .checkpoints import checkpoint_quantization, read_vae_config
from .hub import CONFIG_FILES, resolve_directory

GIB = 2**30
HEADROOM = GIB // 2  # allocator fragmentation, cuBLAS workspaces, kernels loaded on first use
# On a GPU, what the process holds before any tensor: the CUDA context and the libraries' modules
# (cuBLAS, cuDNN, the compiled kernels), 0.5-1.5 GiB by card and library versions.
CUDA_CONTEXT = GIB
MEMORY_LIMIT = "NEXTSTEP_MEMORY_LIMIT"
# Prompt tokens besides the text: "<|image_area|>" + "h*w" + "<|begin_of_image|>" for the output,
# and the same plus "<|end_of_image|>" around an inlined input image.
GRID_MARKER_TOKENS = 8
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


class NotEnoughMemoryError(ValueError):
    """The chosen models and settings need more memory than the device has free."""


@dataclass(frozen=True)
class Workload:
    """One batch of generation at its largest: what the KV cache and the prefill must hold.

    ``branches``: guidance rows per image (1 without guidance, 2 text guidance, 3 an edit with
    image guidance). ``input_image``: the input image's tokens are inlined in the prompt rows.
    ``text_tokens``: the longest prompt row's text (rows are padded to it).
    """

    size: Size = Size(512, 512)
    images: int = 1
    branches: int = 2
    input_image: bool = False
    text_tokens: int = 256

    @classmethod
    def text_to_image(cls, size=Size(512, 512), images: int = 1, guidance: bool = True) -> Workload:
        return cls(Size.parse(size), images, 2 if guidance else 1)

    @classmethod
    def edit(cls, size=Size(512, 512), images: int = 1) -> Workload:
        return cls(Size.parse(size), images, 3, input_image=True)

    @property
    def rows(self) -> int:
        return self.images * self.branches


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes a set of models needs on one device; ``peak_bytes`` is what must be free."""

    device: str
    models: tuple[str, ...]
    dtype: str
    quantize: str | None
    weights_bytes: int  # model parameters and buffers
    vae_bytes: int
    kv_cache_bytes: int
    # The largest transient: a layer's prefill, beside the previous batch's final VAE decode (the
    # scheduler overlaps them).
    working_bytes: int
    # The peak under each quantization this device supports (None: unquantized), to name the options.
    peak_by_quantize: dict = field(default_factory=dict, compare=False)

    @property
    def context_bytes(self) -> int:
        return CUDA_CONTEXT if self.device.startswith("cuda") else 0

    @property
    def peak_bytes(self) -> int:
        return (self.weights_bytes + self.vae_bytes + self.kv_cache_bytes + self.working_bytes + HEADROOM
                + self.context_bytes)

    def fits(self, free_bytes: int) -> bool:
        return self.peak_bytes <= free_bytes

    def check(self, free_bytes: int | None = None) -> None:
        """Raise NotEnoughMemoryError naming the need, the free memory and the options, unless the
        plan fits ``free_bytes`` (None: ``free_memory(self.device)``; unknown there: no check)."""
        free = free_memory(self.device) if free_bytes is None else free_bytes
        if free is not None and not self.fits(free):
            raise NotEnoughMemoryError(self.refusal(free))

    def describe(self) -> str:
        """One line: what the peak is made of (for logs, the CLI and the bench)."""
        setting = self.dtype + (f", weights {self.quantize}" if self.quantize else "")
        return (
            f"{' + '.join(self.models)} on {self.device} ({setting}): weights {_gib(self.weights_bytes)} + "
            f"VAE {_gib(self.vae_bytes)} + KV cache {_gib(self.kv_cache_bytes)} + working set "
            f"{_gib(self.working_bytes)} + headroom {_gib(HEADROOM)}"
            + (f" + CUDA context {_gib(self.context_bytes)}" if self.context_bytes else "")
            + f" = peak {_gib(self.peak_bytes)}"
        )

    def refusal(self, free_bytes: int) -> str:
        options = []
        for choice in QUANTIZATIONS:
            if self.peak_by_quantize.get(choice, self.peak_bytes) < self.peak_bytes:
                options.append(f"--quantize {choice} (needs {_gib(self.peak_by_quantize[choice])})")
        if len(self.models) > 1:
            options.append("a second device for one of the models")
        options.append(
            f"a smaller request (fewer images or a smaller size; the KV cache and working set are "
            f"{_gib(self.kv_cache_bytes + self.working_bytes)} of the need)"
        )
        return (
            f"not enough memory: {self.describe()}, and {_gib(free_bytes)} is free. Options: " + "; ".join(options)
        )

    def to_dict(self) -> dict:
        return {
            "device": self.device,
            "models": list(self.models),
            "dtype": self.dtype,
            "quantize": self.quantize,
            "weights_gib": self.weights_bytes / GIB,
            "vae_gib": self.vae_bytes / GIB,
            "kv_cache_gib": self.kv_cache_bytes / GIB,
            "working_gib": self.working_bytes / GIB,
            "headroom_gib": HEADROOM / GIB,
            "context_gib": self.context_bytes / GIB,
            "peak_gib": self.peak_bytes / GIB,
        }


def combine(plans: list[MemoryPlan]) -> MemoryPlan:
    """Several models on one device, as if each generates at the same time (serving may overlap them)."""
    first = plans[0]
    return MemoryPlan(
        device=first.device,
        models=tuple(name for p in plans for name in p.models),
        dtype=first.dtype,
        quantize=first.quantize,
        weights_bytes=sum(p.weights_bytes for p in plans),
        vae_bytes=sum(p.vae_bytes for p in plans),
        kv_cache_bytes=sum(p.kv_cache_bytes for p in plans),
        working_bytes=sum(p.working_bytes for p in plans),
        peak_by_quantize={q: sum(p.peak_by_quantize[q] for p in plans) for q in first.peak_by_quantize},
    )


def plan(
    model: NextStepConfig | str | Path,
    vae: VAEConfig | str | Path | None = None,
    dtype: torch.dtype = torch.bfloat16,
    quantize: str | None = None,
    device: torch.device | str = "cuda",
    workload: Workload = Workload(),
    name: str | None = None,
) -> MemoryPlan:
    """The memory plan of one model (a config or a checkpoint directory: only ``config.json`` is
    read) with its VAE (a config, a VAE directory, or None for the release VAE's shape)."""
    config = model if isinstance(model, NextStepConfig) else NextStepConfig.from_pretrained(Path(model))
    vae_config = _vae_config(vae)
    device = str(torch.device(device))
    stored = stored_quantization(getattr(config, "quantization_config", None))
    with torch.device("meta"):
        network = NextStepModel(config)
        autoencoder = AutoencoderKL(vae_config)
    size = torch.empty((), dtype=dtype).element_size()

    def one(choice: str | None) -> MemoryPlan:
        return MemoryPlan(
            device=device,
            models=(name or (Path(model).name if not isinstance(model, NextStepConfig) else "model"),),
            dtype=str(dtype).removeprefix("torch."),
            quantize=stored.label if stored else choice,
            weights_bytes=weight_bytes(network, dtype, choice, stored),
            vae_bytes=sum(t.numel() for t in autoencoder.parameters()) * size,
            kv_cache_bytes=kv_cache_bytes(config, vae_config, workload, size),
            # The finisher's VAE decode of one batch overlaps the next batch's prefill.
            working_bytes=prefill_bytes(config, vae_config, workload, size, choice, device)
            + vae_working_bytes(vae_config, workload, size),
        )

    # A checkpoint stored quantized loads as stored: no other choice to name.
    choices = [None] + ([] if stored else [q for q in QUANTIZATIONS if supported(q, device)])
    peaks = {choice: one(choice).peak_bytes for choice in choices}
    return dataclasses.replace(one(None if stored else quantize), peak_by_quantize=peaks)


def checkpoint_plan(
    model: str | Path, device, dtype: torch.dtype, quantize: str | None, vae: str | Path | None = None,
    images: int = 1,
) -> MemoryPlan:
    """What loading ``model`` (a directory or Hub id: only its configs are read) and serving a
    batch of ``images`` at its native size need on ``device``. The VAE is counted from its config
    where it is a local directory (given, or bundled in the model's), else at the release VAE's
    shape."""
    config_dir = resolve_directory(model, "model", files=CONFIG_FILES)
    config = NextStepConfig.from_pretrained(config_dir)
    checkpoint_quantization(getattr(config, "quantization_config", None), quantize, device)
    local_vae = next((Path(d) for d in (vae, config_dir / "vae") if d is not None and Path(d).is_dir()), None)
    workload = one_request(config, local_vae, images)
    return plan(config, local_vae, dtype, quantize, device, workload, name=str(model))


def one_request(config: NextStepConfig, vae: VAEConfig | str | Path | None = None, images: int = 1) -> Workload:
    """What a served model must hold for a batch of ``images``: each at the square it was trained
    at, as an edit when the model takes input images (the largest request of that size)."""
    side = math.isqrt(native_area(config, _vae_config(vae).downsample_factor))
    size = Size(side, side)
    if config.image_placeholder_id is not None:
        return Workload.edit(size, images)
    return Workload.text_to_image(size, images)


def weight_bytes(model: torch.nn.Module, dtype: torch.dtype, quantize: str | None,
                 stored: StoredInt4 | None = None) -> int:
    """Bytes of a (meta-built) model's parameters and buffers once loaded in ``dtype``, quantized
    linear weights at their packed size (``stored``: as a checkpoint stored in 4 bits holds them)."""
    return sum(tensor_bytes(model, dtype, quantize, stored).values())


def tensor_bytes(model: torch.nn.Module, dtype: torch.dtype, quantize: str | None,
                 stored: StoredInt4 | None = None) -> dict[str, int]:
    """``weight_bytes`` by parameter or buffer name."""
    size = torch.empty((), dtype=dtype).element_size()
    if stored is not None:
        packed = {f"{name}.weight": stored.group_size for name in stored.linears(model)}
        quantize = "int4"
    else:
        packed = {f"{name}.weight": None for name in quantized_linears(model, quantize)} if quantize else {}
    loaded = set(model.state_dict())  # computed buffers that are not stored (rotary tables) keep their dtype
    counted = {}
    for key, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if key in packed:
            counted[key] = quantized_weight_bytes(*tensor.shape, quantize, packed[key])
        elif key in loaded and tensor.is_floating_point():
            counted[key] = tensor.numel() * size
        else:
            counted[key] = tensor.numel() * tensor.element_size()
    return counted


def prompt_tokens(config: NextStepConfig, vae: VAEConfig, workload: Workload) -> tuple[int, int]:
    """(prompt length, image tokens to sample) of the workload's longest row."""
    down = vae.downsample_factor * config.latent_patch_size
    image_tokens = (workload.size.height // down) * (workload.size.width // down)
    prompt = workload.text_tokens + GRID_MARKER_TOKENS
    if workload.input_image:
        prompt += image_tokens + GRID_MARKER_TOKENS
    return prompt, image_tokens


def kv_cache_bytes(config: NextStepConfig, vae: VAEConfig, workload: Workload, size: int) -> int:
    prompt, image_tokens = prompt_tokens(config, vae, workload)
    slots = cache_slots(prompt + image_tokens)  # as the token loop allocates it
    per_slot = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * size  # keys and values
    return workload.rows * slots * (per_slot + 1)  # + the bool of which slots hold real tokens


def prefill_bytes(config: NextStepConfig, vae: VAEConfig, workload: Workload, size: int, quantize: str | None,
                  device: str = "cuda") -> int:
    """The working set of one decoder layer over the whole prompt (layers run one after another)."""
    prompt, image_tokens = prompt_tokens(config, vae, workload)
    tokens = workload.rows * prompt
    slots = prompt + image_tokens
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    hidden_states = 6 * tokens * config.hidden_size  # input, norms, attention and MLP outputs, residuals
    qkv = 2 * tokens * (heads + 2 * kv_heads) * head_dim  # projections and their rotated copies
    mlp = 4 * tokens * config.intermediate_size  # gate, up, activation, product
    # SDPA's math path: scores, masked scores and softmax, keys and values repeated per query head.
    attention = 3 * workload.rows * heads * prompt * slots + 2 * workload.rows * heads * slots * head_dim
    mask = workload.rows * prompt * slots  # bool
    # int8 off the CPU converts its weight into the compute dtype first (eager mode); the packed
    # kernels (int8 on the CPU, int4, fp8) read the weight as it is held.
    converts = quantize == "int8" and torch.device(device).type != "cpu"
    dequantized = max(config.intermediate_size, config.hidden_size) * config.hidden_size if converts else 0
    return (hidden_states + qkv + mlp + attention + dequantized) * size + mask


def vae_working_bytes(vae: VAEConfig, workload: Workload, size: int) -> int:
    """About four feature maps of the VAE's largest activation (a level's widest input at its
    resolution), per image decoded (or encoded, for an edit's guidance rows)."""
    widths = [vae.ch * m for m in vae.ch_mult]
    height, width = workload.size.height, workload.size.width
    largest = 0
    for level, channels in enumerate(widths):
        incoming = widths[level + 1] if level + 1 < len(widths) else channels  # upsampled from below
        largest = max(largest, max(channels, incoming) * (height >> level) * (width >> level))
    images = workload.images * (2 if workload.input_image else 1)
    return 4 * largest * images * size


def free_memory(device: torch.device | str) -> int | None:
    """Bytes free on ``device`` now (CUDA: the driver's figure; CPU: available RAM within the
    process's cgroup limit), capped by NEXTSTEP_MEMORY_LIMIT; None where unknown (other devices)."""
    device = torch.device(device)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    elif device.type == "cpu":
        free = _available_ram()
    else:
        free = None
    limit = os.environ.get(MEMORY_LIMIT)
    if limit:
        capped = parse_bytes(limit)
        free = capped if free is None else min(free, capped)
    return free


def parse_bytes(text: str) -> int:
    """``24GiB``, ``80GB``, ``512 MiB`` or a plain byte count -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{MEMORY_LIMIT} must be a size such as 24GiB, 80GB or 512MiB, got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _available_ram() -> int:
    try:
        meminfo = Path("/proc/meminfo").read_text()
        available = int(re.search(r"^MemAvailable:\s+(\d+) kB", meminfo, re.M).group(1)) * 1024
    except (OSError, AttributeError):
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:  # a container's limit (cgroup v2) can be far below the host's free RAM
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def _vae_config(vae: VAEConfig | str | Path | None) -> VAEConfig:
    return vae if isinstance(vae, VAEConfig) else read_vae_config(vae)


def loading_refusal(directory: Path, device, dtype: torch.dtype, quantize: str | None) -> NotEnoughMemoryError:
    """The error for running out of memory while loading the checkpoint in ``directory`` (when no
    plan was checked first, or the plan was wrong)."""
    config = NextStepConfig.from_pretrained(directory)
    with torch.device("meta"):
        need = weight_bytes(NextStepModel(config), dtype, quantize,
                            stored_quantization(getattr(config, "quantization_config", None)))
    free = free_memory(device)
    free_text = f"{_gib(free)} free now" if free is not None else "free memory unknown"
    what = f"{directory} ({str(dtype).removeprefix('torch.')})"
    return NotEnoughMemoryError(
        f"not enough memory on {device} to load {what}: its weights take {_gib(need)}, {free_text}. "
        f"Options: --quantize int4 or int8; a second device; a device with more memory"
    )


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"
