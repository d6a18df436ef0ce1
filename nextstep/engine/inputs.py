"""User input -> clean values, or a ValueError whose message a user can act on.

``load_image(source)`` accepts a PIL image, a file path or the file's bytes and returns a fully
loaded RGB image. What it does with odd input:

Refused with ValueError
  * empty files, files that are not pictures, and formats other than PNG, JPEG, WebP, GIF, BMP,
    TIFF and AVIF ("... could not be read as an image ...");
  * damaged or truncated files ("... could not be read as an image: the file is damaged or
    incomplete"), rather than pictures filled in with grey (with Pillow's default of
    ``ImageFile.LOAD_TRUNCATED_IMAGES = False``, which this module leaves alone);
  * pictures larger than ``MAX_INPUT_SIDE`` pixels on a side or ``MAX_INPUT_PIXELS`` pixels in
    all, judged from the header before any pixel is decoded, and anything Pillow flags as a
    decompression bomb ("... is too large ...");
  * a path that cannot be opened ("could not open the image file ...");
  * anything else as ``source`` ("image must be ...").

Normalised
  * EXIF orientation is applied, so a photo taken sideways comes out upright;
  * animated GIF, WebP and PNG give their first frame;
  * transparency (alpha channels, transparent palette entries and colour keys) is composited
    over white;
  * every other mode (1, L, P, CMYK, YCbCr, LAB, HSV, RGBX, ...) is converted to RGB;
  * 16-bit grey ("I;16", "I;16B", ...) is scaled to 8 bits as value / 257, rounded; 32-bit
    integer grey ("I") is read the same way after clipping to 0..65535, since that is how
    16-bit files usually arrive in that mode; floating-point grey ("F") is read as 0..1,
    clipped, with NaN taken as black;
  * 1x1 pictures and other tiny ones are accepted as they are;
  * the result carries no metadata: EXIF, ICC profile and transparency keys are dropped.

Pillow's global settings (``Image.MAX_IMAGE_PIXELS``, ``ImageFile.LOAD_TRUNCATED_IMAGES``) are
left as they are.

``clean_text(value, name)`` and ``number(value, name, ...)`` do the same for text fields and
numeric settings, and ``data_url_bytes(url, max_bytes)`` reads an image sent inline as a ``data:``
URL into the file's bytes, undecoded (``load_image`` then checks its header); see their docstrings.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import numbers
import os
import unicodedata
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_INPUT_PIXELS = 40_000_000
MAX_INPUT_SIDE = 12_000
MAX_TEXT_CHARS = 2_000

# Pillow can open dozens of formats, some through outside programs (EPS runs Ghostscript): only
# these are tried. Camera JPEGs holding several pictures (MPO) open as JPEG.
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
_FORMAT_NAMES = "PNG, JPEG, WebP, GIF, BMP, TIFF or AVIF"

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_HIGH_DEPTH_MODES = (*_SIXTEEN_BIT_MODES, "I", "F")
_WHITE = (255, 255, 255, 255)

# Joiners are format characters that carry meaning: Persian and Indic spelling, emoji sequences.
_KEPT_FORMAT_CHARS = {"\u200c", "\u200d"}
_REMOVED_CATEGORIES = {"Cc", "Cf", "Cs"}

_SHOWN_CHARS = 40  # of a refused value, in messages


# ---- images --------------------------------------------------------------------------------


def load_image(source) -> Image.Image:
    """A PIL image, a file path or a file's bytes -> a fully loaded RGB image (see the module
    docstring for what is refused and what is normalised)."""
    if isinstance(source, Image.Image):
        return _normalise(source, "the image")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _read(io.BytesIO(source), "the uploaded image")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            file = path.open("rb")
        except OSError as error:
            raise ValueError(f"could not open the image file {path.name!r}: {error.strerror or error}") from error
        with file:
            return _read(file, f"the file {path.name!r}")
    raise ValueError(f"image must be a PIL image, a file path or bytes, got {type(source).__name__}")


def _read(file, label: str) -> Image.Image:
    if not file.read(1):
        raise ValueError(f"{label} could not be read as an image: it is empty")
    file.seek(0)
    # Pillow only warns between MAX_IMAGE_PIXELS and twice that; the filter makes it an error
    # here alone. The filter is process-wide while active, so the pixel limit checked in
    # _normalise remains the guard that holds regardless.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(file, formats=ACCEPTED_FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise _too_large(label) from error
        except UnidentifiedImageError as error:
            raise ValueError(
                f"{label} could not be read as an image: it is not a {_FORMAT_NAMES} file, or it is damaged"
            ) from error
        except Exception as error:  # a damaged header makes format plugins raise all kinds of errors
            if "too large" in str(error):  # Pillow's limits on metadata (PNG text chunks), a bomb of its own
                raise ValueError(f"{label} is too large: its metadata exceeds what is read") from error
            raise ValueError(f"{label} could not be read as an image: the file is damaged") from error
    with image:
        return _normalise(image, label)


def _normalise(image: Image.Image, label: str) -> Image.Image:
    _check_size(image.size, label)
    try:
        image.load()  # for an opened file, the first frame
        upright = ImageOps.exif_transpose(image)
    except Exception as error:  # Pillow's decoders signal damaged data with many exception types
        raise ValueError(f"{label} could not be read as an image: the file is damaged or incomplete") from error
    rgb = _to_rgb(upright)
    rgb.info.clear()
    return rgb


def _check_size(size: tuple[int, int], label: str) -> None:
    width, height = size
    if max(width, height) > MAX_INPUT_SIDE or width * height > MAX_INPUT_PIXELS:
        raise _too_large(label, f"{width}x{height} pixels; ")


def _too_large(label: str, found: str = "") -> ValueError:
    return ValueError(
        f"{label} is too large: {found}at most {MAX_INPUT_SIDE} pixels a side "
        f"and {MAX_INPUT_PIXELS / 1e6:g} megapixels in all"
    )


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _HIGH_DEPTH_MODES:
        image = _to_eight_bit(image)
    if not image.has_transparency_data:
        return image.convert("RGB")
    if image.mode == "La":  # premultiplied grey has no direct route to RGBA
        image = image.convert("LA")
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")


def _to_eight_bit(image: Image.Image) -> Image.Image:
    """High-depth grey -> "L", or "LA" when a transparent value is keyed (16-bit grey PNGs)."""
    values = np.asarray(image)
    if image.mode == "F":
        scaled = np.nan_to_num(values, nan=0.0).clip(0.0, 1.0) * 255
    else:
        scaled = values.clip(0, 65535) / 257
    grey = np.rint(scaled).astype(np.uint8)
    key = image.info.get("transparency")
    if not isinstance(key, int):
        return Image.fromarray(grey)
    alpha = np.where(values == key, 0, 255).astype(np.uint8)
    return Image.fromarray(np.stack([grey, alpha], axis=-1))


def data_url_bytes(url: str, max_bytes: int) -> bytes:
    """The file inside a ``data:[type];base64,DATA`` URL, as bytes: nothing is decoded as a picture
    here. Refused with ValueError: text that is not such a URL, data that is not base64, and
    files over ``max_bytes`` (judged from the URL's length, before anything is decoded)."""
    head, comma, data = url.partition(",")
    if not head.startswith("data:") or not comma or not head.endswith(";base64"):
        raise ValueError("an image sent inline must be a base64 data: URL (data:image/png;base64,...)")
    if len(data) > 4 * -(-max_bytes // 3):  # base64 takes 4 characters for every 3 bytes
        raise ValueError(f"the image is too large: at most {max_bytes / 2**20:g} MB a file")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the image's data: URL does not hold valid base64") from None


# ---- text ----------------------------------------------------------------------------------


def clean_text(value, name: str, max_chars: int = MAX_TEXT_CHARS) -> str:
    """A text field -> the text a model should see.

    None gives "" (an optional field left out). Line breaks, tabs and other control whitespace
    become spaces; other control and invisible format characters (zero-width spaces, byte-order
    marks, direction overrides, tag characters, lone surrogates) are removed, except the
    zero-width joiner and non-joiner; surrounding whitespace is stripped. Empty text is
    returned as it is: whether it is allowed is the caller's decision.

    Raises ValueError for anything but text ("<name> must be text") and for text longer than
    ``max_chars`` after cleaning ("<name> is too long: N characters, at most M").
    """
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be text, got {type(value).__name__}")
    # Refused before cleaning, so that huge input costs little; only text made mostly of
    # control characters could have fitted after cleaning.
    if len(value) > 4 * max_chars:
        raise _too_long(name, len(value), max_chars)
    if not value.isprintable():
        value = "".join(_clean_char(char) for char in value)
    value = value.strip()
    if len(value) > max_chars:
        raise _too_long(name, len(value), max_chars)
    return value


def _too_long(name: str, length: int, max_chars: int) -> ValueError:
    return ValueError(f"{name} is too long: {length} characters, at most {max_chars}")


def _clean_char(char: str) -> str:
    category = unicodedata.category(char)
    if char.isspace() and category != "Zs":  # "\n", "\t", "\r", line and paragraph separators
        return " "
    if category in _REMOVED_CATEGORIES and char not in _KEPT_FORMAT_CHARS:
        return ""
    return char


# ---- numbers -------------------------------------------------------------------------------


def number(value, name: str, minimum=None, maximum=None, integer: bool = False) -> int | float:
    """A numeric setting -> int (``integer=True``) or float, within [minimum, maximum].

    Accepts ints, floats (numpy's too) and numeric text such as "7.5" or " 42 " (API clients send
    strings); a whole float such as 4.0 passes as an integer. Raises ValueError naming ``name``
    for booleans, None, other types and non-numeric text ("must be a number"), NaN and infinity
    ("must be a finite number"), fractions where an integer is needed ("must be a whole number")
    and values out of range ("must be at least" / "at most" / "between ... and ...").
    """
    parsed = _parse_number(value, name)
    if isinstance(parsed, float) and not math.isfinite(parsed):
        raise ValueError(f"{name} must be a finite number, got {clipped_repr(value)}")
    if integer:
        if isinstance(parsed, float) and not parsed.is_integer():
            raise ValueError(f"{name} must be a whole number, got {clipped_repr(value)}")
        parsed = int(parsed)
    _check_range(parsed, name, minimum, maximum)
    if integer:
        return parsed
    try:
        return float(parsed)
    except OverflowError:  # an int beyond float range, with no maximum to stop it
        raise ValueError(f"{name} must be a finite number, got {clipped_repr(value)}") from None


def _parse_number(value, name: str) -> int | float:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return value if isinstance(value, numbers.Integral) else float(value)
    if isinstance(value, str):
        text = value.strip()
        # int first, so that large whole numbers (seeds) keep every digit
        for parse in (int, float):
            try:
                return parse(text)
            except ValueError:
                pass
    raise ValueError(f"{name} must be a number, got {clipped_repr(value)}")


def _check_range(value: int | float, name: str, minimum, maximum) -> None:
    below = minimum is not None and value < minimum
    above = maximum is not None and value > maximum
    if not (below or above):
        return
    if minimum is not None and maximum is not None:
        allowed = f"between {minimum} and {maximum}"
    else:
        allowed = f"at least {minimum}" if below else f"at most {maximum}"
    raise ValueError(f"{name} must be {allowed}, got {value}")


def clipped_repr(value) -> str:
    """``repr(value)``, cut short for a message."""
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."
