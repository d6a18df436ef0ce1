"""The model and runtime options every front end takes (the app, the CLI, the Ray application and
the bench): one set of flags, one environment variable each, one set of defaults."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from ..engine.steps import STEP_MODES
from ..models.quantize import QUANTIZATIONS
from .devices import DTYPES, pick_device, pick_dtype

# The small model trained here and shipped in the repository: what runs when no model is named.
EMBEDDED_MODEL = Path(__file__).resolve().parents[2] / "assets" / "shapes-model"


@dataclass(frozen=True)
class RuntimeOptions:
    """Which checkpoints to load and how to run them; None everywhere means "the default"."""

    model: str | None = None  # a directory or Hub id; None: random weights (the bench's --config)
    edit_model: str | None = None  # for the Edit tab; None: ``model`` when it takes images
    vae: str | None = None  # None: the one the model's config names, or its vae/ folder
    device: str | None = None  # None: CUDA when available, else the CPU
    edit_device: str | None = None  # None: ``device``
    dtype: str | None = None  # None: bfloat16 on a GPU, float32 on the CPU
    quantize: str | None = None  # weight-only quantization of the backbone
    threads: int | None = None  # None: 1 on the CPU, torch's choice on a GPU
    step: str = "auto"  # how the per-token step runs: "auto" or one of engine.steps.STEP_MODES

    @property
    def torch_device(self) -> str:
        return pick_device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return pick_dtype(self.dtype, self.torch_device)

    def step_mode(self, zero_gpu: bool = False, one_shot: bool = False) -> str:
        """The step mode ``step`` stands for: by default, on ZeroGPU (where torch.compile is not
        available) the eager step captured as a CUDA graph; on a GPU the compiled step, compiled in
        the background while the captured eager step serves (for one generation, ``one_shot``,
        the captured eager step alone); on the CPU the eager step (a compile takes minutes of a
        small machine's cores, see docs/performance.md)."""
        if self.step != "auto":
            return self.step
        if torch.device(self.torch_device).type != "cuda":
            return "eager"
        return "graph" if zero_gpu or one_shot else "background"

    def placed(self) -> list[tuple[str, str]]:
        """(model, device) of each model to load: the edit model only where it is another one."""
        device = self.torch_device
        second = self.edit_model if self.edit_model and self.edit_model != self.model else None
        return [(self.model, device), *([(second, self.edit_device or device)] if second else [])]


# (option, flag help); each flag's environment variable is NEXTSTEP_<OPTION>.
_HELP = {
    "model": "model directory or Hub id",
    "edit_model": "model for the Edit tab [default: --model if it takes images]",
    "vae": "VAE directory or Hub id [default: the one the model's config names, or its vae/ folder]",
    "device": "cuda, cpu, cuda:1, ... [default: cuda when available]",
    "edit_device": "device for --edit-model, such as cuda:1 [default: --device]",
    "dtype": "[default: bfloat16 on a GPU, float32 on the CPU]",
    "quantize": "hold the backbone's weights packed (NextStep-1-Large at 512x512 needs 29.4 GiB in bfloat16). "
                "int4: 11.4 GiB; the CPU or CUDA compute capability 8.0+; on a GPU expected about 2.5x as fast "
                "as bfloat16 (from the bytes read), on the CPU 14B-shaped matmuls measured 3.4x. int8: 17.3 GiB; "
                "any device; 2.1x on the CPU, on a GPU expected slower than bfloat16 unless --step compiled "
                "fuses its conversion. fp8: 17.1 GiB; FP8 matrix products on CUDA 8.9+ (expected 1.7x); 25x "
                "slower on the CPU, to check quality. The small embedded model runs no faster with any. A "
                "checkpoint stored in 4 bits loads as stored [default: none]",
    "threads": "CPU threads for torch [default: 1 on the CPU, where small models are bound by per-operation "
               "overhead and share the cores with the server]",
    "step": "how the per-token step runs: eager; graph (the eager step captured as a CUDA graph, once per batch "
            "shape); compiled (torch.compile, each batch shape compiled at its first use, captured on CUDA); "
            "background (compiled on a thread of its own while the eager step serves) [default: auto: background "
            "on a GPU, graph on ZeroGPU, eager on the CPU]",
}


def environment_name(option: str) -> str:
    return "NEXTSTEP_" + option.upper()


def add_runtime_flags(parser: argparse.ArgumentParser, *, embedded_default: bool = True,
                      edit: bool = True) -> None:
    """The flags of ``RuntimeOptions``, each defaulting to its environment variable.
    ``embedded_default``: no model named means the embedded one (else None); ``edit``: offer
    ``--edit-model`` and ``--edit-device``."""
    group = parser.add_argument_group("model and runtime")
    env = os.environ.get
    for option in (f.name for f in fields(RuntimeOptions)):
        if option.startswith("edit_") and not edit:
            continue
        flag, variable = "--" + option.replace("_", "-"), environment_name(option)
        help_text = _HELP[option]
        if option == "model":
            help_text += " [default: the embedded model]" if embedded_default else " [default: random weights]"
        help_text = f"{help_text} [env {variable}]"
        if option == "threads":
            group.add_argument(flag, type=int, default=int(env(variable, "0")) or None, help=help_text)
        else:
            choices = {"dtype": list(DTYPES), "quantize": list(QUANTIZATIONS), "step": ["auto", *STEP_MODES]}.get(option)
            group.add_argument(flag, default=env(variable, "auto" if option == "step" else None), choices=choices,
                               help=help_text)
    parser.set_defaults(embedded_default=embedded_default)


def runtime_options(args: argparse.Namespace) -> RuntimeOptions:
    """The options the flags of ``add_runtime_flags`` gave; ValueError when the embedded model is
    the default and this checkout lacks it."""
    values = {f.name: getattr(args, f.name, None) for f in fields(RuntimeOptions)}
    if values["model"] is None and args.embedded_default:
        if not EMBEDDED_MODEL.is_dir():
            raise ValueError(f"the default model {EMBEDDED_MODEL} is not in this checkout; pass --model "
                             "PATH_OR_HUB_ID (and --vae if the model names none), or set NEXTSTEP_MODEL")
        values["model"] = str(EMBEDDED_MODEL)
    return RuntimeOptions(**values)
