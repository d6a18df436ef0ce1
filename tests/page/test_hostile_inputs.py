"""Hostile and odd input through the running app's API: each gets a clear message or a sensible
normalisation, never a crash, and a normal request right after it succeeds."""

from __future__ import annotations

import base64
import io
import json
import logging
import struct
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from gradio.utils import get_upload_folder
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image, PngImagePlugin

from nextstep.page.guard import PageLimits, UploadLedger

from ..conftest import ROOT
from ..pages import GENERATE, final_images, launched, tiny_services

pytestmark = pytest.mark.slow

EDIT = dict(prompt="Make it blue.", size="64x64", num_sampling_steps=2, seed=3, randomize_seed=False, preview="none")
QUICK = dict(GENERATE, size="64x64", num_sampling_steps=2, preview="none")


@pytest.fixture(scope="module")
def client():
    with launched(tiny_services()) as url:
        yield Client(url, verbose=False)


def still_serves(client: Client) -> None:
    assert final_images(client.predict(**QUICK, api_name="/generate"))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (the pixel data is a stub): a decompression bomb's
    calling card, cheap to make."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def saved(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def picture() -> Image.Image:
    image = Image.new("RGB", (64, 48), "blue")
    image.paste((255, 0, 0), (0, 0, 32, 24))
    return image


REFUSED = {
    "corrupt.png": (lambda: b"\x89PNG\r\n\x1a\n" + b"\x13" * 200, "could not be read as an image"),
    "truncated.png": (lambda: encoded(picture().resize((256, 256)), "PNG")[:300], "could not be read as an image"),
    "bomb.png": (lambda: png_header_only(30000, 30000), "too large"),
    "wide.png": (lambda: png_header_only(13000, 10), "too large"),
    "empty.png": (lambda: b"", "could not be read as an image"),
    "notes.png": (lambda: b"just some text, not a picture", "could not be read as an image"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unreadable_or_oversized_images_are_refused_clearly(client, tmp_path, name):
    make, message = REFUSED[name]
    with pytest.raises(AppError, match=message):
        client.predict(image=handle_file(saved(tmp_path, name, make())), **EDIT, api_name="/edit")
    still_serves(client)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (40, 40), colour) for colour in ("red", "green")]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    return encoded(picture(), "JPEG", exif=exif)


NORMALISED = {
    "rgba.png": lambda: encoded(picture().convert("RGBA"), "PNG"),
    "palette.png": lambda: encoded(picture().convert("P"), "PNG"),
    "grey.png": lambda: encoded(picture().convert("L"), "PNG"),
    "cmyk.jpg": lambda: encoded(picture().convert("CMYK"), "JPEG"),
    "deep.png": lambda: encoded(Image.fromarray(np.full((48, 64), 40000, dtype=np.uint16)), "PNG"),
    "animated.gif": animated_gif,
    "rotated.jpg": exif_rotated_jpeg,
}


@pytest.mark.parametrize("name", sorted(NORMALISED))
def test_odd_images_are_normalised_and_edited(client, tmp_path, name):
    outputs = client.predict(image=handle_file(saved(tmp_path, name, NORMALISED[name]())), **EDIT, api_name="/edit")
    [final] = final_images(outputs)
    assert Image.open(final).size == (64, 64)


BAD_SETTINGS = [
    (dict(prompt=""), "Enter a prompt"),
    (dict(prompt="   \n\t "), "Enter a prompt"),
    (dict(prompt="a red circle " * 400), "too long"),
    (dict(prompt=None), "Enter a prompt"),
    (dict(cfg="lots"), r"Text guidance must be a number between 1 and 15, got 'lots'"),
    (dict(cfg=0.2), r"Text guidance must be a number between 1 and 15, got 0.2"),
    (dict(num_sampling_steps=1e9), r"Sampling steps per token must be a whole number between 1 and 100"),
    (dict(num_images="two"), r"Images must be a whole number between 1 and 4, got 'two'"),
    (dict(num_images=2.5), r"Images must be a whole number between 1 and 4, got 2.5"),
    (dict(seed="abc"), r"Seed must be a whole number between 0 and 4294967295, got 'abc'"),
    (dict(size="99999x99999"), r"Size \(width × height\) must be one of .*got '99999x99999'"),
    (dict(cfg_schedule="cosine"), r"Guidance schedule must be one of constant, linear: got 'cosine'"),
    (dict(preview_every=0), r"Preview every N tokens must be a whole number between 1 and 64, got 0"),
    (dict(randomize_seed="false", seed=None), "Seed is empty"),  # "false" is false, not a true string
    (dict(randomize_seed="maybe"), r"Randomize seed must be true or false, got 'maybe'"),
    (dict(use_norm=1), r"Normalise tokens must be true or false, got 1"),
]
# Every control left empty (null over the API) gets a message that names it and what it takes.
EMPTY = {
    "size": r"Size \(width × height\) must be one of .*: it is empty",
    "num_images": "Images is empty: enter a whole number between 1 and 4",
    "cfg": "Text guidance is empty: enter a number between 1 and 15",
    "num_sampling_steps": "Sampling steps per token is empty",
    "timesteps_shift": "Time shift is empty: enter a number between 0.1 and 10",
    "cfg_schedule": "Guidance schedule must be one of constant, linear: it is empty",
    "sampler": "Sampler must be one of v1, sde, cps, ode: it is empty",
    "use_norm": "Normalise tokens must be true or false, got None",
    "randomize_seed": "Randomize seed must be true or false, got None",
    "preview": "Live preview must be one of vae, fast, none: it is empty",
    "preview_every": "Preview every N tokens is empty",
}
BAD_SETTINGS += [(dict(**{name: None}), message) for name, message in EMPTY.items()]
# Every control with a value of the wrong type and one out of its range: a message each, naming it.
NUMBERS = {  # name: (label, what it takes, out of range)
    "num_images": ("Images", "a whole number between 1 and 4", 5),
    "cfg": ("Text guidance", "a number between 1 and 15", 15.5),
    "num_sampling_steps": ("Sampling steps per token", "a whole number between 1 and 100", 0),
    "timesteps_shift": ("Time shift", "a number between 0.1 and 10", 10.5),
    "seed": ("Seed", "a whole number between 0 and 4294967295", -1),
    "preview_every": ("Preview every N tokens", "a whole number between 1 and 64", 65),
}
for name, (label, takes, outside) in NUMBERS.items():
    BAD_SETTINGS += [(dict(**{name: [3]}), rf"{label} must be {takes}, got \[3\]"),
                     (dict(**{name: outside}), rf"{label} must be {takes}, got {outside}")]
CHOICES = {  # name: the message's start
    "size": r"Size \(width × height\) must be one of 256x256, .*, 32x32",
    "cfg_schedule": "Guidance schedule must be one of constant, linear",
    "sampler": "Sampler must be one of v1, sde, cps, ode",
    "preview": "Live preview must be one of vae, fast, none",
}
for name, start in CHOICES.items():
    BAD_SETTINGS += [(dict(**{name: 42}), rf"{start}: got 42"), (dict(**{name: "nope"}), rf"{start}: got 'nope'")]
for name, label in (("use_norm", "Normalise tokens"), ("randomize_seed", "Randomize seed")):
    BAD_SETTINGS += [(dict(**{name: "yes"}), rf"{label} must be true or false, got 'yes'")]


@pytest.mark.parametrize("change, message", BAD_SETTINGS)
def test_bad_settings_get_a_message(client, change, message):
    with pytest.raises(AppError, match=message):
        client.predict(**dict(QUICK, **change), api_name="/generate")
    still_serves(client)


def test_control_characters_leave_the_prompt(client):
    outputs = client.predict(**dict(QUICK, prompt="a red\x00 circle\x1b[31m"), api_name="/generate")
    assert outputs[3]["prompt"] == "a red circle[31m"


def test_numbers_sent_as_text_are_read(client):
    outputs = client.predict(**dict(QUICK, cfg="2.5", num_sampling_steps="2", seed="11"), api_name="/generate")
    assert outputs[3]["cfg"] == 2.5 and outputs[3]["seed"] == 11


def test_a_number_as_prompt_is_read_as_text(client):
    assert client.predict(**dict(QUICK, prompt=12), api_name="/generate")[3]["prompt"] == "12"


def test_refused_input_logs_one_line_and_no_traceback(client, capfd, caplog):
    capfd.readouterr()
    with caplog.at_level(logging.INFO, logger="nextstep.page"):
        with pytest.raises(AppError, match="Text guidance"):
            client.predict(**dict(QUICK, cfg=0.2), api_name="/generate")
    lines = [record.getMessage() for record in caplog.records if record.name == "nextstep.page"]
    assert lines == ["refused: Text guidance must be a number between 1 and 15, got 0.2"]
    assert "Traceback" not in capfd.readouterr().err


def test_a_png_with_a_huge_text_chunk_is_too_large_not_damaged(client, tmp_path):
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "a" * 5_000_000, zip=True)  # a few kB on disk, 5 MB once inflated
    path = tmp_path / "bomb.png"
    picture().save(path, pnginfo=info)
    with pytest.raises(AppError, match="too large"):
        client.predict(image=handle_file(str(path)), **EDIT, api_name="/edit")


# ---- image payloads that name what is not theirs -------------------------------------------------


def raw_call(url: str, api: str, **body) -> tuple[str, object]:
    """``POST /gradio_api/call/v2/<api>`` with ``body`` exactly as given (a client library would
    upload files first and mark them), then the stream's closing (event, data)."""
    event_id = httpx.post(f"{url}gradio_api/call/v2/{api}", json=body, timeout=60).json()["event_id"]
    return raw_events(url, f"call/v2/{api}", event_id)


def raw_events(url: str, call: str, event_id: str) -> tuple[str, object]:
    """The closing (event, data) of a call's stream."""
    event = None
    with httpx.stream("GET", f"{url}gradio_api/{call}/{event_id}", timeout=120) as answer:
        for line in answer.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: ") and event in ("complete", "error"):
                return event, json.loads(line.removeprefix("data: "))
    raise AssertionError("the stream ended without a result or an error")


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """Every file PIL opens while the test runs (the server runs in this process)."""
    names, open_image = [], Image.open

    def recording(source, *args, **kwargs):
        names.append(str(getattr(source, "name", source)))
        return open_image(source, *args, **kwargs)

    monkeypatch.setattr(Image, "open", recording)
    return names


@pytest.fixture
def server_paths() -> dict[str, str]:
    """Paths a visitor has no business naming: a real picture of the server's, a folder, a missing
    file, and a link placed in the upload folder that leads out of it."""
    link = Path(get_upload_folder()) / "nextstep-test-link.png"
    link.unlink(missing_ok=True)
    link.symlink_to(ROOT / "docs" / "screenshot.png")
    yield {"picture": str(ROOT / "docs" / "screenshot.png"), "folder": str(ROOT), "missing": "/nonexistent/x.png",
           "link out": str(link)}
    link.unlink()


@pytest.mark.parametrize("payload", ["bare", "marked as uploaded", "url"])
def test_an_image_payload_naming_a_server_file_is_refused_with_one_message(client, server_paths, opened, payload):
    messages = set()
    for name, path in server_paths.items():
        image = {"bare": {"path": path}, "marked as uploaded": {"path": path, "meta": {"_type": "gradio.FileData"}},
                 "url": {"url": f"file://{path}", "path": path}}[payload]
        event, data = raw_call(client.src, "edit", image=image, **EDIT)
        assert event == "error", f"{name}: the request must be refused"
        messages.add(str(data))
    assert len(messages) == 1, f"one message whatever exists on the server: {messages}"
    assert "uploaded through this page" in messages.pop()
    assert not [name for name in opened if "screenshot" in name or name.startswith(str(ROOT))], "nothing opened"
    still_serves(client)


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_an_inline_picture_over_the_pixel_limit_is_refused_from_its_header(client, monkeypatch):
    loaded, load = [], Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda image: (loaded.append(image.size), load(image))[1])
    event, data = raw_call(client.src, "edit", image={"url": data_url(png_header_only(11000, 11000))}, **EDIT)
    assert event == "error" and "too large" in str(data)
    assert (11000, 11000) not in loaded, "no pixel of it was decoded"
    still_serves(client)


def test_inline_pictures_are_edited_and_count_against_the_upload_budget():
    ledger = UploadLedger(per_client=2_000_000, total=10_000_000, window=3600)
    with launched(tiny_services(), PageLimits(uploads=ledger)) as url:
        small = data_url(encoded(picture(), "PNG"))
        event, data = raw_call(url, "edit", image={"url": small}, **EDIT)
        assert event == "complete" and data[3]["edit"] is True
        # A PNG of noise does not compress: 1.2 MB each, so the second is beyond the visitor's 2 MB.
        noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (640, 640, 3), dtype=np.uint8))
        big = data_url(encoded(noise, "PNG"))
        assert raw_call(url, "edit", image={"url": big}, **EDIT)[0] == "complete"
        event, data = raw_call(url, "edit", image={"url": big}, **EDIT)
        assert event == "error" and "Too many uploads" in str(data)


MALFORMED = {  # (endpoint, route, body, the message's start)
    "no arguments": ("generate", "call/v2", {}, "The call could not be read: No value provided for required argument: prompt"),
    "no values": ("generate", "call", {"data": []}, "This call gave 0 of the 15 values generate takes: Prompt, "),
    "one value": ("generate", "call", {"data": ["a red circle"]}, "This call gave 1 of the 15 values generate takes"),
    "image as text": ("edit", "call/v2", dict(EDIT, image="abc"), "The input image must be a file uploaded"),
    "image as a number": ("edit", "call/v2", dict(EDIT, image=5), "The input image must be a file uploaded"),
    "image as a list": ("edit", "call/v2", dict(EDIT, image=[1, 2]), "The input image must be a file uploaded"),
    "image as a web address": ("edit", "call/v2", dict(EDIT, image={"url": "http://127.0.0.1:9/x.png"}),
                               "The input image must be a file uploaded"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_call_gets_a_message_and_one_log_line(client, case, capfd, caplog):
    api, route, body, message = MALFORMED[case]
    capfd.readouterr()
    with caplog.at_level(logging.INFO, logger="nextstep.page"):
        answer = httpx.post(f"{client.src}gradio_api/{route}/{api}", json=body, timeout=60)
        if answer.status_code == 200:
            event, data = raw_events(client.src, f"{route}/{api}", answer.json()["event_id"])
            assert event == "error"
            shown = data["error"]
        else:
            assert answer.status_code == 422
            shown = answer.json()["error"]
    assert shown and shown.startswith(message)
    lines = [record.getMessage() for record in caplog.records if record.name == "nextstep.page"]
    assert lines == [f"refused: {shown}"]
    assert "Traceback" not in capfd.readouterr().err
    still_serves(client)
