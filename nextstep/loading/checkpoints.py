"""Checkpoint files <-> modules: the model and the VAE read from and written to directories.

A checkpoint directory holds ``model.safetensors``, or shards listed by
``model.safetensors.index.json``, or (VAE releases) a plain ``checkpoint.pt`` state dict, beside its
``config.json``. Keys and shapes are checked from the files' headers first; tensors are then read
and placed one at a time into modules built on the meta device (no random init, one copy).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..models.config import NextStepConfig
from ..models.model import NextStepModel
from ..models.quantize import (
    check_quantization,
    is_quantized,
    quantize_linear,
    quantized_linears,
)
from ..models.vae import AutoencoderKL, VAEConfig
from .autoround import StoredInt4, StoredInt4Linear, stored_quantization

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_CHECKPOINT = "checkpoint.pt"


# Checkpoint tensors that image generation never uses: present in the releases, left unread.
UNUSED_KEYS = frozenset({"lm_head.weight"})


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not match the model built from its config."""


class Checkpoint:
    """The tensors of the checkpoint in ``directory``, listed from the files' headers without reading them."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._files: dict[str, list[str]] = {}  # file -> its keys, in the order they are read
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._torch_state = None  # a memory-mapped checkpoint.pt, read lazily
        if (self.directory / SAFETENSORS_INDEX).is_file():
            index = json.loads((self.directory / SAFETENSORS_INDEX).read_text())
            names = sorted(set(index["weight_map"].values()))
        elif (self.directory / SAFETENSORS).is_file():
            names = [SAFETENSORS]
        elif (self.directory / TORCH_CHECKPOINT).is_file():
            self._torch_state = torch.load(
                self.directory / TORCH_CHECKPOINT, map_location="cpu", weights_only=True, mmap=True
            )
            self._files[TORCH_CHECKPOINT] = list(self._torch_state)
            self.shapes = {key: tuple(tensor.shape) for key, tensor in self._torch_state.items()}
            return
        else:
            raise FileNotFoundError(
                f"no weights in {self.directory}: expected {SAFETENSORS}, {SAFETENSORS_INDEX} or {TORCH_CHECKPOINT}"
            )
        for name in names:
            with safe_open(self.directory / name, framework="pt") as f:
                keys = list(f.keys())
                self._files[name] = keys
                self.shapes.update({key: tuple(f.get_slice(key).get_shape()) for key in keys})

    def tensors(self, keys: set[str], device, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        """The tensors named in ``keys``, one at a time, each on ``device`` (floats as ``dtype``).

        On the CPU each tensor is copied out of the memory-mapped file as it is read (never the
        whole model twice): a tensor left inside the mapping can sit at an alignment that makes CPU
        kernels round differently from one file layout to another. On a GPU the move is the copy.
        """
        for name, file_keys in self._files.items():
            wanted = [key for key in file_keys if key in keys]
            if self._torch_state is not None:
                for key in wanted:
                    yield key, _owned(self._torch_state[key], device, dtype)
                continue
            with safe_open(self.directory / name, framework="pt") as f:
                for key in wanted:
                    yield key, _owned(f.get_tensor(key), device, dtype)


def _owned(tensor: torch.Tensor, device, dtype: torch.dtype) -> torch.Tensor:
    # Only a CPU destination asks for a copy. Under ZeroGPU's CUDA emulation (``spaces``) a "cuda"
    # tensor is a stand-in for a host tensor until a GPU task moves it: a copy there would hold the
    # whole model in host RAM until launch, where the file's own pages let spaces drop the mapping
    # (and prune the Hub cache files behind it) once it has packed the weights.
    dtype = dtype if tensor.is_floating_point() else tensor.dtype
    return tensor.to(device=device, dtype=dtype, copy=torch.device(device).type == "cpu")


def load_strict(
    module: nn.Module,
    checkpoint: Checkpoint,
    what: str,
    device,
    dtype: torch.dtype,
    optional: frozenset[str] = frozenset(),
    unused: frozenset[str] = frozenset(),
    loaded: Callable[[str], None] | None = None,
) -> set[str]:
    """Put ``checkpoint``'s tensors into a (meta-built) module one by one, refusing any missing,
    unexpected or misshapen key before reading a single tensor. Returns the keys loaded.

    Keys in ``optional`` may be absent from the checkpoint (the module keeps the value it computes
    itself); keys in ``unused`` may be present and are never read. ``loaded(key)`` runs right after
    each tensor is in place (to quantize it before the next one is read).
    """
    own = module.state_dict()
    present = set(checkpoint.shapes) - unused
    missing = sorted(set(own) - present - optional)
    unexpected = sorted(present - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected[:20])}" + (" ..." if len(unexpected) > 20 else ""))
        raise CheckpointMismatchError(f"{what} does not match its config; " + "; ".join(parts))
    bad = [
        f"{key} {checkpoint.shapes[key]} vs {tuple(own[key].shape)}"
        for key in sorted(present)
        if checkpoint.shapes[key] != tuple(own[key].shape)
    ]
    if bad:
        raise CheckpointMismatchError(f"{what} has tensors of the wrong shape: {', '.join(bad[:20])}")
    for key, tensor in checkpoint.tensors(present, device, dtype):
        _assign(module, key, tensor)
        if loaded is not None:
            loaded(key)
    return present


def _assign(module: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Make ``tensor`` the parameter or buffer ``key`` of ``module`` (as ``load_state_dict(assign=True)``)."""
    owner_name, _, name = key.rpartition(".")
    owner = module.get_submodule(owner_name)
    if name in owner._parameters:
        owner._parameters[name] = nn.Parameter(tensor, requires_grad=owner._parameters[name].requires_grad)
    else:
        owner._buffers[name] = tensor


def save_safetensors(module: nn.Module, directory: Path, dtype: torch.dtype | None = None) -> None:
    """Write ``module``'s state as ``model.safetensors``, floats as ``dtype`` (None: as they are)."""
    state = {k: _owned(v.detach(), "cpu", dtype or v.dtype).contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(Path(directory) / SAFETENSORS), metadata={"format": "pt"})


# ---- the model --------------------------------------------------------------------------------


def load_model(directory: Path, device="cpu", dtype=torch.float32, quantize: str | None = None) -> NextStepModel:
    """The NextStep model in ``directory``, built on the meta device, taking the checkpoint's tensors
    one at a time. ``quantize`` ("int8", "int4" or "fp8", see ``nextstep.models.quantize``) packs
    each backbone linear weight as soon as it is on the device, before the next one is read, so the
    full-precision backbone is never held there. A checkpoint stored in 4 bits (auto-round W4A16,
    ``nextstep.loading.autoround``) loads as stored, each packed layer moved into the int4 layout
    as soon as its tensors are read."""
    directory = Path(directory)
    device = torch.device(device)
    raw = json.loads((directory / "config.json").read_text())
    stored = checkpoint_quantization(raw.get("quantization_config"), quantize, device)
    config = NextStepConfig.from_pretrained(directory)
    checkpoint = Checkpoint(directory)
    if "o_attention_bias" not in raw:
        # Officially a missing o_attention_bias follows attention_bias, and o_proj biases absent
        # from the file are zero-filled: the same numbers as no bias. Reading the choice from the
        # file gives the official result either way, stays strict about a partial set of biases,
        # and holds no zeros.
        config.o_attention_bias = any(key.endswith("self_attn.o_proj.bias") for key in checkpoint.shapes)
    with torch.device("meta"):
        model = NextStepModel(config)
    loaded = _packing_hook(model, checkpoint, stored, quantize, f"checkpoint {directory}")
    # NextStep-1 checkpoints carry the position table; NextStep-1.1 ones need not.
    keys = load_strict(model, checkpoint, f"checkpoint {directory}", device, dtype,
                       optional=frozenset({"gen_pos_embed"}), unused=UNUSED_KEYS, loaded=loaded)
    model.build_computed_buffers(device, keep_loaded="gen_pos_embed" in keys)
    model.quantization = stored.label if stored else quantize
    return model.eval()


def checkpoint_quantization(quantization_config: dict | None, quantize: str | None, device) -> StoredInt4 | None:
    """The quantization a checkpoint stores (its ``config.json``'s ``quantization_config``; None:
    none), checked together with the requested ``quantize`` against ``device`` before any weight is
    read: a stored checkpoint loads as stored, and needs the int4 kernels."""
    stored = stored_quantization(quantization_config)
    if stored is None:
        check_quantization(quantize, device)
        return None
    if quantize not in (None, "int4"):
        raise ValueError(f"this checkpoint is stored in 4 bits ({stored.label}) and loads as it is stored: "
                         f"leave quantize out (got {quantize!r})")
    check_quantization("int4", device, what=f"this checkpoint is stored in 4 bits ({stored.label}): ")
    return stored


def _packing_hook(model: NextStepModel, checkpoint: Checkpoint, stored: StoredInt4 | None, quantize: str | None,
                  what: str) -> Callable[[str], None] | None:
    """What ``load_strict`` calls after each tensor: puts a layer's packed form in its place as
    soon as all of the layer's tensors are in (a stored checkpoint's packed layers are first
    replaced, on the meta device, by their stored tensors' shapes). None: nothing to pack."""
    if stored is not None:
        names = _stored_linears(model, checkpoint, what)
        for name in names:
            model.set_submodule(name, StoredInt4Linear(model.get_submodule(name), stored))

        def pack(name: str) -> None:
            model.set_submodule(name, model.get_submodule(name).to_packed())
    elif quantize is not None:
        names = list(quantized_linears(model, quantize))

        def pack(name: str) -> None:
            quantize_linear(model, name, quantize)
    else:
        return None
    waiting = set(names)

    def loaded(key: str) -> None:
        name = key.rpartition(".")[0]
        if name in waiting and all(t.device.type != "meta" for t in model.get_submodule(name).state_dict().values()):
            pack(name)
            waiting.discard(name)

    return loaded


def _stored_linears(model: NextStepModel, checkpoint: Checkpoint, what: str) -> list[str]:
    """The linear layers a stored checkpoint holds packed (those with a ``qweight``), checked from its header."""
    if any(key.endswith(".g_idx") for key in checkpoint.shapes):
        raise ValueError(f"{what} stores act-order (g_idx) tensors, which this loader does not support")
    names = [key.removesuffix(".qweight") for key in checkpoint.shapes if key.endswith(".qweight")]
    linears = dict(model.named_modules())
    strays = [name for name in names if not isinstance(linears.get(name), nn.Linear)]
    if strays:
        raise CheckpointMismatchError(f"{what} stores packed weights for layers that are not linear layers of "
                                      f"its config: {', '.join(strays[:20])}")
    return names


def save_model(model: NextStepModel, directory: Path) -> None:
    """``config.json`` and ``model.safetensors`` (weights in the dtype the config names)."""
    if is_quantized(model):
        raise ValueError("a quantized model cannot be saved (quantization happens while loading): save it unquantized")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    save_safetensors(model, directory, model.config.dtype)


# ---- the VAE ------------------------------------------------------------------------------------


def read_vae_config(directory: Path | None, defaults: VAEConfig | None = None) -> VAEConfig:
    """A VAE directory's ``config.json``; fields it leaves out (or the whole file, or ``directory``
    None) take ``defaults`` (the release VAE's shape by default)."""
    values = dataclasses.asdict(defaults or VAEConfig())
    config_file = Path(directory) / "config.json" if directory is not None else None
    if config_file is not None and config_file.is_file():
        values.update(json.loads(config_file.read_text()))
    return VAEConfig.from_dict(values)


def load_vae(directory: Path, device="cpu", dtype=torch.float32, defaults: VAEConfig | None = None) -> AutoencoderKL:
    """The VAE in ``directory`` (``read_vae_config``, then its weights, strictly)."""
    with torch.device("meta"):
        vae = AutoencoderKL(read_vae_config(directory, defaults))
    load_strict(vae, Checkpoint(directory), f"VAE checkpoint {directory}", device, dtype)
    return vae.eval()


def save_vae(vae: AutoencoderKL, directory: Path) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(dataclasses.asdict(vae.config), indent=2) + "\n")
    save_safetensors(vae, directory)
