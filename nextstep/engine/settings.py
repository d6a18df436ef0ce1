"""Generation settings: their one vocabulary, how each is read, and where its default comes from.

Every front end (the Python API, the CLI, the page, the bench) names a setting by its
``GenerationRequest`` field and reads it with that field's ``Setting``. A request is completed
in one order (``resolve``): the model family's defaults, then the official editing defaults
for an edit, then the settings the model stores beside its weights, then what the caller gave.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .inputs import clean_text, number
from .prompts import guidance_branches
from .sampling import CFG_SCHEDULES, SAMPLERS
from .sizes import Size

MAX_SEED = 2**63 - 1
# Drawn seeds stay below 2**32, so that pages (whose numbers are doubles) show them exactly.
MAX_DRAWN_SEED = 2**32 - 1
# Sampling settings a model trained here stores beside its weights: a "text_to_image" and an
# "edit" set of request fields (official checkpoints have no such file).
STORED_SETTINGS = "generation_config.json"
# The official editing examples' settings (NextStep-1-Large-Edit).
OFFICIAL_EDIT = dict(negative_prompt="Copy original image.", cfg_img=2.0, timesteps_shift=3.2)


@dataclass
class GenerationRequest:
    """Everything that determines one generation, complete and validated (``Engine.request``)."""

    prompt: str
    image: Image.Image | None
    negative_prompt: str
    positive_prompt: str
    size: Size
    num_images: int
    cfg: float
    cfg_img: float
    cfg_schedule: str
    timesteps_shift: float
    num_sampling_steps: int
    use_norm: bool
    sampler: str
    seed: int
    grid: tuple[int, int]  # image tokens (rows, columns) of the picture: the size over the model's down factor

    @property
    def edit(self) -> bool:
        return self.image is not None

    @property
    def tokens(self) -> int:
        """Image tokens to sample, per image."""
        return self.grid[0] * self.grid[1]

    @property
    def branches(self) -> int:
        """Guidance branches: backbone rows per image (``prompts.guidance_branches``)."""
        return guidance_branches(self.cfg, self.cfg_img, self.edit)

    @property
    def rows(self) -> int:
        """Backbone rows of the whole request: every image's guidance branches."""
        return self.branches * self.num_images

    def parameters(self) -> dict:
        """The request as JSON-ready values (the image and the grid aside), in the names ``resolve``
        reads back."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("image", "grid")}
        values["size"] = self.size.value
        values["edit"] = self.edit
        return values


def draw_seed() -> int:
    """A fresh seed, for requests that name none."""
    return secrets.randbelow(MAX_DRAWN_SEED + 1)


# ---- how each setting is read -------------------------------------------------------------


def _integer(minimum: int, maximum: int | None = None) -> Callable:
    return lambda value, name: number(value, name, minimum=minimum, maximum=maximum, integer=True)


def _real(minimum: float) -> Callable:
    return lambda value, name: number(value, name, minimum=minimum)


def _positive(value, name: str) -> float:
    parsed = number(value, name)
    if parsed <= 0:
        raise ValueError(f"{name} must be greater than 0, got {parsed!r}")
    return parsed


def _choice(options) -> Callable:
    def read(value, name: str) -> str:
        if value not in options:
            raise ValueError(f"{name} must be one of {', '.join(options)}, got {value!r}")
        return value

    return read


def read_boolean(value, name: str) -> bool:
    """True or False; the text "true" / "false" too (API clients send strings), nothing else."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"{name} must be true or false, got {value!r}")


def _size(value, name: str) -> Size:
    size = Size.parse(value)
    for side, pixels in (("width", size.width), ("height", size.height)):
        if pixels < 1:
            raise ValueError(f"{name}: the {side} must be at least 1 pixel, got {size.value}")
    return size


@dataclass(frozen=True)
class Setting:
    name: str  # the request field: also the API keyword, the CLI flag and the page's parameter
    read: Callable  # (value, name) -> clean value; ValueError naming the setting otherwise
    help: str


SETTINGS = {
    setting.name: setting
    for setting in (
        Setting("negative_prompt", lambda value, name: clean_text(value, name), "what the image should avoid"),
        Setting("positive_prompt", lambda value, name: clean_text(value, name), "appended to the prompt"),
        Setting("size", _size, "WIDTHxHEIGHT in pixels, multiples of the model's token size"),
        Setting("num_images", _integer(1), "images per request"),
        Setting("cfg", _real(1.0), "text guidance (1: none)"),
        Setting("cfg_img", _real(1.0), "image guidance, for edits (1: none)"),
        Setting("cfg_schedule", _choice(CFG_SCHEDULES), "guidance over the tokens: constant, or a linear ramp"),
        Setting("timesteps_shift", _positive, "time shift of the sampling grid (>1: more steps near the noise)"),
        Setting("num_sampling_steps", _integer(1), "flow-head sampling steps per image token"),
        Setting("use_norm", read_boolean, "LayerNorm each sampled token, as NextStep-1 does"),
        Setting("sampler", _choice(SAMPLERS), "v1 (NextStep-1's), or sde, cps, ode (NextStep-1.1's)"),
        Setting("seed", _integer(0, MAX_SEED), "the random seed (none: a fresh one, reported with the result)"),
    )
}


def read_stored_settings(directory: Path | None) -> dict:
    """The ``STORED_SETTINGS`` file of a model directory, or {} (official checkpoints)."""
    path = Path(directory) / STORED_SETTINGS if directory is not None else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


def resolve(layers: list[dict], given: dict) -> dict:
    """Every setting's value: the last of ``layers`` (lowest priority first) that names it, then
    ``given``, where None means "not given"; each read with its ``Setting``. The seed is drawn
    here when none is given. Raises ValueError for an unknown name or a bad value."""
    unknown = sorted(set(given) - set(SETTINGS))
    if unknown:
        raise ValueError(f"unknown setting{'s' * (len(unknown) > 1)} {', '.join(unknown)}; "
                         f"the settings are {', '.join(SETTINGS)}")
    merged = {}
    for layer in [*layers, {k: v for k, v in given.items() if v is not None}]:
        merged.update({k: v for k, v in layer.items() if k in SETTINGS})
    if merged.get("seed") is None:
        merged["seed"] = draw_seed()
    missing = sorted(set(SETTINGS) - set(merged))
    if missing:
        raise ValueError(f"no value for {', '.join(missing)}")
    return {name: SETTINGS[name].read(merged[name], name) for name in SETTINGS}


# ---- command-line flags ---------------------------------------------------------------------


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per request field (``--num-sampling-steps`` for ``num_sampling_steps``, …); the
    values reach the engine as text, read like every other front end's. Unset: the model's default."""
    group = parser.add_argument_group("generation settings (default: the model's)")
    for name, setting in SETTINGS.items():
        flag = "--" + name.replace("_", "-")
        if name == "use_norm":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, help=setting.help)
        else:
            group.add_argument(flag, metavar=name.upper(), help=setting.help)


def given_settings(args: argparse.Namespace) -> dict:
    """The settings flags that were set, by request field."""
    return {name: getattr(args, name) for name in SETTINGS if getattr(args, name) is not None}
