"""The page in front of a Ray Serve application (``nextstep.serving.ray_app``) on a local Ray cluster
(``ray_cluster``): what only Ray does. What every back end does is in ``test_contract``."""

from __future__ import annotations

import numpy as np
import pytest
import ray
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from nextstep.pnginfo import read_parameters
from nextstep.serving.compose import load_services, remote_services
from nextstep.serving.examples import EXAMPLES
from nextstep.serving.ray_client import LOST

from ..pages import GENERATE, final_images, launched, pixels, run, start_held
from .holds import HOLD
from .ray_cluster import EMBEDDED, SETTLE_SECONDS

pytestmark = pytest.mark.slow  # a Ray cluster and three replicas start first

EDIT = dict(image=str(EXAMPLES / "edit_input.png"), prompt="paint the red circle yellow", size="64x64",
            num_sampling_steps=4, seed=3, randomize_seed=False, preview="vae", preview_every=2)
HELD = dict(GENERATE, prompt=HOLD, preview="none")


@pytest.fixture(scope="module")
def remote_page(cluster):
    with launched(remote_services(cluster.app_url("studio"))) as url:
        yield url


@pytest.fixture(scope="module")
def local_page():
    with launched(load_services(EMBEDDED, frame_interval=0.0)) as url:
        yield url


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


def test_a_killed_replica_fails_its_request_clearly_and_the_next_succeeds(cluster, remote_page):
    job = start_held(Client(remote_page, verbose=False), HELD, SETTLE_SECONDS)
    victim = cluster.loaded_replica("studio")
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    with pytest.raises(AppError) as failure:
        job.result(timeout=SETTLE_SECONDS)
    assert str(failure.value) == LOST and "Traceback" not in str(failure.value)
    _, outputs = run(Client(remote_page, verbose=False), "/generate", **dict(GENERATE, preview="none"))
    assert final_images(outputs)
