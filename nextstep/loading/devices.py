"""Where a model runs: the device, the dtype and the CPU thread policy every front end shares."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def set_threads(device: str, threads: int | None = None) -> None:
    """``threads`` torch threads; by default 1 on the CPU, where the small models this runs there
    are bound by per-operation overhead, and a server shares the cores with its web threads."""
    threads = threads or (1 if device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
