"""Scoring pictures of the shapes world with code: colour segmentation and simple geometry.

Every pixel is labelled with its nearest palette colour; the background is the colour most
common along the border; each other colour, after an erosion that strips blended edge pixels
and thin colour fringes, is one object. Its centroid gives the grid cell, its bounding box the
size, and its outline the shape (see ``classify_shape``).

``python -m nextstep.train.evaluate assets/shapes-model`` generates from held-out scene specs
with the model's stored sampling defaults and prints every figure.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..engine.sizes import Size
from ..models.quantize import QUANTIZATIONS
from ..pipeline import NextStepPipeline
from .sampling_defaults import (
    BASE,
    EDIT_SEARCH,
    TEXT_TO_IMAGE_SEARCH,
    coordinate_search,
    read_defaults,
)
from .vae_training import psnr, reconstruct, to_pixels
from .world import (
    CELLS,
    COLOURS,
    EDIT_KINDS,
    PALETTE,
    SIZE_FRACTION,
    Obj,
    Scene,
    caption,
    random_edit,
    random_scene,
    render,
)

ERODE = 2  # pixels stripped from every colour region: blended edges and thin colour fringes
MIN_AREA = 20  # pixels left after erosion for a colour to count as an object
# An object at least this share of a cell wide is large: halfway between the two sizes drawn.
LARGE_FROM = (SIZE_FRACTION["small"] + SIZE_FRACTION["large"]) / 2
PALETTE_RGB = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)


@dataclass(frozen=True)
class Detected:
    colour: str
    cell: str
    shape: str
    size: str
    area: int


def label_colours(image: Image.Image) -> np.ndarray:
    """(H, W) index of the nearest palette colour of every pixel."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    distances = ((pixels[:, :, None, :] - PALETTE_RGB[None, None]) ** 2).sum(-1)
    return distances.argmin(-1)


def erode(mask: np.ndarray) -> np.ndarray:
    """Keep pixels whose 3x3 neighbourhood is all in the mask (the border counts as outside)."""
    padded = np.pad(mask, 1)
    h, w = mask.shape
    out = np.ones_like(mask)
    for dy in range(3):
        for dx in range(3):
            out &= padded[dy : dy + h, dx : dx + w]
    return out


def classify_shape(mask: np.ndarray) -> str:
    """Triangle when the top quarter is much narrower than the bottom one (they point up);
    otherwise square or circle by how much of the bounding box is filled (1 against pi/4)."""
    ys, xs = np.nonzero(mask)
    rows = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    widths = rows.sum(axis=1)
    quarter = max(1, len(widths) // 4)
    if widths[:quarter].mean() < 0.55 * widths[-quarter:].mean():
        return "triangle"
    return "square" if rows.mean() > 0.86 else "circle"


def measure(mask: np.ndarray, colour: str) -> Detected:
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    col = min(int(xs.mean() / (w / 3)), 2)
    row = min(int(ys.mean() / (h / 3)), 2)
    extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1 + 2 * ERODE
    size = "large" if extent > LARGE_FROM * w / 3 else "small"
    return Detected(colour, CELLS[row * 3 + col], classify_shape(mask), size, len(xs))


def read_scene(image: Image.Image) -> tuple[str, list[Detected]]:
    """(background colour, objects found), objects largest first."""
    labels = label_colours(image)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    background = int(np.bincount(border, minlength=len(COLOURS)).argmax())
    found = []
    for index, colour in enumerate(COLOURS):
        if index == background:
            continue
        mask = labels == index
        for _ in range(ERODE):
            mask = erode(mask)
        if mask.sum() >= MIN_AREA:
            found.append(measure(mask, colour))
    return COLOURS[background], sorted(found, key=lambda d: -d.area)


def match(objects: tuple[Obj, ...], found: list[Detected]) -> list[Detected | None]:
    """Pair each wanted object with a found one: same colour first, else same cell, else the largest left."""
    left = list(found)
    pairs: list[Detected | None] = [None] * len(objects)
    for rule in (lambda o, d: d.colour == o.colour, lambda o, d: d.cell == o.cell, lambda o, d: True):
        for i, obj in enumerate(objects):
            if pairs[i] is None:
                pick = next((d for d in left if rule(obj, d)), None)
                if pick is not None:
                    pairs[i] = pick
                    left.remove(pick)
    return pairs


def score_scene(image: Image.Image, scene: Scene) -> dict[str, float]:
    """Per-attribute correctness of one picture against its spec: background, count, and the
    fraction of objects with the right colour, position, shape and size; ``all`` when everything is."""
    background, found = read_scene(image)
    pairs = match(scene.objects, found)
    n = len(scene.objects)

    def share(attribute: str) -> float:
        return sum(d is not None and getattr(d, attribute) == getattr(o, attribute) for o, d in zip(scene.objects, pairs)) / n

    scores = {
        "background": float(background == scene.background),
        "count": float(len(found) == n),
        "colour": share("colour"),
        "position": share("cell"),
        "shape": share("shape"),
        "size": share("size"),
    }
    scores["all"] = float(all(v == 1.0 for v in scores.values()))
    return scores


def shape_hits(image: Image.Image, scene: Scene) -> list[tuple[str, bool]]:
    """For each object of the spec: its size and shape (e.g. "small square") and whether the
    object read back for it has that shape."""
    found = match(scene.objects, read_scene(image)[1])
    return [(f"{o.size} {o.shape}", d is not None and d.shape == o.shape) for o, d in zip(scene.objects, found)]


def share_by_kind(hits: list[tuple[str, bool]]) -> dict[str, float]:
    """Share of right shapes for each size and shape, from ``shape_hits``."""
    kinds = sorted({kind for kind, _ in hits})
    return {kind: float(np.mean([hit for k, hit in hits if k == kind])) for kind in kinds}


def unchanged_mask(source: Scene, target: Scene, size: int, margin: int = 3) -> np.ndarray:
    """Pixels an edit should leave alone: equal in both renders, ``margin`` pixels away from any change."""
    changed = np.any(np.asarray(render(source, size)) != np.asarray(render(target, size)), axis=-1)
    keep = ~changed
    for _ in range(margin):
        keep = erode(keep)
    return keep


def masked_psnr(a: Image.Image, b: Image.Image, mask: np.ndarray) -> float:
    x = np.asarray(a.convert("RGB"), dtype=np.float64)[mask]
    y = np.asarray(b.convert("RGB"), dtype=np.float64)[mask]
    mse = max(((x - y) ** 2).mean(), 1e-10) if len(x) else 1e-10
    return float(10 * np.log10(255**2 / mse))


def score_edit(output: Image.Image, source: Scene, target: Scene, input_image: Image.Image) -> dict[str, float]:
    size = output.size[0]
    return {
        "success": score_scene(output, target)["all"],
        "untouched_psnr": masked_psnr(output, input_image, unchanged_mask(source, target, size)),
    }


def average(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: float(np.mean([row[key] for row in rows])) for key in rows[0]} if rows else {}


# ---- held-out sets -------------------------------------------------------------------------


def held_out_scenes(count: int, num_objects: int, split: str = "test", seed: int = 1234) -> list[Scene]:
    rng = random.Random(f"{seed}-{num_objects}-{split}")
    return [random_scene(rng, num_objects, split=split) for _ in range(count)]


def held_out_edits(count: int, split: str = "test", seed: int = 1234):
    """Edits of held-out scenes, the kinds in turn."""
    rng = random.Random(f"{seed}-edits-{split}")
    edits = []
    while len(edits) < count:
        kind = EDIT_KINDS[len(edits) % len(EDIT_KINDS)]
        scene = random_scene(rng, rng.choice((1, 2)) if kind != "remove" else 2, split=split)
        edit = random_edit(scene, rng, kind)
        if edit.kind == kind:
            edits.append(edit)
    return edits


# ---- running a model -----------------------------------------------------------------------


def evaluate_text_to_image(pipe, scenes: list[Scene], settings: dict, seed: int = 0) -> dict:
    """The averaged ``score_scene`` figures, and ``shape_by_kind`` (see ``share_by_kind``)."""
    rng = random.Random(seed)
    rows, hits = [], []
    for i, scene in enumerate(scenes):
        image = pipe.generate(caption(scene, rng), seed=seed + i, **settings).images[0]
        rows.append(score_scene(image, scene))
        hits.extend(shape_hits(image, scene))
    return dict(average(rows), shape_by_kind=share_by_kind(hits))


def evaluate_edits(pipe, edits, settings: dict, seed: int = 0) -> dict:
    rows = []
    for i, edit in enumerate(edits):
        source_image = render(edit.source, Size.parse(settings["size"]).height)
        output = pipe.generate(edit.instruction, source_image, seed=seed + i, **settings).images[0]
        rows.append(score_edit(output, edit.source, edit.target, source_image))
    return average(rows)


@torch.no_grad()
def vae_psnr(vae, scenes: list[Scene], size: int = 128) -> float:
    pixels = to_pixels([render(s, size) for s in scenes])
    return psnr(reconstruct(vae, pixels), pixels)


def timed_generation(pipe, settings: dict, repeats: int = 3) -> float:
    """Best of ``repeats`` wall-clock seconds for one text-to-image generation."""
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        pipe.generate("a large red circle in the center on a white background", seed=i, **settings)
        times.append(time.perf_counter() - start)
    return min(times)


def tune_defaults(pipe, singles: int, pairs: int, edits: int) -> tuple[dict, dict, str]:
    """Pick the sampling settings that score best on the validation split (never the test split)."""
    single_scenes = held_out_scenes(singles, 1, split="validation")
    pair_scenes = held_out_scenes(pairs, 2, split="validation")
    edit_set = held_out_edits(edits, split="validation")

    def text_score(candidate: dict) -> float:
        settings = dict(BASE, **candidate)
        rows = [evaluate_text_to_image(pipe, s, settings) for s in (single_scenes, pair_scenes)]
        return float(np.mean([row[k] for row in rows for k in ("background", "colour", "position", "shape")]))

    def edit_score(candidate: dict) -> float:
        figures = evaluate_edits(pipe, edit_set, dict(BASE, **candidate))
        return figures["success"] + 0.01 * figures["untouched_psnr"]  # PSNR breaks ties

    text_to_image, text_tried = coordinate_search(text_score, TEXT_TO_IMAGE_SEARCH)
    edit, edit_tried = coordinate_search(edit_score, EDIT_SEARCH)
    note = (
        f"best validation score of a stage-by-stage search over guidance, time shift and step count "
        f"({singles} single-object and {pairs} two-object captions, {edits} edits); text-to-image: "
        + "; ".join(f"{c} -> {s:.3f}" for c, s in text_tried)
        + "; edit: "
        + "; ".join(f"{c} -> {s:.3f}" for c, s in edit_tried)
    )
    return text_to_image, edit, note


def full_report(pipe, settings: dict, singles: int, pairs: int, edits: int) -> dict:
    """Every figure of the model card, on the test split."""
    return {
        "vae_psnr_db": vae_psnr(pipe.vae, held_out_scenes(64, None)),
        "single_object": evaluate_text_to_image(pipe, held_out_scenes(singles, 1), settings["text_to_image"]),
        "two_objects": evaluate_text_to_image(pipe, held_out_scenes(pairs, 2), settings["text_to_image"]),
        "edits": evaluate_edits(pipe, held_out_edits(edits), settings["edit"]),
        "seconds_per_128px_image": timed_generation(pipe, settings["text_to_image"]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="model directory, e.g. assets/shapes-model")
    parser.add_argument("--singles", type=int, default=100, help="held-out single-object prompts")
    parser.add_argument("--pairs", type=int, default=50, help="held-out two-object prompts")
    parser.add_argument("--edits", type=int, default=50, help="held-out edits (the five kinds in turn)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--threads", type=int, default=1, help="1 is fastest for this small model on 2 busy cores")
    parser.add_argument("--quantize", choices=QUANTIZATIONS, help="quantize the backbone's weights while loading")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = NextStepPipeline.from_pretrained(args.model, quantize=args.quantize)  # quantized while loading
    settings = read_defaults(args.model)
    report = full_report(pipe, settings, args.singles, args.pairs, args.edits)
    report["settings"], report["threads"], report["quantize"] = settings, args.threads, args.quantize
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
