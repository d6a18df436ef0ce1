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
CAPTIONS = {"zh-CN": EXAMPLES / "captions.zh-CN.json"}  # example text -> its caption in that language
# Every release of StepFun's NextStep series: NextStep-1.1 (the current one, text to image), its
# pretrained checkpoints, and the NextStep-1 series, whose Large-Edit is the one edit release.
OFFICIAL_RELEASES = ("NextStep-1.1", "NextStep-1.1-Pretrain", "NextStep-1.1-Pretrain-256px",
                     "NextStep-1-Large", "NextStep-1-Large-Edit", "NextStep-1-Large-Pretrain")


def examples_for(model: str) -> Path | None:
    """The examples file that fits a model, or None."""
    path = Path(model)
    if path.is_dir() and path.resolve() == EMBEDDED_MODEL:
        return SHAPES_EXAMPLES
    return OFFICIAL_EXAMPLES if path.name in OFFICIAL_RELEASES else None


def load_examples(path: Path | None) -> dict[str, list[dict]]:
    """``{"text_to_image": [{"prompt", "seed", "caption_zh"}, …], "edit": [{"image", "instruction",
    "seed", "caption_zh"}, …]}`` from an examples file (image paths made absolute; the Chinese
    caption where ``CAPTIONS`` has one), or empty lists without one."""
    examples = json.loads(Path(path).read_text()) if path is not None and Path(path).is_file() else {}
    for example in examples.get("edit", []):
        example["image"] = str(Path(path).parent / example["image"])
    chinese = json.loads(CAPTIONS["zh-CN"].read_text()) if CAPTIONS["zh-CN"].is_file() else {}
    for example in [*examples.get("text_to_image", []), *examples.get("edit", [])]:
        text = example.get("prompt") or example.get("instruction")
        if text in chinese:
            example["caption_zh"] = chinese[text]
    return {kind: examples.get(kind, []) for kind in ("text_to_image", "edit")}
