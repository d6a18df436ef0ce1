"""Hostile and odd user input becomes a clean value or a ValueError a user can act on."""

import io
import math
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from nextstep.engine import inputs
from nextstep.engine.inputs import (
    MAX_INPUT_PIXELS,
    MAX_INPUT_SIDE,
    MAX_TEXT_CHARS,
    clean_text,
    load_image,
    number,
)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` but holds almost no pixel data: costs nothing to
    make, and any attempt to decode it fails, so only a check on the header can refuse it as
    too large."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def noise_png() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return encoded(Image.fromarray(pixels), "PNG")


def near(pixel, expected, tolerance=6) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected))


# ---- sources -------------------------------------------------------------------------------


def test_path_string_and_bytes_give_the_same_rgb_image(tmp_path):
    picture = Image.new("RGB", (5, 3), (10, 20, 30))
    picture.putpixel((4, 2), RED)
    path = tmp_path / "picture.png"
    picture.save(path)
    for source in (path, str(path), path.read_bytes(), bytearray(path.read_bytes()), picture):
        image = load_image(source)
        assert image.mode == "RGB" and image.size == (5, 3)
        assert image.getpixel((0, 0)) == (10, 20, 30) and image.getpixel((4, 2)) == RED


def test_a_given_pil_image_is_not_modified():
    picture = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    image = load_image(picture)
    assert image is not picture and picture.mode == "RGBA" and image.getpixel((0, 0)) == WHITE


def test_tiny_image_is_accepted():
    image = load_image(encoded(Image.new("RGB", (1, 1), BLUE), "PNG"))
    assert image.size == (1, 1) and image.getpixel((0, 0)) == BLUE


def test_result_carries_no_metadata():
    exif = Image.Exif()
    exif[0x0112] = 1
    image = load_image(encoded(Image.new("RGB", (8, 8), GREEN), "JPEG", exif=exif))
    assert image.info == {}


@pytest.mark.parametrize("source", [3, None, ["picture.png"]])
def test_unknown_source_type(source):
    with pytest.raises(ValueError, match="image must be a PIL image, a file path or bytes"):
        load_image(source)


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="could not open the image file 'absent.png'"):
        load_image(tmp_path / "absent.png")


# ---- unreadable files ----------------------------------------------------------------------


def test_empty_file_and_empty_bytes(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    for source in (path, b""):
        with pytest.raises(ValueError, match="could not be read as an image: it is empty"):
            load_image(source)


def test_text_file(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("a red circle on a white background\n")
    with pytest.raises(ValueError, match="'notes.png' could not be read as an image: it is not a PNG, JPEG"):
        load_image(path)


def test_corrupt_bytes():
    with pytest.raises(ValueError, match="could not be read as an image"):
        load_image(bytes(range(256)) * 4)


def test_corrupt_pixel_data():
    data = bytearray(noise_png())
    data[100:400] = b"\xff" * 300  # inside the compressed pixel stream
    with pytest.raises(ValueError, match="could not be read as an image: the file is damaged"):
        load_image(bytes(data))


def test_damaged_header():
    data = bytearray(noise_png())
    data[16:20] = b"\xff\xff\xff\xff"  # the IHDR width, now far beyond any sane size and failing its checksum
    with pytest.raises(ValueError, match="could not be read as an image"):
        load_image(bytes(data))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_is_refused_and_pillow_settings_are_untouched(tmp_path, fmt):
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encoded(Image.fromarray(pixels), fmt)
    path = tmp_path / f"half.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="could not be read as an image: the file is damaged or incomplete"):
        load_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_format_outside_the_accepted_list():
    with pytest.raises(ValueError, match="could not be read as an image: it is not a PNG"):
        load_image(encoded(Image.new("RGB", (4, 4), RED), "PPM"))


# ---- size limits ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "width, height",
    [
        (8_000, 6_000),  # 48 MP: under Pillow's limit, over ours
        (10_000, 10_000),  # 100 MP: Pillow only warns (DecompressionBombWarning)
        (20_000, 20_000),  # 400 MP: Pillow raises DecompressionBombError
        (MAX_INPUT_SIDE + 1, 10),  # few pixels, but one side too long
    ],
)
def test_too_large_is_refused_from_the_header(width, height):
    pillow_limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="too large"):
            load_image(png_header(width, height))
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert Image.MAX_IMAGE_PIXELS == pillow_limit


def test_size_in_the_message():
    with pytest.raises(ValueError, match=f"8000x6000 pixels; at most {MAX_INPUT_SIDE} pixels a side and 40 megapixels"):
        load_image(png_header(8_000, 6_000))


def test_limit_holds_for_a_given_pil_image():
    with pytest.raises(ValueError, match="the image is too large"):
        load_image(Image.new("L", (MAX_INPUT_SIDE + 1, 1)))


def test_pixel_limit_applies_to_well_formed_pictures(monkeypatch):
    monkeypatch.setattr(inputs, "MAX_INPUT_PIXELS", 99)
    with pytest.raises(ValueError, match="10x10 pixels"):
        load_image(encoded(Image.new("RGB", (10, 10)), "PNG"))
    assert load_image(encoded(Image.new("RGB", (9, 11)), "PNG")).size == (9, 11)


def test_default_limits():
    assert (MAX_INPUT_PIXELS, MAX_INPUT_SIDE, MAX_TEXT_CHARS) == (40_000_000, 12_000, 2_000)


# ---- modes ---------------------------------------------------------------------------------


def test_palette_transparency_becomes_white():
    picture = Image.new("P", (4, 2), 0)
    picture.putpalette([*RED, *BLUE])
    picture.paste(1, (2, 0, 4, 2))
    image = load_image(encoded(picture, "PNG", transparency=0))
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == WHITE and image.getpixel((3, 1)) == BLUE


def test_rgba_transparent_red_becomes_white():
    picture = Image.new("RGBA", (6, 2), (255, 0, 0, 0))
    picture.paste((0, 255, 0, 255), (2, 0, 4, 2))
    picture.paste((0, 0, 0, 128), (4, 0, 6, 2))
    image = load_image(encoded(picture, "PNG"))
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == WHITE  # not red: the colour under alpha 0 is not shown
    assert image.getpixel((2, 0)) == GREEN
    assert image.getpixel((4, 0)) == (127, 127, 127)  # half-transparent black over white


@pytest.mark.parametrize(
    "picture, expected",
    [
        (Image.new("LA", (2, 2), (0, 0)), WHITE),
        (Image.new("PA", (2, 2), (0, 0)), WHITE),
        (Image.new("RGBa", (2, 2), (0, 0, 0, 0)), WHITE),
        (Image.new("La", (2, 2), (0, 0)), WHITE),
        (Image.new("L", (2, 2), 77), (77, 77, 77)),
        (Image.new("1", (2, 2), 1), WHITE),
        (Image.new("P", (2, 2), 0), (0, 0, 0)),
        (Image.new("RGBX", (2, 2), (1, 2, 3, 0)), (1, 2, 3)),
        (Image.new("HSV", (2, 2), (0, 255, 255)), RED),
    ],
)
def test_modes_become_rgb(picture, expected):
    image = load_image(picture)
    assert image.mode == "RGB" and image.getpixel((1, 1)) == expected


@pytest.mark.parametrize(
    "picture, expected",
    [
        (Image.new("YCbCr", (2, 2), (76, 85, 255)), RED),
        (Image.new("LAB", (2, 2), (255, 128, 128)), WHITE),
    ],
)
def test_colour_spaces_become_rgb(picture, expected):
    image = load_image(picture)
    assert image.mode == "RGB" and near(image.getpixel((1, 1)), expected)


def test_palette_with_alpha_in_the_palette():
    picture = Image.new("P", (2, 2), 0)
    picture.putpalette([255, 0, 0, 0], rawmode="RGBA")
    assert load_image(picture).getpixel((0, 0)) == WHITE


def test_rgb_colour_key_becomes_white():
    picture = Image.new("RGB", (2, 1), RED)
    picture.putpixel((1, 0), BLUE)
    image = load_image(encoded(picture, "PNG", transparency=RED))
    assert image.getpixel((0, 0)) == WHITE and image.getpixel((1, 0)) == BLUE


def test_cmyk_jpeg():
    picture = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    data = encoded(picture, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    image = load_image(data)
    assert image.mode == "RGB" and near(image.getpixel((4, 4)), RED)


SIXTEEN_BIT = np.array([[0, 257 * 100, 32896, 65535]], dtype=np.uint16)
EIGHT_BIT = [0, 100, 128, 255]


def test_sixteen_bit_png_is_scaled_not_clipped():
    data = encoded(Image.fromarray(SIXTEEN_BIT), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    image = load_image(data)
    assert image.mode == "RGB"
    assert [image.getpixel((x, 0)) for x in range(4)] == [(v, v, v) for v in EIGHT_BIT]


def test_sixteen_bit_values_round_to_nearest():
    picture = Image.fromarray(np.array([[128, 129, 257 * 200 + 128, 257 * 200 + 129]], dtype=np.uint16))
    assert [load_image(picture).getpixel((x, 0))[0] for x in range(4)] == [0, 1, 200, 201]


def test_big_endian_sixteen_bit():
    picture = Image.new("I;16B", (4, 1))
    for x, value in enumerate(SIXTEEN_BIT[0]):
        picture.putpixel((x, 0), int(value))
    assert [load_image(picture).getpixel((x, 0))[0] for x in range(4)] == EIGHT_BIT


def test_sixteen_bit_transparent_key_becomes_white():
    data = encoded(Image.fromarray(SIXTEEN_BIT), "PNG", transparency=0)
    image = load_image(data)
    assert image.getpixel((0, 0)) == WHITE and image.getpixel((1, 0)) == (100, 100, 100)


def test_thirty_two_bit_integer_is_read_as_sixteen_bit_and_clipped():
    picture = Image.fromarray(np.array([[-5, 257 * 100, 65535, 1_000_000]], dtype=np.int32))
    assert picture.mode == "I"
    assert [load_image(picture).getpixel((x, 0))[0] for x in range(4)] == [0, 100, 255, 255]


def test_float_is_read_as_zero_to_one_and_clipped():
    picture = Image.fromarray(np.array([[0.0, 0.5, 1.0, 2.0, -1.0, math.nan]], dtype=np.float32))
    assert picture.mode == "F"
    assert [load_image(picture).getpixel((x, 0))[0] for x in range(6)] == [0, 128, 255, 255, 0, 0]


def test_float_tiff_file(tmp_path):
    path = tmp_path / "depth.tif"
    Image.fromarray(np.full((3, 3), 0.25, dtype=np.float32)).save(path)
    assert load_image(path).getpixel((1, 1)) == (64, 64, 64)


@pytest.mark.parametrize("fmt, options", [("GIF", {}), ("WEBP", {"lossless": True}), ("PNG", {})])
def test_animation_gives_its_first_frame(fmt, options):
    frames = [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), BLUE)]
    data = encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, **options)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    image = load_image(data)
    assert image.mode == "RGB" and image.getpixel((4, 4)) == RED


def test_multi_picture_camera_jpeg_gives_its_first_picture():
    pictures = [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), BLUE)]
    data = encoded(pictures[0], "MPO", save_all=True, append_images=pictures[1:], quality=95)
    assert Image.open(io.BytesIO(data)).format == "MPO"
    assert near(load_image(data).getpixel((4, 4)), RED)


def test_exif_orientation_is_applied():
    """Orientation 6: the camera was turned, the picture must be rotated 90 degrees clockwise,
    which brings its left side to the top."""
    picture = Image.new("RGB", (40, 20), RED)
    picture.paste(BLUE, (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    image = load_image(encoded(picture, "JPEG", exif=exif, quality=95))
    assert image.mode == "RGB" and image.size == (20, 40)
    assert near(image.getpixel((10, 5)), RED) and near(image.getpixel((10, 35)), BLUE)


# ---- text ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, ""),
        ("", ""),
        ("   ", ""),
        ("  a red circle \n", "a red circle"),
        ("a\tred\ncircle\r\nnow", "a red circle  now"),
        ("line\u2028break\x85here", "line break here"),
        ("\x00a\x07 red\x1b[31m circle", "a red[31m circle"),
        ("zero\u200bwidth\ufeff", "zerowidth"),
        ("\u202eelcric der a", "elcric der a"),
        ("hidden\U000e0041\U000e0042 tags", "hidden tags"),
        ("lone\ud800 surrogate", "lone surrogate"),
        ("\u00adsoft", "soft"),
        ("café 東京 \u00a0x", "café 東京 \u00a0x"),
        ("\U0001f469\u200d\U0001f4bb joined \u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645", None),
    ],
)
def test_clean_text(value, expected):
    assert clean_text(value, "prompt") == (value if expected is None else expected)


@pytest.mark.parametrize("value", [3, 1.5, b"a red circle", ["a red circle"], True])
def test_text_must_be_text(value):
    with pytest.raises(ValueError, match="negative_prompt must be text"):
        clean_text(value, "negative_prompt")


def test_text_length_limit():
    assert clean_text("x" * MAX_TEXT_CHARS, "prompt") == "x" * MAX_TEXT_CHARS
    assert clean_text("x" * MAX_TEXT_CHARS + "\x00" * 5 + "   ", "prompt") == "x" * MAX_TEXT_CHARS
    message = f"prompt is too long: {MAX_TEXT_CHARS + 1} characters, at most {MAX_TEXT_CHARS}"
    with pytest.raises(ValueError, match=message):
        clean_text("x" * (MAX_TEXT_CHARS + 1), "prompt")
    with pytest.raises(ValueError, match="caption is too long: 12 characters, at most 10"):
        clean_text("a red circle", "caption", max_chars=10)


def test_huge_text_is_refused_quickly():
    with pytest.raises(ValueError, match="prompt is too long: 10000000 characters"):
        clean_text("\x00" * 10_000_000, "prompt")


# ---- numbers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, kwargs, expected",
    [
        (7.5, {}, 7.5),
        (7, {}, 7.0),
        ("7.5", {}, 7.5),
        (" 1e-3 ", {}, 0.001),
        ("-2", {}, -2.0),
        (np.float32(0.25), {}, 0.25),
        (42, {"integer": True}, 42),
        (" 42 ", {"integer": True}, 42),
        (4.0, {"integer": True}, 4),
        ("4.0", {"integer": True}, 4),
        (np.int64(3), {"integer": True}, 3),
        ("9223372036854775807", {"integer": True}, 2**63 - 1),  # every digit kept
        (1, {"minimum": 1, "maximum": 10}, 1.0),
        (10, {"minimum": 1, "maximum": 10, "integer": True}, 10),
    ],
)
def test_number_accepts(value, kwargs, expected):
    result = number(value, "cfg", **kwargs)
    assert result == expected and type(result) is type(expected)


@pytest.mark.parametrize(
    "value, kwargs, message",
    [
        (True, {}, "cfg must be a number, got True"),
        (None, {}, "cfg must be a number, got None"),
        ("abc", {}, "cfg must be a number, got 'abc'"),
        ("", {}, "cfg must be a number"),
        ("7,5", {}, "cfg must be a number"),
        (b"7", {}, "cfg must be a number"),
        ([7], {}, "cfg must be a number"),
        (math.nan, {}, "cfg must be a finite number"),
        ("nan", {}, "cfg must be a finite number"),
        (math.inf, {}, "cfg must be a finite number"),
        ("-inf", {"integer": True}, "cfg must be a finite number"),
        ("9" * 100_000, {}, r"cfg must be a finite number, got '9{36}\.\.\.$"),  # the message stays short
        (10**400, {}, "cfg must be a finite number"),
        (7.5, {"integer": True}, "cfg must be a whole number, got 7.5"),
        ("7.5", {"integer": True}, "cfg must be a whole number, got '7.5'"),
        (0, {"minimum": 1}, "cfg must be at least 1, got 0"),
        (11, {"maximum": 10}, "cfg must be at most 10, got 11"),
        ("0.5", {"minimum": 1.0, "maximum": 10.0}, r"cfg must be between 1.0 and 10.0, got 0.5"),
        (12, {"minimum": 1, "maximum": 10, "integer": True}, "cfg must be between 1 and 10, got 12"),
    ],
)
def test_number_refuses(value, kwargs, message):
    with pytest.raises(ValueError, match=message):
        number(value, "cfg", **kwargs)
