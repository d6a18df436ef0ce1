"""The sampling settings stored with a trained model, in ``generation_config.json``.

The file holds two sets of ``GenerationRequest`` keywords, ``text_to_image`` and ``edit``
(``size``, ``num_sampling_steps``, ``cfg``, ``cfg_img``, ``timesteps_shift``, ``cfg_schedule``,
``use_norm``, ``sampler``, ``negative_prompt``), plus ``chosen_by``, how they were picked, and
``image_slot``, where edit prompts take the input image (as the model was trained).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ..engine.settings import STORED_SETTINGS as FILE
from .model_training import EDIT_IMAGE_SLOT

BASE = dict(
    size="128x128",
    num_sampling_steps=20,
    cfg=3.0,
    cfg_img=1.0,
    timesteps_shift=1.0,
    cfg_schedule="constant",
    use_norm=True,
    sampler="v1",
    negative_prompt="",
)
# Settings tried on the validation split, one stage after another, each stage around the best so
# far; the rest stays as in BASE. The value in BASE comes first, so that it wins ties.
TIMESTEP_SHIFTS = [dict(timesteps_shift=s) for s in (1.0, 0.5, 2.0)]
STEP_COUNTS = [dict(num_sampling_steps=n) for n in (20, 10, 30)]
TEXT_TO_IMAGE_SEARCH = [[dict(cfg=c) for c in (3.0, 1.5, 5.0)], TIMESTEP_SHIFTS, STEP_COUNTS]
EDIT_SEARCH = [
    [dict(cfg=c, cfg_img=ci) for c, ci in ((3.0, 1.0), (1.5, 1.0), (3.0, 1.5), (3.0, 2.0))],
    TIMESTEP_SHIFTS,
    STEP_COUNTS,
]


def coordinate_search(
    score: Callable[[dict], float], stages: list[list[dict]]
) -> tuple[dict, list[tuple[dict, float]]]:
    """The best settings found by trying each stage's candidates on top of the best so far:
    (changes to BASE, every (settings tried, score) in order). Settings met twice are scored once."""
    best: dict = {}
    scored: dict[str, tuple[dict, float]] = {}  # by the full settings; in the order first tried
    for stage in stages:
        results = []
        for candidate in stage:
            settings = dict(best, **candidate)
            key = json.dumps(dict(BASE, **settings), sort_keys=True)
            if key not in scored:
                scored[key] = (settings, score(settings))
            results.append((scored[key][1], settings))
        best = max(results, key=lambda result: result[0])[1]
    return best, list(scored.values())


def write_defaults(directory: Path, text_to_image: dict, edit: dict, chosen_by: str) -> None:
    values = {
        "text_to_image": dict(BASE, **text_to_image), "edit": dict(BASE, **edit), "chosen_by": chosen_by,
        "image_slot": EDIT_IMAGE_SLOT,
    }
    (Path(directory) / FILE).write_text(json.dumps(values, indent=2) + "\n")


def read_defaults(directory: Path) -> dict:
    """{"text_to_image": {...}, "edit": {...}}; BASE where the model has no file."""
    path = Path(directory) / FILE
    values = json.loads(path.read_text()) if path.is_file() else {}
    return {kind: dict(BASE, **values.get(kind, {})) for kind in ("text_to_image", "edit")}
