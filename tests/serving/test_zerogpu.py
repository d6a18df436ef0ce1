"""ZeroGPU: the GPU task's reservation, and what only ZeroGPU does with the page served under
spaces' real wrapper on a CPU (``zerogpu_harness``): the weights packed at launch, the GPU asked for
with the reservation and released, the visitors' quotas. What every back end does is in
``test_contract``."""

from __future__ import annotations

import asyncio
import base64
import json
import re

import httpx
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from nextstep.engine.opcount import count_token_ops
from nextstep.engine.settings import GenerationRequest
from nextstep.engine.sizes import Size
from nextstep.models.model import NextStepModel
from nextstep.pnginfo import read_parameters
from nextstep.serving import zerogpu
from nextstep.serving.reservation import MARGIN, Reservation
from nextstep.serving.service import Order
from nextstep.serving.zerogpu import GpuService, GpuTask
from nextstep.tools.shapes import random_config

from ..page.test_browser import VIEWPORT, chromium, open_page, set_slider
from ..pages import GENERATE, INPUT_IMAGE, got_result, preview_pixels, start_held
from .holds import HOLD

# NextStep-1's official text-to-image request, and what an edit changes.
TEXT = dict(prompt="a red circle", image=None, negative_prompt="", positive_prompt="", size=Size(512, 512),
            num_images=1, cfg=7.5, cfg_img=1.0, cfg_schedule="constant", timesteps_shift=1.0, num_sampling_steps=50,
            use_norm=True, sampler="v1", seed=0)
EDIT = dict(image=Image.open(INPUT_IMAGE), cfg_img=2.0, timesteps_shift=3.2, negative_prompt="Copy original image.")


def off_zero_gpu(task, **reservation):
    """``spaces.GPU`` off ZeroGPU: the function itself."""
    return task


# ---- the reservation ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def large_model() -> NextStepModel:
    """The 14B shape (NextStep-1-Large's), built on the meta device."""
    config, _, _ = random_config("nextstep-1-large")
    with torch.device("meta"):
        return NextStepModel(config).to(torch.bfloat16)


def request_of(**changes) -> GenerationRequest:
    size = dict(TEXT, **changes)["size"]
    return GenerationRequest(**dict(TEXT, **changes), grid=(size.height // 16, size.width // 16))


def reserved(model: NextStepModel, graph: bool = True, **changes) -> int:
    return Reservation([model], graph).seconds(0, request_of(**changes))


def test_the_reservation_grows_with_size_steps_images_branches_and_model(large_model, tiny_pipe):
    start = reserved(large_model)
    assert reserved(large_model, size=Size(256, 256)) < start and reserved(large_model, num_sampling_steps=25) < start
    assert reserved(large_model, num_images=4) > start
    per_token = [Reservation([large_model], True).basis(0, request_of(**changes))["estimated_seconds_per_token"]
                 for changes in (dict(cfg=1.0), {}, EDIT)]
    assert per_token == sorted(per_token) and len(set(per_token)) == 3  # 1, 2, 3 guidance branches
    assert reserved(tiny_pipe.model) < start
    assert reserved(large_model, graph=False) > start, "launching every operation from Python costs more"


def test_the_official_14b_request_fits_an_anonymous_visitors_day(large_model):
    """512x512 (32x32 tokens), 50 steps, cfg 7.5, as the official examples: within the 120 s of GPU
    time an anonymous visitor has a day, on ZeroGPU's default step (a replayed CUDA graph)."""
    basis = Reservation([large_model], graph=True).basis(0, request_of())
    assert basis["seconds"] <= 120
    assert 30e9 < basis["bytes_per_token"] < 36e9  # the backbone once, the head 51 times, the KV cache
    assert basis["operations_per_token"] == count_token_ops(large_model.config, "v1", 50, 2).total
    assert reserved(large_model, num_sampling_steps=100) > basis["seconds"]


def test_what_a_task_measured_replaces_the_estimate_for_its_shape(tiny_pipe):
    reservation = Reservation([tiny_pipe.model], graph=False)
    request = tiny_pipe.engine.request("a red circle", size=(64, 64), num_sampling_steps=4, seed=1)
    estimated = reservation.basis(0, request)
    reservation.calibrate(0, request, 2.0)  # two seconds a token
    measured = reservation.basis(0, request)
    assert measured["measured_seconds_per_token"] == 2.0
    assert measured["seconds"] == round(MARGIN * (measured["once_seconds"] + request.tokens * 2.0))
    other = tiny_pipe.engine.request("a red circle", size=(64, 64), num_sampling_steps=8, seed=1)
    assert reservation.basis(0, other)["measured_seconds_per_token"] is None, "another shape keeps the estimate"
    assert estimated["measured_seconds_per_token"] is None


def test_a_gpu_task_reports_its_time_per_token(tiny_pipe):
    service = GpuService(GpuTask([tiny_pipe], 0.0, off_zero_gpu), 0)
    ticket = service.submit(Order("a red circle", settings=dict(size=(64, 64), num_sampling_steps=2), seed=1))

    async def finish():
        return [frame async for frame in service.frames(ticket)]

    last = asyncio.run(finish())[-1]
    measured = service.task.reservation.basis(0, ticket.request)["measured_seconds_per_token"]
    assert measured == last.elapsed / last.done


def test_a_request_longer_than_zerogpu_grants_is_refused_with_a_message(tiny_pipe, monkeypatch):
    service = GpuService(GpuTask([tiny_pipe], 0.0, off_zero_gpu), 0)
    small = dict(size=(64, 64), num_sampling_steps=2)
    allowed = service.task.duration(0, tiny_pipe.engine.request("a red circle", **small), "none", 1)
    monkeypatch.setattr(zerogpu, "MAX_SECONDS", allowed)
    service.submit(Order("a red circle", settings=small))
    with pytest.raises(ValueError, match=r"GPU time, more than the .* s ZeroGPU .*fewer sampling steps"):
        service.submit(Order("a red circle", settings=dict(small, size=(256, 256), num_sampling_steps=50)))
    assert not service.busy


def test_a_gpu_task_streams_throttled_frames_and_the_result(tiny_pipe):
    service = GpuService(GpuTask([tiny_pipe], 60.0, off_zero_gpu), 0)
    ticket = service.submit(Order("a red circle", settings=dict(size=(64, 64), num_sampling_steps=2), seed=1,
                                  preview_every=1))

    async def collect():
        return [frame async for frame in service.frames(ticket)]

    frames = asyncio.run(collect())
    assert len(frames) == 2 and frames[0].done == 1 and frames[-1].result is not None
    assert read_parameters(frames[-1].result.images[0])["seed"] == 1
    assert ticket.wait_left(30) and not service.busy


# ---- the page under spaces' ZeroGPU wrapper -------------------------------------------------


def distinct_previews(outputs: list[tuple]) -> set[bytes]:
    """The different preview pictures a run streamed before its result."""
    return {preview_pixels(preview).tobytes() for preview, gallery, *_ in outputs if preview is not None and not gallery}


@pytest.mark.slow
def test_launch_packs_the_weights_and_prunes_their_cache_files_and_runs_no_example(space):
    blobs = space.blobs
    # The weights were loaded without a host copy: spaces packed them from the files' own pages,
    # then deleted the cache files behind them (the safetensors; the VAE's unused checkpoint.pt stays).
    assert blobs == [], "spaces could not prune the weights' cache files: they were copied while loading"
    assert space.scheduled_at_launch == 0, "nothing runs on the GPU before a visitor asks (examples are lazy)"


@pytest.mark.slow
def test_generate_streams_frames_from_the_gpu_task_and_finishes_with_a_png(space, tiny_pipe):
    url, api = space.url, space.api
    released = len(api.called("/release"))
    outputs = list(Client(url, verbose=False).submit(api_name="/generate", **GENERATE))
    previews = distinct_previews(outputs)
    assert len(previews) >= 3, "the preview should change several times before the final image"
    assert any(isinstance(status, str) and status.startswith("Tokens") for _, _, status, *_ in outputs)
    preview, gallery, status, shown, seed = outputs[-1]
    [final] = [item["image"] for item in gallery]
    assert Image.open(final).format == "PNG" and Image.open(final).size == (128, 64)
    stored = read_parameters(final)
    assert stored == shown and stored["prompt"] == "a red circle" and stored["seed"] == seed == 7
    assert status.startswith("Done") and "tokens/s" in status
    # spaces reserved the request's estimate (the served model is this one), and gave the GPU back.
    request = tiny_pipe.engine.request("a red circle", size=(128, 64), num_sampling_steps=4, cfg=3.0, seed=7)
    reserved = GpuTask([tiny_pipe], 0.0, off_zero_gpu).duration(0, request, "vae", 2)
    assert api.called("/schedule")[-1]["durationSeconds"] == str(reserved)
    api.wait_for(lambda: len(api.called("/release")) > released)
    assert api.called("/release")[-1]["fail"] == "false"
    assert {int(allowed["pid"]) for allowed in api.called("/allow")} - {space.pid}, "it ran in a forked worker"


@pytest.mark.slow
def test_edit_streams_frames_from_the_same_gpu_task(space):
    url = space.url
    inputs = dict(image=handle_file(str(INPUT_IMAGE)), prompt="Make it blue.", size="64x64", num_sampling_steps=4,
                  seed=3, randomize_seed=False, preview_every=2)
    outputs = list(Client(url, verbose=False).submit(api_name="/edit", **inputs))
    previews = distinct_previews(outputs)
    assert len(previews) >= 3
    [final] = [item["image"] for item in outputs[-1][1]]
    stored = read_parameters(final)
    assert stored["edit"] is True and stored["prompt"] == "Make it blue." and stored["seed"] == 3
    assert stored["negative_prompt"] == "Copy original image." and stored["cfg_img"] == 2.0
    assert len({scheduled["taskId"] for scheduled in space.api.called("/schedule")}) == 1, "one GPU task for both tabs"


@pytest.mark.slow
def test_a_users_message_from_inside_the_gpu_task_reaches_the_page_whole(space):
    url = space.url
    with pytest.raises(AppError, match="positions"):  # found only once the prompt is tokenised, in the worker
        Client(url, verbose=False).predict(**dict(GENERATE, prompt="x y " * 490), api_name="/generate")


@pytest.mark.slow
def test_stop_ends_the_gpu_task_as_a_task_that_did_not_fail(space):
    url, api = space.url, space.api
    api.wait_idle()
    scheduled, released = len(api.called("/schedule")), len(api.called("/release"))
    job = start_held(Client(url, verbose=False), dict(GENERATE, prompt=HOLD, preview="none"))
    assert len(api.called("/schedule")) == scheduled + 1 and len(api.called("/release")) == released
    job.cancel()
    # Stop closes the page's stream; the GPU task ends at its next frame and its GPU is released.
    api.wait_for(lambda: len(api.called("/release")) == released + 1, timeout=60)
    assert api.called("/release")[-1]["fail"] == "false"
    assert not got_result(job), "no final image after Stop"


# ---- visitors' quotas, under the real wrapper --------------------------------------------------


def ip_token(address: str) -> str:
    """An X-IP-Token as the Hub sends one (a JWT: spaces reads its payload)."""
    payload = base64.urlsafe_b64encode(json.dumps({"ip": address}).encode()).decode().rstrip("=")
    return f"header.{payload}.signature"


def visitor_client(url: str, address: str) -> Client:
    """A visitor at ``address`` (as the Space's proxy reports it), with the Hub's identity header."""
    return Client(url, verbose=False, headers={"X-Forwarded-For": address, "X-IP-Token": ip_token(address)})


def waiting_reservation(outputs: list[tuple]) -> int:
    """The GPU seconds the status line said the request reserves, while it waited."""
    [line] = [status for _, _, status, *_ in outputs if isinstance(status, str) and "reserves" in status]
    return int(re.search(r"reserves (\d+) s", line)[1])


@pytest.mark.slow
def test_a_quota_refusal_of_zerogpus_is_a_message_and_a_request_over_it_is_refused_before_the_gpu_call(space):
    api = space.api
    visitor = visitor_client(space.url, "10.0.0.1")
    scheduled = len(api.called("/schedule"))
    api.refuse_next(left=9, wait_seconds=1200, auth="regular")
    with pytest.raises(AppError) as refused:
        visitor.predict(**GENERATE, api_name="/generate")
    message = str(refused.value)
    assert "you have about 9 s left today" in message and "Or try again in 0:20:00" in message
    assert "Traceback" not in message and "gr.Error" not in message
    assert len(api.called("/schedule")) == scheduled + 1
    assert api.called("/schedule")[-1]["token"] == ip_token("10.0.0.1"), "ZeroGPU was told who asked"
    # The page remembers what ZeroGPU said: the same request is now refused before any GPU is asked for.
    with pytest.raises(AppError, match=r"counts \d+ s of ZeroGPU time; you have about 9 s left today"):
        visitor.predict(**GENERATE, api_name="/generate")
    assert len(api.called("/schedule")) == scheduled + 1


@pytest.mark.slow
def test_a_request_within_the_quota_runs_reserving_what_the_page_showed_charged_to_its_visitor(space):
    api = space.api
    outputs = list(visitor_client(space.url, "10.0.0.2").submit(api_name="/generate", **GENERATE))
    assert outputs[-1][2].startswith("Done")
    scheduled = api.called("/schedule")[-1]
    assert scheduled["token"] == ip_token("10.0.0.2"), "the visitor's identity header reached the GPU call"
    assert waiting_reservation(outputs) == int(scheduled["durationSeconds"])


@pytest.mark.slow
def test_the_page_offers_sign_in_and_shows_the_reservation_before_generate(space):
    config = httpx.get(space.url + "config", timeout=30).json()
    components = {component["props"].get("elem_id"): component for component in config["components"]}
    assert "sign_in" in components["sign-in"]["props"]["value"]  # gr.LoginButton, labelled in the visitor's language
    assert components["generate-reservation"]["props"]["visible"] is True


@pytest.mark.slow
@pytest.mark.browser
def test_in_the_browser_the_reservation_shown_before_generate_is_the_one_requested(space):
    with chromium() as browser:
        context = browser.new_context(locale="en-US", viewport=VIEWPORT, extra_http_headers={
            "X-Forwarded-For": "10.0.0.3", "X-IP-Token": ip_token("10.0.0.3")})
        page = open_page(context, space.url)
        note = "(document.querySelector('#generate-reservation [data-testid=markdown]')?.innerText ?? '')"
        page.wait_for_function(f"{note}.includes('reserves')", timeout=30_000)  # the defaults' reservation
        before = page.evaluate(note)
        set_slider(page, "generate-steps", 2)  # one change: the note is brought up to date once
        page.wait_for_function(f"before => {note} !== before", arg=before, timeout=30_000)
        shown_note = page.evaluate(note)
        shown = int(re.search(r"reserves (\d+) s", shown_note)[1])
        assert "120 s a day" in shown_note and shown != int(re.search(r"reserves (\d+) s", before)[1])
        page.fill("#generate-prompt textarea", "a red circle")
        page.click("#generate-run")
        page.wait_for_function("document.querySelector('#generate-status').innerText.startsWith('Done')",
                               timeout=120_000)
        requested = space.api.called("/schedule")[-1]
        assert int(requested["durationSeconds"]) == shown and requested["token"] == ip_token("10.0.0.3")
        context.close()
