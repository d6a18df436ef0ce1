"""Example prompts and edit instructions for the app, checked against the trained model.

Writes ``examples/edit_input.png`` (a held-out scene) and ``examples/examples.json``: text
prompts and instructions for that picture, each with whether the model got it right at the
stored settings and the seed given (scored by ``evaluate``), the ones it got right first.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..engine.sizes import Size
from .evaluate import held_out_scenes, score_edit, score_scene
from .world import EDIT_KINDS, Obj, Scene, caption, random_edit, render

# A test-split scene: the model never saw it in training.
EDIT_INPUT = Scene("orange", (Obj("circle", "red", "large", "top left"), Obj("square", "green", "small", "bottom right")))


def write_examples(pipe, settings: dict, directory: Path, prompts: int = 12, seed: int = 0) -> dict:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    text_examples = []
    for scene in held_out_scenes(prompts // 2, 1, split="validation") + held_out_scenes(prompts // 2, 2, split="validation"):
        text = caption(scene, rng)
        image = pipe.generate(text, seed=seed, **settings["text_to_image"]).images[0]
        text_examples.append({"prompt": text, "seed": seed, "correct": score_scene(image, scene)["all"] == 1.0})

    size = Size.parse(settings["edit"]["size"]).height
    source_image = render(EDIT_INPUT, size)
    source_image.save(directory / "edit_input.png")
    edit_examples = []
    for kind in EDIT_KINDS:
        for _ in range(2):
            edit = random_edit(EDIT_INPUT, rng, kind)
            output = pipe.generate(edit.instruction, source_image, seed=seed, **settings["edit"]).images[0]
            figures = score_edit(output, edit.source, edit.target, source_image)
            edit_examples.append(
                {"instruction": edit.instruction, "image": "edit_input.png", "seed": seed, "kind": kind,
                 "correct": figures["success"] == 1.0, "untouched_psnr_db": round(figures["untouched_psnr"], 1)}
            )
    examples = {
        "text_to_image": sorted(text_examples, key=lambda e: not e["correct"]),
        "edit": sorted(edit_examples, key=lambda e: not e["correct"]),
    }
    (directory / "examples.json").write_text(json.dumps(examples, indent=2) + "\n")
    return examples
