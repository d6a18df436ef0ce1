"""Serving one loaded pipeline to the many users of a web page or API.

What a front end needs besides widgets: loading with device/dtype defaults, the sizes a model
supports, one generation at a time on the shared model, progress throttled to a few frames per
second with a status line, and generation parameters stored in the PNGs themselves.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin

from .pipeline import GenerationResult, NextStepPipeline
from .scheduler import Scheduler, Ticket

PARAMETERS_KEY = "parameters"  # PNG text chunk holding the generation parameters as JSON
# The official editing examples' settings (NextStep-1-Large-Edit).
OFFICIAL_EDIT = dict(negative_prompt="Copy original image.", cfg_img=2.0, timesteps_shift=3.2)
MAX_UI_SEED = 2**32 - 1  # browsers hold numbers as doubles: keep seeds exact in a page
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROMPT_RESERVE = 64  # positions kept free for the prompt when listing sizes

# Aspect ratios offered (width, height) and the smallest area offered, as a fraction of the native one.
ASPECTS = ((1, 1), (4, 3), (3, 4), (2, 1), (1, 2))
SIDES = (32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
SMALLEST_AREA = 1 / 64


# ---- loading ------------------------------------------------------------------------------


def pick_device(name: str | None = None) -> str:
    """The named device, else CUDA when available, else the CPU."""
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(name: str | None, device: str) -> torch.dtype:
    """The named dtype, else bfloat16 on accelerators (half the memory) and float32 on the CPU."""
    if not name:
        return torch.float32 if device == "cpu" else torch.bfloat16
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def describe(pipe: NextStepPipeline) -> dict[str, str]:
    """What a model panel shows: checkpoint, device, dtype and parameter count."""
    count = sum(p.numel() for p in pipe.model.parameters()) + sum(p.numel() for p in pipe.vae.parameters())
    return {
        "checkpoint": pipe.name,
        "family": pipe.family,
        "device": str(pipe.device),
        "dtype": str(pipe.model.dtype).removeprefix("torch."),
        "parameters": human_count(count),
    }


def page_defaults(pipe: NextStepPipeline, edit: bool) -> dict:
    """Request settings a page starts from: the family's, plus the official editing ones for
    editing, overridden by the settings a model stores beside its weights (``text_to_image``
    and ``edit`` sets in ``generation_config.json``, from our own training), when it has them."""
    return {**pipe.default_settings(), "negative_prompt": "", **(OFFICIAL_EDIT if edit else {}),
            **pipe.stored_settings(edit)}


def load_examples(path: Path) -> dict[str, list[dict]]:
    """``{"text_to_image": [{"prompt", "seed"}, …], "edit": [{"image", "instruction", "seed"}, …]}``
    from an examples.json (image paths made absolute), or empty lists without one."""
    path = Path(path)
    examples = json.loads(path.read_text()) if path.is_file() else {}
    for example in examples.get("edit", []):
        example["image"] = str(path.parent / example["image"])
    return {kind: examples.get(kind, []) for kind in ("text_to_image", "edit")}


def human_count(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)


# ---- sizes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Size:
    width: int
    height: int

    @property
    def value(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def hw(self) -> tuple[int, int]:
        return (self.height, self.width)

    @property
    def area(self) -> int:
        return self.width * self.height

    @property
    def aspect(self) -> tuple[int, int]:
        divisor = math.gcd(self.width, self.height)
        return (self.width // divisor, self.height // divisor)

    @property
    def label(self) -> str:
        return f"{self.width} × {self.height} ({self.aspect[0]}:{self.aspect[1]})"

    @classmethod
    def parse(cls, value: str) -> Size:
        """``"WIDTHxHEIGHT"`` -> Size; ValueError for anything else."""
        try:
            width, height = (int(side) for side in str(value).lower().split("x"))
        except ValueError:
            raise ValueError(f"size must look like 256x256 (width x height), got {value!r}") from None
        return cls(width, height)


def supported_sizes(pipe: NextStepPipeline, input_images: int = 0) -> list[Size]:
    """Sizes this model can sample, largest first: sides that are whole tokens, an area up to the
    one it was trained at, and room in its position table for the output plus ``input_images``
    inlined input images (editing inlines one at the output size)."""
    config, step = pipe.config, pipe.down_factor
    native_latent = getattr(config, "latent_size", None) or config.gen_pos_embed_grid * config.latent_patch_size
    native_area = (native_latent * pipe.vae.config.downsample_factor) ** 2
    position_budget = (config.max_position_embeddings - PROMPT_RESERVE) // (1 + input_images)
    table_budget = config.gen_pos_embed_grid**2 if config.use_gen_pos_embed else math.inf
    sizes = []
    for size in (Size(width, height) for width in SIDES for height in SIDES):
        if size.aspect not in ASPECTS or size.width % step or size.height % step:
            continue
        tokens = (size.width // step) * (size.height // step)
        fits = tokens <= position_budget and tokens <= table_budget
        if fits and native_area * SMALLEST_AREA <= size.area <= native_area:
            sizes.append(size)
    return sorted(sizes, key=lambda s: (-s.area, ASPECTS.index(s.aspect)))


def default_size(sizes: list[Size], hw: list[int] | tuple[int, int] | None = None) -> Size:
    """``hw`` (height, width) when offered, else the largest square (models are trained on
    squares), else the largest size."""
    if hw is not None and Size(hw[1], hw[0]) in sizes:
        return Size(hw[1], hw[0])
    return next((s for s in sizes if s.width == s.height), sizes[0])


def closest_size(width: int, height: int, sizes: list[Size], area: int) -> Size:
    """For an input image: the size with the aspect ratio nearest to width:height, and among
    those the one with the area nearest to ``area`` (the resolution the page works at)."""

    def distance(size: Size) -> tuple[float, float]:
        aspect = abs(math.log(size.width / size.height * height / width))
        return (round(aspect, 3), abs(math.log(size.area / area)))

    return min(sizes, key=distance)


# ---- seeds, PNG parameters, previews ------------------------------------------------------


def draw_seed() -> int:
    return secrets.randbelow(MAX_UI_SEED + 1)


def with_parameters(image: Image.Image, parameters: dict) -> Image.Image:
    """Attach parameters to an image; PNG writers (Gradio's included) store ``info`` text as tEXt chunks."""
    image.info[PARAMETERS_KEY] = json.dumps(parameters, sort_keys=True)
    return image


def save_with_parameters(image: Image.Image, parameters: dict, path: str | Path) -> None:
    """Write a PNG whose ``parameters`` text chunk holds the generation parameters (as the page's)."""
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, json.dumps(parameters, sort_keys=True))
    image.save(path, format="PNG", pnginfo=info)


def read_parameters(image: Image.Image | str | Path) -> dict | None:
    """The parameters stored in a PNG by ``with_parameters``, or None."""
    if not isinstance(image, Image.Image):
        with Image.open(image) as opened:
            text = opened.info.get(PARAMETERS_KEY)
    else:
        text = image.info.get(PARAMETERS_KEY)
    return json.loads(text) if text else None


def tile(images: list[Image.Image]) -> Image.Image:
    """Several same-sized pictures side by side in rows of two (one picture stays as it is)."""
    if len(images) == 1:
        return images[0]
    width, height = images[0].size
    columns = 2
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(images):
        sheet.paste(image, ((index % columns) * width, (index // columns) * height))
    return sheet


def clock(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}:{seconds:02d}"


# ---- progress and the shared model --------------------------------------------------------


@dataclass
class Progress:
    """One frame for a front end: how far sampling is, maybe a preview, and at the end the result
    (its images carry their parameters)."""

    done: int
    total: int
    elapsed: float  # seconds since this generation got the model
    preview: list[Image.Image] | None = None
    result: GenerationResult | None = None

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    def status(self) -> str:
        if self.result is not None:
            return (
                f"Done: {self.total} tokens in {clock(self.elapsed)} ({self.rate:.1f} tokens/s) · "
                f"seed {self.result.seed}"
            )
        eta = (self.total - self.done) / self.rate if self.rate else math.inf
        eta_text = clock(eta) if math.isfinite(eta) else "…"
        return (
            f"Tokens {self.done}/{self.total} · {self.rate:.1f} tokens/s · "
            f"elapsed {clock(self.elapsed)} · ETA {eta_text}"
        )


class SharedPipeline:
    """One pipeline used by many callers through a ``Scheduler``: concurrent requests that can
    share a token loop are decoded together, each keeps its own result, and closing a stream
    (Stop, a closed tab) withdraws that request alone at the next token.

    Frames are throttled to one per ``frame_interval`` seconds, so a fast model does not flood
    the browser; the latest preview is kept until it can be sent, and the result always is.
    """

    def __init__(
        self, pipe: NextStepPipeline, frame_interval: float = 0.25, max_batch: int = 8, max_waiting: int = 16,
        time_limit: float = 600.0,
    ):
        self.pipe = pipe
        self.frame_interval = frame_interval
        self.scheduler = Scheduler(pipe, max_batch=max_batch, max_waiting=max_waiting, time_limit=time_limit)

    @property
    def busy(self) -> bool:
        return self.scheduler.load > 0

    def stream(self, prompt: str, image=None, **settings) -> Iterator[Progress]:
        """Validate and queue now (ValueError with a readable message; ``Busy`` when the line is
        full), then yield frames; failures arrive as ``GenerationFailed``."""
        return self._frames(self.scheduler.submit(prompt, image, **settings))

    def _frames(self, ticket: Ticket) -> Iterator[Progress]:
        try:
            start = None
            last_frame = -math.inf
            pending = None
            for event in ticket:
                now = time.monotonic()
                start = start if start is not None else now  # the first token: the model is at work
                pending = event.preview or pending
                if event.result is not None:
                    for image in event.result.images:
                        with_parameters(image, event.result.parameters)
                    yield Progress(event.done, event.total, now - start, result=event.result)
                elif now - last_frame >= self.frame_interval:
                    yield Progress(event.done, event.total, now - start, preview=pending)
                    last_frame, pending = now, None
        finally:
            ticket.cancel()  # a no-op once finished; otherwise leaves its batch at the next token
