"""Reading checkpoint files and putting them into meta-built modules, strictly.

A checkpoint directory holds ``model.safetensors``, or shards listed by
``model.safetensors.index.json``, or (VAE releases) a plain ``checkpoint.pt`` state dict.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_CHECKPOINT = "checkpoint.pt"


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not match the model built from its config."""


def read_state_dict(directory: Path, device: torch.device | str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Load every tensor of the checkpoint in ``directory`` onto ``device``, floats as ``dtype``.

    Each tensor is copied out of the memory-mapped file as it is read (one tensor at a time,
    never the whole model twice): a tensor left inside the mapping can sit at an alignment
    that makes CPU kernels round differently from one file layout to another.
    """
    directory = Path(directory)
    if (directory / SAFETENSORS_INDEX).is_file():
        index = json.loads((directory / SAFETENSORS_INDEX).read_text())
        files = sorted(set(index["weight_map"].values()))
    elif (directory / SAFETENSORS).is_file():
        files = [SAFETENSORS]
    elif (directory / TORCH_CHECKPOINT).is_file():
        state = torch.load(directory / TORCH_CHECKPOINT, map_location="cpu", weights_only=True, mmap=True)
        return {key: _owned(tensor, device, dtype) for key, tensor in state.items()}
    else:
        raise FileNotFoundError(
            f"no weights in {directory}: expected {SAFETENSORS}, {SAFETENSORS_INDEX} or {TORCH_CHECKPOINT}"
        )
    state = {}
    for name in files:
        with safe_open(directory / name, framework="pt") as f:
            for key in f.keys():
                state[key] = _owned(f.get_tensor(key), device, dtype)
    return state


def _owned(tensor: torch.Tensor, device, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype, copy=True)


def load_strict(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    what: str,
    optional: frozenset[str] = frozenset(),
) -> None:
    """Assign ``state`` to a (meta-built) module, refusing any missing or unexpected key.

    Keys in ``optional`` may be absent from the
    checkpoint (the module keeps the value it computed itself).
    """
    expected = set(module.state_dict().keys())
    missing = sorted(expected - set(state) - optional)
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected[:20])}" + (" ..." if len(unexpected) > 20 else ""))
        raise CheckpointMismatchError(f"{what} does not match its config; " + "; ".join(parts))
    own = module.state_dict()
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape]
    if bad:
        raise CheckpointMismatchError(f"{what} has tensors of the wrong shape: {', '.join(bad[:20])}")
    module.load_state_dict(state, strict=False, assign=True)


def save_safetensors(module: nn.Module, directory: Path, dtype: torch.dtype | None = None) -> None:
    """Write ``module``'s state as ``model.safetensors``, floats as ``dtype`` (None: as they are)."""
    state = {k: _owned(v.detach(), "cpu", dtype or v.dtype).contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(Path(directory) / SAFETENSORS), metadata={"format": "pt"})
