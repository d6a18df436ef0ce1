"""Generation parameters stored in the PNGs themselves, as the page and the CLI write them.

Two text chunks, so that both kinds of readers find them: ``nextstep`` holds the parameters as
JSON (every setting, exactly), and ``parameters`` holds AUTOMATIC1111's plain-text layout, which
PNG Info readers and image boards show::

    a red circle
    Negative prompt: blurry
    Steps: 20, Sampler: v1, CFG scale: 3.0, Seed: 7, Size: 128x64, Model: assets/shapes-model, ...

The settings that layout has no name for follow as extra ``Key: value`` pairs. ``read_parameters``
takes either chunk (ours first), and also the JSON that earlier versions wrote under ``parameters``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image, PngImagePlugin

JSON_KEY = "nextstep"  # our chunk: the parameters as JSON
TEXT_KEY = "parameters"  # AUTOMATIC1111's chunk
NEGATIVE = "Negative prompt: "
# Setting -> its key in the plain-text layout (the first six are AUTOMATIC1111's own names).
TEXT_NAMES = {
    "num_sampling_steps": "Steps", "sampler": "Sampler", "cfg": "CFG scale", "seed": "Seed", "size": "Size",
    "model": "Model", "cfg_img": "Image CFG scale", "cfg_schedule": "CFG schedule",
    "timesteps_shift": "Time shift", "use_norm": "Use norm", "num_images": "Batch size",
    "positive_prompt": "Positive prompt", "family": "Family", "edit": "Edit", "quantization": "Quantization",
}
_FROM_TEXT = {text: name for name, text in TEXT_NAMES.items()}
# "Key: value" pairs; a value holding a comma, a colon or a quote is written as a JSON string.
_NEEDS_QUOTES = re.compile(r'[,:"]')
_PAIR = re.compile(r'\s*([^:,]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def to_text(parameters: dict) -> str:
    """The parameters in AUTOMATIC1111's plain-text layout."""
    lines = [parameters.get("prompt", "")]
    if parameters.get("negative_prompt"):
        lines.append(NEGATIVE + parameters["negative_prompt"])
    pairs = []
    for name, key in TEXT_NAMES.items():
        if name in parameters:
            value = str(parameters[name])
            pairs.append(f"{key}: {json.dumps(value) if _NEEDS_QUOTES.search(value) else value}")
    lines.append(", ".join(pairs))
    return "\n".join(lines)


def from_text(text: str) -> dict | None:
    """Parameters read back from ``to_text``'s layout (or another tool's), None if it is not one."""
    *head, last = text.strip().split("\n")
    pairs = _PAIR.findall(last)
    if not pairs or not head:
        return None
    values = {}
    for key, raw in pairs:
        name = _FROM_TEXT.get(key.strip())
        if name is not None:
            values[name] = _typed(name, json.loads(raw) if raw.startswith('"') else raw.strip())
    negative = [line for line in head if line.startswith(NEGATIVE)]
    values["prompt"] = "\n".join(line for line in head if not line.startswith(NEGATIVE))
    values["negative_prompt"] = negative[0][len(NEGATIVE):] if negative else ""
    return values


def _typed(name: str, value: str):
    if name in ("num_sampling_steps", "seed", "num_images"):
        return int(value)
    if name in ("cfg", "cfg_img", "timesteps_shift"):
        return float(value)
    if name in ("use_norm", "edit"):
        return value == "True"
    return value


def with_parameters(image: Image.Image, parameters: dict) -> Image.Image:
    """Attach parameters to an image; PNG writers (Gradio's included) store ``info`` text as text chunks."""
    image.info[JSON_KEY] = json.dumps(parameters, sort_keys=True)
    image.info[TEXT_KEY] = to_text(parameters)
    return image


def save_with_parameters(image: Image.Image, parameters: dict, path) -> None:
    """Write a PNG that carries its generation parameters in both chunks (as the page's do) to
    ``path`` (a file name, or a binary file)."""
    info = PngImagePlugin.PngInfo()
    info.add_text(JSON_KEY, json.dumps(parameters, sort_keys=True))
    info.add_text(TEXT_KEY, to_text(parameters))
    image.save(path, format="PNG", pnginfo=info)


def read_parameters(image: Image.Image | str | Path) -> dict | None:
    """The parameters stored in a PNG (either chunk, ours first), or None when it carries none.
    ValueError when a chunk is there but cannot be read."""
    if isinstance(image, Image.Image):
        info = image.info
    else:
        with Image.open(image) as opened:
            info = dict(opened.info)
    try:
        if info.get(JSON_KEY):
            return json.loads(info[JSON_KEY])
        text = info.get(TEXT_KEY)
        if not isinstance(text, str) or not text.strip():
            return None
        if text.lstrip().startswith("{"):  # earlier versions wrote JSON here, the size as [height, width]
            values = json.loads(text)
            if "hw" in values:
                height, width = values.pop("hw")
                values["size"] = f"{width}x{height}"
            return values
        return from_text(text)
    except (ValueError, TypeError) as error:  # JSONDecodeError is a ValueError
        raise ValueError(f"the picture's generation parameters could not be read ({error})") from None
