"""Image sizes: the one size string (``"WIDTHxHEIGHT"``) and the sizes a model can sample."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..models.config import NextStepConfig
from .inputs import clipped_repr

PROMPT_RESERVE = 64  # positions kept free for the prompt when listing sizes
# Aspect ratios offered (width, height) and the smallest area offered, as a fraction of the native one.
ASPECTS = ((1, 1), (4, 3), (3, 4), (2, 1), (1, 2))
SIDES = (32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
SMALLEST_AREA = 1 / 64
_SIZE_TEXT = re.compile(r"^\s*(\d+)\s*[x×]\s*(\d+)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Size:
    """An image size, width first as in ``PIL.Image.size`` and in its text ``"WIDTHxHEIGHT"``."""

    width: int
    height: int

    @property
    def value(self) -> str:
        return f"{self.width}x{self.height}"

    def __str__(self) -> str:
        return self.value

    @property
    def area(self) -> int:
        return self.width * self.height

    @property
    def aspect(self) -> tuple[int, int]:
        divisor = math.gcd(self.width, self.height) or 1
        return (self.width // divisor, self.height // divisor)

    @property
    def label(self) -> str:
        return f"{self.width} × {self.height} ({self.aspect[0]}:{self.aspect[1]})"

    @classmethod
    def parse(cls, value) -> Size:
        """``"WIDTHxHEIGHT"`` text, a ``Size`` or a (width, height) pair -> Size; ValueError otherwise."""
        if isinstance(value, Size):
            return value
        if isinstance(value, str):
            match = _SIZE_TEXT.match(value)
            if match:
                return cls(int(match[1]), int(match[2]))
        elif isinstance(value, (tuple, list)) and len(value) == 2:
            if all(isinstance(side, int) and not isinstance(side, bool) for side in value):
                return cls(*value)
        raise ValueError(f"size must be WIDTHxHEIGHT in pixels, such as 256x256, got {clipped_repr(value)}")


def native_area(config: NextStepConfig, vae_downsample: int) -> int:
    """Pixels in the square the model was trained at (NextStep-1: 512x512)."""
    native_latent = getattr(config, "latent_size", None) or config.gen_pos_embed_grid * config.latent_patch_size
    return (native_latent * vae_downsample) ** 2


def supported_sizes(config: NextStepConfig, vae_downsample: int, input_images: int = 0) -> list[Size]:
    """Sizes this model can sample, largest first: sides that are whole tokens, an area up to the
    one it was trained at, and room in its position table for the output plus ``input_images``
    inlined input images (editing inlines one at the output size)."""
    step = vae_downsample * config.latent_patch_size
    area = native_area(config, vae_downsample)
    position_budget = (config.max_position_embeddings - PROMPT_RESERVE) // (1 + input_images)
    table_budget = config.gen_pos_embed_grid**2 if config.use_gen_pos_embed else math.inf
    sizes = []
    for size in (Size(width, height) for width in SIDES for height in SIDES):
        if size.aspect not in ASPECTS or size.width % step or size.height % step:
            continue
        tokens = (size.width // step) * (size.height // step)
        fits = tokens <= position_budget and tokens <= table_budget
        if fits and area * SMALLEST_AREA <= size.area <= area:
            sizes.append(size)
    return sorted(sizes, key=lambda s: (-s.area, ASPECTS.index(s.aspect)))


def default_size(sizes: list[Size]) -> Size:
    """The largest square (models are trained on squares), else the largest size."""
    return next((s for s in sizes if s.width == s.height), sizes[0])


def closest_size(width: int, height: int, sizes: list[Size], area: int) -> Size:
    """For an input image: the size with the aspect ratio nearest to width:height, and among
    those the one with the area nearest to ``area`` (the resolution the page works at)."""

    def distance(size: Size) -> tuple[float, float]:
        aspect = abs(math.log(size.width / size.height * height / width))
        return (round(aspect, 3), abs(math.log(size.area / area)))

    return min(sizes, key=distance)
