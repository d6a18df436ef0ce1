"""Which example prompts and edits fit which model, and reading them.

Examples are shown only where they fit the loaded model, recognised by the name it is loaded
under (a Hub id, or a directory named like the release): the checked shapes examples for the
embedded model, our own prompts for the official releases, none for any other model.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..loading.options import EMBEDDED_MODEL

EXAMPLES = EMBEDDED_MODEL.parent / "examples"
SHAPES_EXAMPLES = EXAMPLES / "examples.json"  # checked against the embedded model
OFFICIAL_EXAMPLES = EXAMPLES / "official.json"
OFFICIAL_RELEASES = ("NextStep-1-Large", "NextStep-1-Large-Edit", "NextStep-1-Large-Pretrain", "NextStep-1.1")


def examples_for(model: str) -> Path | None:
    """The examples file that fits a model, or None."""
    path = Path(model)
    if path.is_dir() and path.resolve() == EMBEDDED_MODEL:
        return SHAPES_EXAMPLES
    return OFFICIAL_EXAMPLES if path.name in OFFICIAL_RELEASES else None


def load_examples(path: Path | None) -> dict[str, list[dict]]:
    """``{"text_to_image": [{"prompt", "seed"}, …], "edit": [{"image", "instruction", "seed"}, …]}``
    from an examples file (image paths made absolute), or empty lists without one."""
    examples = json.loads(Path(path).read_text()) if path is not None and Path(path).is_file() else {}
    for example in examples.get("edit", []):
        example["image"] = str(Path(path).parent / example["image"])
    return {kind: examples.get(kind, []) for kind in ("text_to_image", "edit")}
