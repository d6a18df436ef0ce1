"""Finding a model or VAE directory from a local path or a Hugging Face Hub id."""

from __future__ import annotations

import re
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

# What a checkpoint directory needs; the rest of a Hub repository (sample images, code) is skipped.
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.pt", "*.txt", "*.model", "*.tiktoken"]
# What a memory plan reads (``nextstep.memory``): the configs, so it can refuse before the weights download.
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
