"""The service contract (``serving.service``) as a visitor meets it through the page, on every back
end: in process (``LocalService``), ZeroGPU (``GpuService`` under spaces' real wrapper, in a process
of its own) and Ray Serve (``RayService`` in front of a local cluster). On each, a request streams
previews and then its result; a drawn seed is shown at once and is the one used; a refused request
shows its message; Stop frees the model. Where the back end keeps a line of its own (in process,
Ray), a full line says so; on ZeroGPU, spaces queues the GPU tasks. What only one back end does
is in its own module. Requests whose prompt is ``HOLD`` run until stopped (``holds.py``), so every
test waits on a state (a frame shown, the model free), never on time.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from gradio_client.utils import QueueError, Status

from nextstep.pnginfo import read_parameters
from nextstep.serving.compose import load_services, remote_services

from .. import pages
from ..pages import GENERATE, final_images, got_result, launched, run, wait_until
from .holds import HOLD, paced_with_holds
from .ray_cluster import EMBEDDED, SETTLE_SECONDS

pytestmark = pytest.mark.slow  # a Ray cluster and a ZeroGPU Space start first

QUICK = dict(GENERATE, preview="none")
_visitors = itertools.count(1)


def client(url: str) -> Client:
    """A new visitor (a ZeroGPU Space tells visitors apart by its proxy's forwarding header, and
    counts each one's use of the GPU)."""
    return Client(url, verbose=False, headers={"X-Forwarded-For": f"10.1.0.{next(_visitors)}"})


@dataclass
class Backend:
    url: str  # the page in front of it
    wait_free: Callable[[], None]  # until the back end holds no request


@contextmanager
def in_process():
    services = load_services(EMBEDDED, frame_interval=0.0)
    paced_with_holds(services.generator)
    with launched(services) as url:
        yield Backend(url, lambda: wait_until(lambda: not services.generator.busy, "the model is free"))


@contextmanager
def zero_gpu(space):
    yield Backend(space.url, space.api.wait_idle)


@contextmanager
def ray_serve(cluster):
    with launched(remote_services(cluster.app_url("studio"))) as url:
        yield Backend(url, lambda: cluster.wait_until_idle("studio"))


@pytest.fixture(scope="module", params=["in-process", "zerogpu", "ray"])
def backend(request):
    started = {"in-process": in_process, "zerogpu": lambda: zero_gpu(request.getfixturevalue("space")),
               "ray": lambda: ray_serve(request.getfixturevalue("cluster"))}[request.param]
    with started() as served:
        yield served


def start_held(url: str):
    return pages.start_held(client(url), dict(QUICK, prompt=HOLD), SETTLE_SECONDS)


def test_a_request_streams_previews_then_its_result(backend):
    previews, outputs = run(client(backend.url), "/generate", **GENERATE)
    assert len({preview.tobytes() for preview in previews}) >= 3, "the preview changes as tokens arrive"
    [image] = final_images(outputs)
    assert read_parameters(image) == outputs[3] and outputs[3]["prompt"] == GENERATE["prompt"]
    assert outputs[4] == outputs[3]["seed"] == GENERATE["seed"] and outputs[2].startswith("Done")


def test_a_drawn_seed_is_shown_at_once_and_is_the_one_used(backend):
    job = client(backend.url).submit(api_name="/generate", **dict(QUICK, randomize_seed=True))
    job.result(timeout=SETTLE_SECONDS)
    first, last = job.outputs()[0], job.outputs()[-1]
    assert first[2].startswith("Waiting"), "the first frame shows the seed before the model starts"
    assert read_parameters(final_images(last)[0])["seed"] == first[4] == last[4]


def test_a_refused_request_shows_its_message(backend):
    with pytest.raises(AppError, match="slot but no image was given") as refused:
        client(backend.url).predict(api_name="/generate", **dict(QUICK, prompt="a <image> circle"))
    assert "Traceback" not in str(refused.value)


def test_stop_frees_the_model(backend):
    job = start_held(backend.url)
    job.cancel()
    backend.wait_free()
    assert not got_result(job), "no final image after Stop"
    assert final_images(client(backend.url).predict(api_name="/generate", **QUICK)), "the next request runs"


@contextmanager
def one_line(kind: str, request):
    """A page whose back end runs one request and lets one more wait; yields (its URL, whether a
    submitted job waits in the line)."""
    if kind == "in-process":
        # The page hands the scheduler one batch at a time; its own queue is the line.
        services = load_services(EMBEDDED, frame_interval=0.0, max_batch=1, max_waiting=1)
        paced_with_holds(services.generator)
        with launched(services) as url:
            yield url, lambda job: job.status().code == Status.IN_QUEUE and job.status().queue_size == 1
        return
    cluster = request.getfixturevalue("cluster")
    # This page alone sends no more than the replica's batch and line hold; with a share of the
    # replica as if another page were using it too, a third request reaches a full line.
    with launched(dataclasses.replace(remote_services(cluster.app_url("line")), in_flight=3)) as url:
        yield url, lambda job: cluster.status("line")["load"] >= 2
    cluster.wait_until_idle("line")


@pytest.mark.parametrize("kind", ["in-process", "ray"])
def test_a_full_line_answers_busy_and_moves_on(kind, request):
    with one_line(kind, request) as (url, in_line):
        held = start_held(url)
        waiting = client(url).submit(api_name="/generate", **QUICK)
        wait_until(lambda: in_line(waiting), "the second request waits in the line", SETTLE_SECONDS)
        # In process, Gradio's queue says it in its words; Ray's replica, in the scheduler's.
        with pytest.raises((AppError, QueueError), match="busy|Queue is full"):
            client(url).predict(api_name="/generate", **QUICK)
        held.cancel()
        assert final_images(waiting.result(timeout=SETTLE_SECONDS)), "the waiting request runs once the line moves"
