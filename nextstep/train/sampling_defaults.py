"""The sampling settings stored with a trained model, in ``generation_config.json``.

The file holds two sets of ``GenerationRequest`` keywords, ``text_to_image`` and ``edit``
(``hw``, ``num_sampling_steps``, ``cfg``, ``cfg_img``, ``timesteps_shift``, ``cfg_schedule``,
``use_norm``, ``sampler``, ``negative_prompt``), plus ``chosen_by``, how they were picked.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..pipeline import STORED_SETTINGS as FILE

BASE = dict(
    hw=[128, 128],
    num_sampling_steps=20,
    cfg=3.0,
    cfg_img=1.0,
    timesteps_shift=1.0,
    cfg_schedule="constant",
    use_norm=True,
    sampler="v1",
    negative_prompt="",
)
# Guidance values tried on the validation split; the rest stays as in BASE.
TEXT_TO_IMAGE_CANDIDATES = [dict(cfg=c) for c in (1.5, 3.0, 5.0)]
EDIT_CANDIDATES = [dict(cfg=c, cfg_img=ci) for c, ci in ((1.5, 1.0), (3.0, 1.0), (3.0, 1.5), (3.0, 2.0))]


def write_defaults(directory: Path, text_to_image: dict, edit: dict, chosen_by: str) -> None:
    values = {"text_to_image": dict(BASE, **text_to_image), "edit": dict(BASE, **edit), "chosen_by": chosen_by}
    (Path(directory) / FILE).write_text(json.dumps(values, indent=2) + "\n")


def read_defaults(directory: Path) -> dict:
    """{"text_to_image": {...}, "edit": {...}}; BASE where the model has no file."""
    path = Path(directory) / FILE
    values = json.loads(path.read_text()) if path.is_file() else {}
    return {kind: dict(BASE, **values.get(kind, {})) for kind in ("text_to_image", "edit")}
