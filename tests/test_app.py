"""The Gradio app through its API (gradio_client against a launched server) and its serving helpers."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import gradio
import numpy as np
import pytest
import yaml
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

import app
from nextstep.pnginfo import read_parameters
from nextstep.serving import SharedPipeline, load_examples
from nextstep.sizes import Size, closest_size

from .conftest import ROOT, TINY, deliver_previews_before_next_token, tiny_with_stored_settings

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


def tiny_services(frame_interval: float = 0.0) -> app.Services:
    """The page's services on the tiny model, each preview delivered before the next token is
    sampled (``deliver_previews_before_next_token``)."""
    services = app.load_services(str(TINY / "model"), None, str(TINY / "vae"), "cpu", "float32", frame_interval)
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
def launched(services: app.Services, limits=None):
    """The app on a free local port (under ``limits``: app.PageLimits, default ones without); yields its URL."""
    demo = app.build_demo(services, limits)
    _, url, _ = app.serve(demo, "127.0.0.1", free_port(), prevent_thread_lock=True, quiet=True)
    try:
        yield url
    finally:
        demo.close()


@pytest.fixture(scope="module")
def served():
    services = tiny_services()
    with launched(services) as url:
        yield url, services


@pytest.fixture
def client(served) -> Client:
    return Client(served[0], verbose=False)


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


# ---- through the API ----------------------------------------------------------------------


@pytest.mark.slow
def test_generate_streams_previews_then_a_png_with_its_parameters(client):
    previews, outputs = run(client, "/generate", **GENERATE)
    distinct = {preview.tobytes() for preview in previews}
    assert len(distinct) >= 3, "the preview should change several times before the final image"
    [final] = final_images(outputs)
    image = Image.open(final)
    assert image.format == "PNG" and image.size == (128, 64)
    stored = read_parameters(final)
    assert stored["prompt"] == "a red circle" and stored["seed"] == 7
    assert stored["size"] == "128x64" and stored["num_sampling_steps"] == 4 and stored["cfg"] == 3.0
    _, _, status, shown, seed = outputs
    assert shown == stored, "the page shows the parameters the PNG carries"
    assert seed == 7 and status.startswith("Done") and "tokens/s" in status


@pytest.mark.slow
def test_status_line_reports_progress(client):
    statuses = [status for _, _, status, *_ in client.submit(api_name="/generate", **GENERATE)]
    progress = [s for s in statuses if isinstance(s, str) and s.startswith("Tokens")]
    assert progress and all("/32" in s and "tokens/s" in s and "elapsed" in s and "ETA" in s for s in progress)


@pytest.mark.slow
def test_same_seed_same_image_other_seed_differs(client):
    quick = dict(GENERATE, preview="none")
    first = pixels(final_images(run(client, "/generate", **quick)[1])[0])
    again = pixels(final_images(run(client, "/generate", **quick)[1])[0])
    other = pixels(final_images(run(client, "/generate", **dict(quick, seed=8))[1])[0])
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.slow
def test_randomized_seed_is_reported_and_reproduces(client):
    _, outputs = run(client, "/generate", **dict(GENERATE, preview="none", randomize_seed=True, seed=0))
    seed = outputs[4]
    assert read_parameters(final_images(outputs)[0])["seed"] == seed
    _, again = run(client, "/generate", **dict(GENERATE, preview="none", seed=seed))
    assert np.array_equal(pixels(final_images(outputs)[0]), pixels(final_images(again)[0]))


@pytest.mark.slow
def test_several_images_per_request(client):
    _, outputs = run(client, "/generate", **dict(GENERATE, size="64x64", num_images=2, preview="fast"))
    images = final_images(outputs)
    assert len(images) == 2 and all(Image.open(path).size == (64, 64) for path in images)
    assert preview_pixels(outputs[0]).shape[:2] == (64, 128), "the preview shows both pictures side by side"


@pytest.mark.slow
def test_edit_streams_previews_then_a_png_with_its_parameters(client):
    inputs = dict(image=handle_file(str(INPUT_IMAGE)), prompt="Make it blue.", size="64x64", num_sampling_steps=4,
                  seed=3, randomize_seed=False, preview_every=2)
    previews, outputs = run(client, "/edit", **inputs)
    assert len({preview.tobytes() for preview in previews}) >= 3
    [final] = final_images(outputs)
    assert Image.open(final).size == (64, 64)
    stored = read_parameters(final)
    assert stored["edit"] is True and stored["prompt"] == "Make it blue." and stored["seed"] == 3
    # The Edit tab's defaults are the official editing settings.
    assert stored["negative_prompt"] == "Copy original image." and stored["timesteps_shift"] == 3.2
    assert stored["cfg_img"] == 2.0
    again = final_images(run(client, "/edit", **dict(inputs, preview="none"))[1])[0]
    assert np.array_equal(pixels(final), pixels(again))


@pytest.mark.slow
def test_edit_without_an_image_says_so(client):
    with pytest.raises(AppError, match="input image"):
        client.predict(image=None, prompt="Make it blue.", api_name="/edit")


@pytest.mark.slow
def test_pipeline_errors_reach_the_page_as_messages(client):
    # Found only once the prompt is tokenised, with the model in hand.
    with pytest.raises(AppError, match="positions"):
        client.predict(**dict(GENERATE, prompt="x y " * 490), api_name="/generate")
    # The failed request gave the model back.
    assert final_images(run(client, "/generate", **dict(GENERATE, preview="none"))[1])


@pytest.mark.slow
def test_concurrent_requests_do_not_mix(served):
    requests = [dict(GENERATE, size="64x64", seed=seed, preview="fast") for seed in (11, 12, 13)]
    alone = [pixels(final_images(run(Client(served[0], verbose=False), "/generate", **r)[1])[0]) for r in requests]
    jobs = [Client(served[0], verbose=False).submit(api_name="/generate", **r) for r in requests]
    together = [pixels(final_images(job.result())[0]) for job in jobs]
    # Decoded together, each request keeps its own image: the only change allowed is the
    # rounding of batched matrix products, at most 1 of 255 on a pixel (the parity tolerance).
    for mine, own in zip(together, alone):
        assert np.abs(mine.astype(int) - own.astype(int)).max() <= 1
        assert (mine != own).mean() < 0.01
    assert not np.array_equal(together[0], together[1])


def start_held_generation(services: app.Services, client: Client, monkeypatch):
    """A generation whose token loop waits for Stop (``held_until_stopped``), returned once it runs."""
    running = held_until_stopped(services.generator.pipe.engine, monkeypatch)
    job = client.submit(api_name="/generate", **dict(GENERATE, preview="fast"))
    assert running.wait(60), "the generation started"
    return job


def got_result(job) -> bool:
    return any(isinstance(o[1], list) and o[1] for o in job.outputs())


@pytest.mark.slow
def test_stop_frees_the_model_within_a_second(served, client, monkeypatch):
    _, services = served
    job = start_held_generation(services, client, monkeypatch)
    assert services.generator.busy
    job.cancel()
    stopped = time.monotonic()
    while services.generator.busy:
        assert time.monotonic() - stopped < 1.0, "the model should be free within a second of Stop"
        time.sleep(0.01)
    assert not got_result(job), "no final image after Stop"


@pytest.mark.slow
def test_stop_ends_only_that_request(served, client, monkeypatch):
    url, services = served
    job = start_held_generation(services, client, monkeypatch)
    # An edit: the held loop holds text-to-image requests only.
    waiting = Client(url, verbose=False).submit(api_name="/edit", image=handle_file(str(INPUT_IMAGE)),
                                                prompt="Make it blue.", size="64x64", num_sampling_steps=2,
                                                seed=3, randomize_seed=False, preview="none")
    job.cancel()
    assert final_images(waiting.result(timeout=60)), "the request queued behind the stopped one completes"
    assert not got_result(job)


@pytest.mark.slow
def test_without_an_edit_model_the_edit_tab_explains():
    services = tiny_services()
    services.editor = None
    with launched(services) as url:
        page = Client(url, verbose=False)
        with pytest.raises(AppError, match="--edit-model"):
            page.predict(image=handle_file(str(INPUT_IMAGE)), prompt="Make it blue.", api_name="/edit")
        assert "No edit-capable model" in str(page.config)


# ---- command line --------------------------------------------------------------------------


def test_missing_default_model_names_the_flag(monkeypatch, capsys):
    monkeypatch.delenv("NEXTSTEP_MODEL", raising=False)
    monkeypatch.setattr(app, "DEFAULT_MODEL", "assets/no-such-model")
    with pytest.raises(SystemExit) as exit_:
        app.parse_args([])
    assert exit_.value.code == 2
    assert "--model" in capsys.readouterr().err


def test_flags_have_environment_equivalents(monkeypatch):
    monkeypatch.setenv("NEXTSTEP_MODEL", "some/model")
    monkeypatch.setenv("NEXTSTEP_DTYPE", "bfloat16")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7999")
    args = app.parse_args([])
    assert (args.model, args.dtype, args.port, args.host) == ("some/model", "bfloat16", 7999, "127.0.0.1")
    assert app.parse_args(["--port", "8000"]).port == 8000
    monkeypatch.setenv("NEXTSTEP_THREADS", "3")
    assert app.parse_args([]).threads == 3
    assert app.parse_args([]).cache_limit == 1024
    monkeypatch.setenv("NEXTSTEP_CACHE_MB", "64")
    assert app.parse_args([]).cache_limit == 64


def test_unloadable_model_is_a_message_not_a_traceback():
    done = subprocess.run([sys.executable, "app.py", "--model", "/no/such/model"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0
    assert "--model" in done.stderr and "Traceback" not in done.stderr


# ---- serving helpers ------------------------------------------------------------------------


def test_sizes_come_from_the_model(tiny_pipe):
    engine = tiny_pipe.engine
    sizes = engine.sizes(edit=False)
    assert all(s.width % engine.down_factor == 0 and s.height % engine.down_factor == 0 for s in sizes)
    assert Size(128, 64) in sizes and Size(64, 128) in sizes and Size(256, 256) in sizes
    # Editing inlines the input image too, so it leaves room for fewer output tokens.
    assert Size(256, 256) not in engine.sizes(edit=True)
    assert closest_size(640, 480, sizes, area=256 * 256) == Size(256, 192)
    assert closest_size(640, 480, sizes, area=128 * 128) == Size(128, 96)
    assert closest_size(300, 100, sizes, area=64 * 64) == Size(96, 48)
    assert Size.parse("128x64") == Size(width=128, height=64) == Size.parse((128, 64))


def test_defaults_follow_the_family_then_the_official_edit_then_the_models_stored_settings(tiny_pipe, tmp_path):
    assert tiny_pipe.defaults(edit=False)["num_sampling_steps"] == 50
    assert tiny_pipe.defaults(edit=False)["size"] == Size(256, 256)  # the largest square it supports
    edit = tiny_pipe.defaults(edit=True)
    assert (edit["negative_prompt"], edit["cfg_img"], edit["timesteps_shift"]) == ("Copy original image.", 2.0, 3.2)
    trained = tiny_with_stored_settings(tmp_path, {
        "text_to_image": {"size": "64x64", "num_sampling_steps": 20, "use_norm": False}, "edit": {"cfg_img": 1.5}
    })
    stored = trained.defaults(edit=False)
    assert (stored["size"], stored["num_sampling_steps"], stored["use_norm"]) == (Size(64, 64), 20, False)
    assert trained.defaults(edit=True)["cfg_img"] == 1.5


def test_examples_file(tmp_path):
    assert load_examples(tmp_path / "missing.json") == {"text_to_image": [], "edit": []}
    (tmp_path / "examples.json").write_text(json.dumps({
        "text_to_image": [{"prompt": "a red circle", "seed": 1}],
        "edit": [{"image": "input.png", "instruction": "Make it blue.", "seed": 2}],
    }))
    examples = load_examples(tmp_path / "examples.json")
    assert examples["text_to_image"][0]["prompt"] == "a red circle"
    assert examples["edit"][0]["image"] == str(tmp_path / "input.png")


async def collect(frames, count: int | None = None) -> list:
    """The first ``count`` frames (all when None); stopping early closes the stream."""
    taken = []
    async for frame in frames:
        taken.append(frame)
        if len(taken) == count:
            break
    await frames.aclose()
    return taken


def test_frames_are_throttled_and_the_result_always_arrives(tiny_pipe):
    shared = SharedPipeline(tiny_pipe, frame_interval=60.0)
    ticket = shared.submit("a red circle", size=(64, 64), num_sampling_steps=2, preview_every=1, seed=1)
    frames = asyncio.run(collect(shared.frames(ticket)))
    assert len(frames) == 2 and frames[0].done == 1 and frames[-1].result is not None
    assert read_parameters(frames[-1].result.images[0])["seed"] == 1


def test_closing_a_stream_frees_the_model(tiny_pipe):
    shared = SharedPipeline(tiny_pipe, frame_interval=0.0)
    ticket = shared.submit("a red circle", size=(64, 64), num_sampling_steps=2, seed=1)
    assert shared.busy
    asyncio.run(collect(shared.frames(ticket), count=1))  # then closed: the request leaves at the next token
    assert ticket.wait_left(30)
    assert not shared.busy and ticket.cancelled


def test_invalid_settings_fail_before_taking_the_model(tiny_pipe):
    shared = SharedPipeline(tiny_pipe)
    with pytest.raises(ValueError, match="multiples of 16"):
        shared.submit("a red circle", size=(64, 60))
    assert not shared.busy


# ---- front page ------------------------------------------------------------------------------


def test_readme_is_a_valid_spaces_card():
    text = (ROOT / "README.md").read_text()
    assert text.startswith("---\n")
    card = yaml.safe_load(text.split("---\n")[1])
    assert card["sdk"] == "gradio" and card["sdk_version"] == gradio.__version__
    assert (ROOT / card["app_file"]).is_file() and str(card["python_version"]).startswith("3.")
    assert len(card["short_description"]) <= 60
    assert (ROOT / "docs" / "screenshot.png").stat().st_size < 300_000


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = readme.split("## Run the tests")[1].split("```bash\n")[1].split("\n```")[0]
    assert command in (ROOT / ".ci" / "run").read_text()
