"""Helpers for tests that launch the page (in process) and talk to it as a client would."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from contextlib import contextmanager

import numpy as np
from gradio_client import Client
from PIL import Image

import app
from nextstep.loading.options import RuntimeOptions
from nextstep.page.layout import build_demo, launch
from nextstep.serving.compose import Services

from .conftest import TINY, deliver_previews_before_next_token

INPUT_IMAGE = TINY / "input_edit.png"
# 128x64 is 8x4 = 32 tokens on the tiny model: quick, non-square, and long enough for many previews.
GENERATE = dict(
    prompt="a red circle", negative_prompt="", positive_prompt="", size="128x64", num_images=1, cfg=3.0,
    num_sampling_steps=4, timesteps_shift=1.0, cfg_schedule="constant", seed=7, randomize_seed=False, preview="vae",
    preview_every=2,
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


TINY_OPTIONS = RuntimeOptions(model=str(TINY / "model"), vae=str(TINY / "vae"), device="cpu", dtype="float32")


def tiny_services(frame_interval: float = 0.0) -> Services:
    """The page's services on the tiny model, each preview delivered before the next token is
    sampled (``deliver_previews_before_next_token``)."""
    services = app.serve_models(TINY_OPTIONS, frame_interval)
    deliver_previews_before_next_token(services.generator.pipe.engine)
    return services


def held_until_stopped(engine, monkeypatch) -> threading.Event:
    """Make the engine's token loop wait after each token until its text-to-image requests are
    cancelled, so that a generation is certain to be running when Stop lands, whatever the
    machine's speed (edits run as usual). Returns an event set once a held loop is running."""
    running = threading.Event()
    decode = engine.decode

    def held(runs, *args, **kwargs):
        for done in decode(runs, *args, **kwargs):
            yield done
            running.set()
            for run in runs:
                while not run.request.edit and not run.sink.cancelled:
                    run.sink._cancelled.wait(60)
                    assert run.sink.cancelled, "Stop never reached the request"

    monkeypatch.setattr(engine, "decode", held)
    return running


@contextmanager
def launched(services: Services, limits=None):
    """The page on a free local port (under ``limits``: ``PageLimits``, default ones without); yields its URL."""
    demo = build_demo(services, limits)
    _, url, _ = launch(demo, "127.0.0.1", free_port(), prevent_thread_lock=True, quiet=True)
    try:
        yield url
    finally:
        demo.close()


def run(client: Client, api_name: str, **inputs) -> tuple[list[np.ndarray], tuple]:
    """(the preview pictures streamed before the final images, the final outputs)."""
    job = client.submit(api_name=api_name, **inputs)
    previews = []
    for preview, gallery, *_ in job:
        if isinstance(gallery, list) and gallery:
            break
        if preview is not None:
            previews.append(preview_pixels(preview))
    return previews, job.outputs()[-1]


def preview_pixels(preview: dict) -> np.ndarray:
    """A live preview frame's picture: it arrives inside the stream, as a data URL, never as a file."""
    assert preview["path"] is None and preview["url"].startswith("data:image/jpeg;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(preview["url"].split(",", 1)[1]))))


def pixels(path: str) -> np.ndarray:
    return np.asarray(Image.open(path))


def final_images(outputs: tuple) -> list[str]:
    return [item["image"] for item in outputs[1]]


def start_held_generation(services: Services, client: Client, monkeypatch):
    """A generation whose token loop waits for Stop (``held_until_stopped``), returned once it runs."""
    running = held_until_stopped(services.generator.pipe.engine, monkeypatch)
    job = client.submit(api_name="/generate", **dict(GENERATE, preview="fast"))
    assert running.wait(60), "the generation started"
    return job


def start_held(client: Client, inputs: dict, timeout: float = 60.0):
    """A generation of ``inputs`` that holds its back end until stopped (``tests/serving/holds.py``),
    returned once the page shows its first progress frame."""
    job = client.submit(api_name="/generate", **inputs)

    def shows_progress() -> bool:
        return any(isinstance(o[2], str) and o[2].startswith("Tokens") for o in job.outputs())

    wait_until(lambda: shows_progress() or job.done(), "the held request shows its progress", timeout)
    assert shows_progress(), "the held request started"
    return job


def got_result(job) -> bool:
    return any(isinstance(o[1], list) and o[1] for o in job.outputs())


def wait_until(condition, what: str, timeout: float = 30.0) -> None:
    """Poll ``condition`` (a state of the server: the model is free, a request waits) until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)
