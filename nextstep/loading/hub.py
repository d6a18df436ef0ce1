"""Finding a model or VAE directory from a local path or a Hugging Face Hub id."""

from __future__ import annotations

import re
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)

# What a checkpoint directory needs; the rest of a Hub repository (sample images, code) is skipped.
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.pt", "*.txt", "*.model", "*.tiktoken"]
# What a memory plan reads (``nextstep.loading.memory``): the configs, so it can refuse before the weights download.
CONFIG_FILES = ["*.json"]
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class ModelNotFoundError(FileNotFoundError):
    """Neither a local directory nor a reachable Hub repository goes by that name."""


def resolve_directory(
    name_or_path: str | Path, what: str, relative_to: Path | None = None, files: list[str] = CHECKPOINT_FILES
) -> Path:
    """A local directory (relative paths are tried against ``relative_to`` first, then the
    working directory), else a Hub id resolved through huggingface_hub's cache (it honours
    ``HF_HUB_OFFLINE``), fetching only ``files`` (patterns) of the repository."""
    path = Path(name_or_path).expanduser()
    candidates = [path] if path.is_absolute() or relative_to is None else [relative_to / path, path]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    tried = " or ".join(str(c) for c in candidates)
    name = str(name_or_path)
    if not _REPO_ID.match(name):
        raise ModelNotFoundError(f"{what} not found: no directory {tried}")
    try:
        return Path(snapshot_download(name, allow_patterns=files))
    except (LocalEntryNotFoundError, RepositoryNotFoundError, HFValidationError, OSError) as error:
        raise ModelNotFoundError(
            f"{what} not found: no directory {tried}, and the Hugging Face Hub repository {name!r} "
            f"could not be loaded ({type(error).__name__}); download it first or check the name"
        ) from error


def display_name(name_or_path: str | Path) -> str:
    """How results and pages name a model: a Hub id as it is, a local directory by its folder name
    alone (a server's paths are nobody else's business)."""
    path = Path(name_or_path).expanduser()
    return path.resolve().name if path.is_dir() else str(name_or_path)


def vae_directory(model_dir: Path, requested: str | Path | None, configured: str | None) -> Path:
    """The VAE asked for; else the one the config names; else the ``vae/`` folder bundled with
    the model. A configured path that does not exist here (often a path on the machine the
    checkpoint was made on) gives way to a bundled VAE."""
    if requested is not None:
        return resolve_directory(requested, "VAE", relative_to=model_dir)
    bundled = model_dir / "vae"
    if configured is not None:
        try:
            return resolve_directory(configured, "VAE", relative_to=model_dir)
        except ModelNotFoundError:
            if not bundled.is_dir():
                raise
    if bundled.is_dir():
        return bundled
    raise ModelNotFoundError(f"no VAE for {model_dir}: pass vae=..., or set vae_name_or_path in its config.json")
