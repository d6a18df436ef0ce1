"""Generation parameters stored in the PNGs themselves, as the page and the CLI write them."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, PngImagePlugin

PARAMETERS_KEY = "parameters"  # PNG text chunk holding the generation parameters as JSON


def with_parameters(image: Image.Image, parameters: dict) -> Image.Image:
    """Attach parameters to an image; PNG writers (Gradio's included) store ``info`` text as tEXt chunks."""
    image.info[PARAMETERS_KEY] = json.dumps(parameters, sort_keys=True)
    return image


def save_with_parameters(image: Image.Image, parameters: dict, path: str | Path) -> None:
    """Write a PNG whose ``parameters`` text chunk holds the generation parameters (as the page's)."""
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, json.dumps(parameters, sort_keys=True))
    image.save(path, format="PNG", pnginfo=info)


def read_parameters(image: Image.Image | str | Path) -> dict | None:
    """The parameters stored in a PNG by ``with_parameters``, or None."""
    if not isinstance(image, Image.Image):
        with Image.open(image) as opened:
            text = opened.info.get(PARAMETERS_KEY)
    else:
        text = image.info.get(PARAMETERS_KEY)
    return json.loads(text) if text else None
