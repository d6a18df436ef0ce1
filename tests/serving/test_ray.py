"""The page in front of a Ray Serve application (``nextstep.serving.ray_app``) on a local Ray cluster.

Two applications on the embedded model: "studio" with two replicas, and "line" with one replica
whose line holds a single request. Each replica's token loop delivers every preview before the next
token and holds requests whose prompt is ``HOLD`` until they are withdrawn (``tests/serving/ray_hooks.py``),
so the tests wait on states (a frame shown, a replica's load), never on time.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
import ray
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from ray import serve

from nextstep.loading.options import EMBEDDED_MODEL, RuntimeOptions
from nextstep.pnginfo import read_parameters
from nextstep.serving.compose import load_services, remote_services
from nextstep.serving.examples import EXAMPLES
from nextstep.serving.ray_app import ReplicaConfig, application
from nextstep.serving.ray_client import LOST

from ..conftest import ROOT
from ..pages import GENERATE, final_images, free_port, got_result, launched, pixels, run
from .ray_hooks import HOLD, paced_with_holds

pytestmark = pytest.mark.slow  # a Ray cluster and three replicas start first

EDIT = dict(image=str(EXAMPLES / "edit_input.png"), prompt="paint the red circle yellow", size="64x64",
            num_sampling_steps=4, seed=3, randomize_seed=False, preview="vae", preview_every=2)
HELD = dict(GENERATE, prompt=HOLD, preview="none")
EMBEDDED = RuntimeOptions(model=str(EMBEDDED_MODEL), device="cpu", dtype="float32")
SETTLE_SECONDS = 60  # how long a state may take to arrive before a test fails (never a pause)


@dataclass
class Cluster:
    url: str  # the HTTP address of Ray Serve's proxy

    def app_url(self, name: str) -> str:
        return f"{self.url}/{name}"

    def replicas(self, name: str) -> set[str]:
        """The actor names of an application's replicas."""
        actors = ray.util.list_named_actors(all_namespaces=True)
        return {actor["name"] for actor in actors if actor["name"].startswith(f"SERVE_REPLICA::{name}#")}

    def status(self, name: str) -> dict:
        """The status of whichever replica of ``name`` answers."""
        return httpx.get(f"{self.app_url(name)}/status", timeout=30).raise_for_status().json()

    def ongoing(self, name: str) -> dict[str, int]:
        """Requests each replica of ``name`` is answering, asked of each replica's actor itself:
        over HTTP, Ray would route the question to the least busy replica, never the busy one.
        A request counts until its handler has ended: for a stream, until its ticket is withdrawn
        or finished. A replica that has died counts none."""
        counts = {}
        for replica in self.replicas(name):
            try:
                actor = ray.get_actor(replica, namespace="serve")
                counts[replica] = ray.get(actor.get_num_ongoing_requests.remote(), timeout=30)
            except (ValueError, ray.exceptions.RayActorError):
                counts[replica] = 0
        return counts

    def wait_until_idle(self, name: str) -> None:
        """Until no replica of ``name`` answers a request."""
        deadline = time.monotonic() + SETTLE_SECONDS
        while any((counts := self.ongoing(name)).values()):
            assert time.monotonic() < deadline, f"replicas still answering: {counts}"

    def loaded_replica(self, name: str) -> str:
        """The replica of ``name`` that answers a request."""
        deadline = time.monotonic() + SETTLE_SECONDS
        while not (busy := [replica for replica, count in self.ongoing(name).items() if count]):
            assert time.monotonic() < deadline, "no replica holds the request"
        return busy[0]


@pytest.fixture(scope="module")
def cluster():
    # The replicas import the package and the hooks from this checkout.
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(application(ReplicaConfig(EMBEDDED, frame_interval=0.0, replicas=2), adjust=paced_with_holds),
              name="studio", route_prefix="/studio")
    tiny_line = ReplicaConfig(EMBEDDED, frame_interval=0.0, max_batch=1, max_waiting=1)
    serve.run(application(tiny_line, adjust=paced_with_holds), name="line", route_prefix="/line")
    try:
        yield Cluster(f"http://127.0.0.1:{port}")
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def remote_page(cluster):
    with launched(remote_services(cluster.app_url("studio"))) as url:
        yield url


@pytest.fixture(scope="module")
def local_page():
    with launched(load_services(EMBEDDED, frame_interval=0.0)) as url:
        yield url


def start_held(url: str):
    """A held generation, returned once the page shows its first progress frame."""
    job = Client(url, verbose=False).submit(api_name="/generate", **HELD)
    deadline = time.monotonic() + SETTLE_SECONDS
    while not any(isinstance(o[2], str) and o[2].startswith("Tokens") for o in job.outputs()):
        assert time.monotonic() < deadline and not job.done(), "the held request never started"
        time.sleep(0.05)
    return job


def test_the_page_builds_itself_from_the_cluster(cluster):
    services = remote_services(cluster.app_url("studio"))
    assert services.editor is services.generator, "the embedded model takes images: it serves both tabs"
    assert services.generator.describe()["checkpoint"] == "shapes-model"  # a folder's name, never its path
    local = load_services(EMBEDDED)
    for edit in (False, True):
        assert services.generator.defaults(edit) == local.generator.defaults(edit)
        assert services.generator.sizes(edit) == local.generator.sizes(edit)
    assert services.examples == local.examples and services.examples["edit"]
    # The page hands the cluster as many requests as its two replicas hold together (running or
    # in their lines), and queues as many more itself.
    assert (services.in_flight, services.waiting) == (2 * (8 + 16), 2 * 16)


@pytest.mark.parametrize("api_name, inputs", [("/generate", GENERATE), ("/edit", EDIT)])
def test_the_cluster_streams_previews_and_makes_the_in_process_image(remote_page, local_page, api_name, inputs):
    def sent(values):
        return dict(values, image=handle_file(values["image"])) if "image" in values else values

    previews, outputs = run(Client(remote_page, verbose=False), api_name, **sent(inputs))
    _, local_outputs = run(Client(local_page, verbose=False), api_name, **sent(inputs))
    assert len({preview.tobytes() for preview in previews}) >= 3, "the preview changes as tokens arrive"
    [remote], [local] = final_images(outputs), final_images(local_outputs)
    assert np.array_equal(pixels(remote), pixels(local))
    assert read_parameters(remote) == read_parameters(local) == outputs[3]
    assert outputs[4] == inputs["seed"] and outputs[2].startswith("Done")


def test_a_drawn_seed_is_shown_at_once_and_is_the_one_used(remote_page):
    job = Client(remote_page, verbose=False).submit(api_name="/generate", **dict(GENERATE, randomize_seed=True))
    job.result(timeout=SETTLE_SECONDS)
    first, last = job.outputs()[0], job.outputs()[-1]
    assert first[2].startswith("Waiting"), "the first frame shows the seed before the model starts"
    assert read_parameters(final_images(last)[0])["seed"] == first[4] == last[4]


def test_a_request_the_replica_refuses_shows_its_message(remote_page):
    with pytest.raises(AppError, match="slot but no image was given") as refused:
        Client(remote_page, verbose=False).predict(api_name="/generate", **dict(GENERATE, prompt="a <image> circle"))
    assert "Traceback" not in str(refused.value)


def test_stop_withdraws_the_request_on_its_replica(cluster, remote_page):
    job = start_held(remote_page)
    assert cluster.loaded_replica("studio")
    job.cancel()
    cluster.wait_until_idle("studio")
    assert not got_result(job)


def test_a_full_line_answers_busy(cluster):
    # This page alone sends no more than the replica's batch and line hold; with a share of the
    # replica as if another page were using it too, a third request reaches a full line.
    services = dataclasses.replace(remote_services(cluster.app_url("line")), in_flight=3)
    with launched(services) as page:
        held = start_held(page)
        waiting = Client(page, verbose=False).submit(api_name="/generate", **dict(GENERATE, preview="none"))
        deadline = time.monotonic() + SETTLE_SECONDS
        while cluster.status("line")["load"] < 2:  # the second request is in the replica's line
            assert time.monotonic() < deadline
        with pytest.raises(AppError, match="busy"):
            Client(page, verbose=False).predict(api_name="/generate", **dict(GENERATE, preview="none"))
        held.cancel()
        assert final_images(waiting.result(timeout=SETTLE_SECONDS)), "the waiting request runs once the line moves"
    cluster.wait_until_idle("line")


def test_a_killed_replica_fails_its_request_clearly_and_the_next_succeeds(cluster, remote_page):
    job = start_held(remote_page)
    victim = cluster.loaded_replica("studio")
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    with pytest.raises(AppError) as failure:
        job.result(timeout=SETTLE_SECONDS)
    assert str(failure.value) == LOST and "Traceback" not in str(failure.value)
    _, outputs = run(Client(remote_page, verbose=False), "/generate", **dict(GENERATE, preview="none"))
    assert final_images(outputs)
