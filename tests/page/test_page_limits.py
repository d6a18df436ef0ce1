"""The page's bounds against hostile or vanished clients, through a launched server: Stop that
never waits behind another request, uploads and the cache held to their bounds, preview frames
gone once shown, abandoned requests dropped, unknown endpoints answered with a message."""

from __future__ import annotations

import threading

import httpx
import pytest
from gradio_client import Client

from nextstep.page.guard import MAX_FILE_SIZE, MB, CacheBound, PageLimits, UploadLedger

from ..pages import (
    GENERATE,
    final_images,
    held_until_stopped,
    launched,
    tiny_services,
    wait_until,
)

pytestmark = pytest.mark.slow

QUICK = dict(GENERATE, size="64x64", preview="none")


def returns(call) -> bool:
    """Whether ``call()`` returns (a bound for a failure, not a speed: what it must not wait for
    never ends by itself here)."""
    returned = threading.Event()
    threading.Thread(target=lambda: (call(), returned.set()), daemon=True).start()
    return returned.wait(60)


def test_a_waiting_requests_stop_and_then_a_running_ones_each_return_without_waiting_behind_another(monkeypatch):
    services = tiny_services()
    running = held_until_stopped(services.generator.pipe.engine, monkeypatch)  # A runs until stopped
    scheduler = services.generator.scheduler
    with launched(services) as url:
        a = Client(url, verbose=False).submit(**dict(QUICK, seed=1), api_name="/generate")
        wait_until(running.is_set, "A's token loop runs")
        b = Client(url, verbose=False).submit(**dict(QUICK, seed=2), api_name="/generate")
        wait_until(lambda: len(scheduler._waiting) == 1, "B waits in line behind A's batch")

        # A holds its token loop until it is stopped: a Stop of B that waited behind A would never return.
        assert returns(b.cancel), "Stop of a waiting request does not wait for the running one"
        wait_until(lambda: scheduler.load == 1, "B has left the line while A still runs")

        a.cancel()
        wait_until(lambda: scheduler.load == 0, "A's batch has stopped")
        assert not any(outputs[1] for outputs in a.outputs()), "no result after Stop"


def test_a_burst_of_uploads_beyond_the_bound_is_refused_and_others_still_upload(tmp_path):
    ledger = UploadLedger(per_client=1_000_000, total=1_500_000, window=3600)
    limits = PageLimits(cache=CacheBound(folder=tmp_path), uploads=ledger, trusted_proxies=1)  # as on a Space
    with launched(tiny_services(), limits) as url:
        def upload(index: int, client: str = "203.0.113.7") -> httpx.Response:
            return httpx.post(f"{url}gradio_api/upload", files={"files": (f"{index}.bin", b"x" * 300_000)},
                              headers={"X-Forwarded-For": client})

        assert [upload(i).status_code for i in range(3)] == [200, 200, 200]
        refused = upload(3)
        assert refused.status_code == 429 and "Too many uploads" in refused.json()["error"]
        assert upload(4, client="198.51.100.9").status_code == 200  # another visitor, within the total
        everyone = upload(5, client="192.0.2.1")
        assert everyone.status_code == 429 and "too many uploads right now" in everyone.json()["error"]
        assert final_images(Client(url, verbose=False).predict(**QUICK, api_name="/generate"))


@pytest.mark.parametrize("trusted", [0, 1])
def test_forged_forwarding_headers_do_not_multiply_a_visitors_budget(tmp_path, monkeypatch, trusted):
    """Behind one trusted proxy a visitor is the entry that proxy appended, whatever the visitor
    wrote before it; with none trusted, the header is not read at all."""
    # The web server itself believes the header from a proxy on this machine (uvicorn's default):
    # here the connection stands for a visitor's or a Space proxy's, from elsewhere.
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "")
    ledger = UploadLedger(per_client=1_000_000, total=100_000_000, window=3600)
    limits = PageLimits(cache=CacheBound(folder=tmp_path), uploads=ledger, trusted_proxies=trusted)
    with launched(tiny_services(), limits) as url:
        def upload(index: int) -> int:
            forged = f"10.0.0.{index}, 203.0.113.7" if trusted else f"10.0.0.{index}"
            return httpx.post(f"{url}gradio_api/upload", files={"files": (f"{index}.bin", b"x" * 300_000)},
                              headers={"X-Forwarded-For": forged}).status_code

        assert [upload(index) for index in range(5)] == [200, 200, 200, 429, 429]


def test_a_refused_upload_costs_nothing(tmp_path):
    ledger = UploadLedger(per_client=30 * MB, total=100 * MB, window=3600)
    with launched(tiny_services(), PageLimits(cache=CacheBound(folder=tmp_path), uploads=ledger)) as url:
        too_big = httpx.post(f"{url}gradio_api/upload", files={"files": ("big.bin", b"x" * (MAX_FILE_SIZE + MB))})
        assert too_big.status_code == 413
        statuses = [httpx.post(f"{url}gradio_api/upload", files={"files": (f"{i}.bin", b"x" * MB)}).status_code
                    for i in range(25)]
        assert statuses == [200] * 25, "the refused 21 MB were not counted against the 30 MB"


def test_after_many_requests_the_cache_holds_at_most_its_bound_and_never_a_preview(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))  # the page's cache, where Gradio keeps what it serves
    limit = 40_000
    limits = PageLimits(cache=CacheBound(limit=limit, folder=tmp_path))
    with launched(tiny_services(), limits) as url:
        client = Client(url, verbose=False, download_files=False)  # a client's own copies stay out of it
        for seed in range(8):
            previews = 0
            for preview, gallery, *_ in client.submit(**dict(GENERATE, seed=seed), api_name="/generate"):
                previews += preview is not None and not gallery
            assert previews > 0, "the request streamed preview frames"
        limits.cache.wait_idle(60)
        files, size = limits.cache.usage()
        assert 0 < size <= limit
        kept = [path for path in tmp_path.rglob("*") if path.is_file()]
        assert kept and all(path.name == "image.png" for path in kept), "only results: previews stay in memory"
        assert len(kept) < 8, "the bound removed the oldest results"


def test_an_abandoned_call_request_is_dropped(monkeypatch):
    services = tiny_services()
    running = held_until_stopped(services.generator.pipe.engine, monkeypatch)  # only a cancel ends it
    with launched(services, PageLimits(reader_patience=0.5)) as url:
        posted = httpx.post(f"{url}gradio_api/call/v2/generate", json=dict(QUICK, preview="vae", preview_every=1))
        assert posted.status_code == 200 and posted.json()["event_id"]  # and nobody ever reads its stream
        wait_until(running.is_set, "the request runs")
        wait_until(lambda: not services.generator.busy, "the request is dropped")
        monkeypatch.undo()  # the token loop runs freely again
        assert final_images(Client(url, verbose=False).predict(**QUICK, api_name="/generate"))


@pytest.fixture(scope="module")
def url():
    with launched(tiny_services()) as address:
        yield address


@pytest.mark.parametrize("path", ["gradio_api/call/nope", "gradio_api/call/v2/nope", "gradio_api/run/nope",
                                  "gradio_api/call/predict"])
def test_an_unknown_endpoint_gets_a_message_naming_the_real_ones(url, path):
    answer = httpx.post(url + path, json={"data": []})
    assert answer.status_code == 404
    name = path.rsplit("/", 1)[1]
    assert answer.json() == {"error": f"There is no endpoint /{name}; this app offers /generate, /edit."}


def test_gradios_run_log_is_off(url):
    """The page keeps its own history; Gradio's run log would show stopped runs as completed."""
    assert httpx.get(url + "gradio_api/runs").status_code == 404
    assert httpx.get(url + "config").json()["run_history"] is False
