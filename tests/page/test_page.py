"""The page through its API (gradio_client against a launched server): streaming, seeds, edits,
messages, concurrent requests, Stop."""

from __future__ import annotations

import base64
import io
import os
import threading

import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from nextstep.engine.preview import MARKER, NEUTRAL
from nextstep.page.i18n import LANGUAGE
from nextstep.page.visitors import reservation_note
from nextstep.pnginfo import read_parameters
from nextstep.serving.quota import QuotaExceeded, QuotaLedger, QuotaPolicy
from nextstep.serving.service import Order, Visitor
from nextstep.serving.zerogpu import GpuService, GpuTask

from ..pages import (
    GENERATE,
    INPUT_IMAGE,
    final_images,
    got_result,
    launched,
    pixels,
    preview_pixels,
    run,
    start_held_generation,
    tiny_services,
)


@pytest.fixture(scope="module")
def served():
    services = tiny_services()
    with launched(services) as url:
        yield url, services


@pytest.fixture
def client(served) -> Client:
    return Client(served[0], verbose=False)


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


@pytest.mark.slow
def test_identical_results_never_rewrite_a_file_being_downloaded(served):
    """Four readers download one result again and again while identical ones (the same seed) are
    made: the file is never written over, and every body arrives whole."""
    url, _ = served
    quick = dict(GENERATE, preview="none")
    client = Client(url, verbose=False, download_files=False)
    [first] = client.predict(**quick, api_name="/generate")[1]
    path, address = first["image"]["path"], first["image"]["url"]
    before = os.stat(path)
    bodies, done = [], threading.Event()

    def download() -> None:
        while not done.is_set():
            answer = httpx.get(address, timeout=60)
            bodies.append((int(answer.headers["content-length"]), answer.content))

    readers = [threading.Thread(target=download) for _ in range(4)]
    for reader in readers:
        reader.start()
    try:
        for _ in range(3):
            assert client.predict(**quick, api_name="/generate")[1]
    finally:
        done.set()
        for reader in readers:
            reader.join()
    after = os.stat(path)
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)
    assert bodies and all(len(body) == length for length, body in bodies)
    assert all(Image.open(io.BytesIO(body)).size == (128, 64) for _, body in bodies)


def test_the_reservation_note_shows_what_the_request_reserves_and_what_fits(tiny_pipe):
    service = GpuService(GpuTask([tiny_pipe], 0.0, lambda task, **reservation: task), 0, QuotaLedger(QuotaPolicy()))
    visitor = Visitor("address:a")
    order = Order("a picture", settings=dict(size="64x64", num_sampling_steps=2, num_images=1), visitor=visitor)
    seconds = service.reservation(order)
    note = reservation_note(service, order)
    assert f"reserves **{seconds} s**" in note and "120 s a day" in note and "Sign in" in note and "⚠" not in note
    service.quota.learn(visitor, QuotaExceeded("left", seconds + 5, seconds - 1, "anonymous"))
    assert "⚠" in reservation_note(service, order) and "No smaller request" in reservation_note(service, order)
    LANGUAGE.set("zh-CN")
    try:
        assert f"预留 **{seconds} 秒**" in reservation_note(service, order)
    finally:
        LANGUAGE.set("en")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["vae", "fast"])
def test_a_mid_generation_preview_shows_the_unsampled_area_as_the_neutral_fill(client, mode):
    previews, _ = run(client, "/generate", **dict(GENERATE, preview=mode))  # 128x64: 4 rows of 8 tokens
    first = previews[0].astype(int)  # after 2 tokens: the first row is being sampled
    assert np.abs(first[20:] - NEUTRAL).max() <= 8, "below the row being sampled: the neutral fill (as JPEG)"
    assert np.abs(first[14:16, 40:] - MARKER).mean() <= 24, "the line under the row being sampled"
    assert np.abs(previews[-1][:16].astype(int) - NEUTRAL).mean() > 20, "what is sampled is the picture"


@pytest.mark.slow
def test_a_run_too_quick_for_its_previews_replays_its_stages_ending_on_the_result(client):
    # Previews every 64 tokens of a 32-token picture: none is shown before the result.
    _, outputs = run(client, "/generate", **dict(GENERATE, preview="fast", preview_every=64))
    replay = outputs[0]
    assert replay["url"].startswith("data:image/webp;base64,")
    animation = Image.open(io.BytesIO(base64.b64decode(replay["url"].split(",", 1)[1])))
    assert animation.n_frames == 7 and animation.info.get("loop") == 1  # six stages, then the result, once
    frames = []
    for index in range(animation.n_frames):
        animation.seek(index)
        frames.append(np.asarray(animation.convert("RGB")).astype(int))
    assert np.abs(frames[0][20:] - NEUTRAL).max() <= 8 and np.abs(frames[3][48:] - NEUTRAL).max() <= 8
    final = pixels(final_images(outputs)[0]).astype(int)
    # Lossy WebP (its colour at half resolution) leaves the tiny model's pixel noise near, not equal.
    error = [np.abs(frame - final).mean() for frame in frames]
    assert error[-1] < 20 and error[-1] < 0.6 * min(error[:-1]), "it ends on the result"


def test_on_the_whole_gpu_the_note_says_a_request_counts_twice(tiny_pipe):
    task = GpuTask([tiny_pipe], 0.0, lambda task, **reservation: task, size="xlarge")
    service = GpuService(task, 0, QuotaLedger(QuotaPolicy(xlarge=True)))
    order = Order("a picture", settings=dict(size="64x64", num_sampling_steps=2), visitor=Visitor("address:b"))
    assert f"It counts {2 * service.reservation(order)} s against your quota" in reservation_note(service, order)
