"""A local Ray cluster serving two applications on the embedded model, for the tests of the page in
front of Ray Serve: "studio" with two replicas, and "line" with one replica whose line holds a
single request. Each replica's token loop delivers every preview before the next token and holds
``HOLD`` requests until they are withdrawn (``holds.py``)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import ray
from ray import serve

from nextstep.loading.options import EMBEDDED_MODEL, RuntimeOptions
from nextstep.serving.ray_app import ReplicaConfig, application

from ..conftest import ROOT
from ..pages import free_port
from .holds import paced_with_holds

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


@contextmanager
def local_cluster():
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


