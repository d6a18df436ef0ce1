"""``python -m nextstep.tools.loadtest``: drive a running NextStep Studio app with concurrent clients.

Each of ``--clients`` threads opens its own ``gradio_client`` connection and sends
``--requests`` generations one after another through the ``/generate`` endpoint; the run
reports images per second, p50/p95 latency and failed requests (a result that is not the
request's own, by the seed and prompt it carries, counts as failed). It only talks to this machine
(loopback addresses) and stops sending after ``--time-limit`` seconds.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import statistics
import sys
import threading
import time
from urllib.parse import urlparse

from gradio_client import Client

PROMPTS = [
    "a red circle on a blue background",
    "a large green square in the top left corner",
    "a small yellow triangle at the bottom on a white background",
    "two purple circles on an orange background",
]


def require_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"refusing to load-test {url!r}: only loopback addresses (127.0.0.1, localhost, ::1)")


def client_loop(client: Client, index: int, requests: int, deadline: float, settings: dict, record: list, lock) -> None:
    for n in range(requests):
        if time.monotonic() > deadline:
            return
        prompt = PROMPTS[(index + n) % len(PROMPTS)]
        start = time.monotonic()
        try:
            seed = 1000 * index + n
            outputs = client.predict(prompt=prompt, seed=seed, randomize_seed=False, **settings, api_name="/generate")
            images = len(outputs[1]) if isinstance(outputs, (list, tuple)) and outputs[1] else 0
            # The parameters shown with the images: this request's, not another's.
            shown = outputs[3] if images else {}
            mixed = images > 0 and (shown.get("seed"), shown.get("prompt")) != (seed, prompt)
            error = f"got another request's result (seed {shown.get('seed')})" if mixed else None
            outcome = dict(ok=images > 0 and not mixed, images=images, seconds=time.monotonic() - start, error=error)
        except Exception as error:  # noqa: BLE001 - a failed request is a result of the test
            outcome = dict(ok=False, images=0, seconds=time.monotonic() - start, error=str(error)[:200])
        with lock:
            record.append(outcome)


def run(url: str, clients: int, requests: int, time_limit: float, settings: dict) -> dict:
    require_loopback(url)
    record: list[dict] = []
    lock = threading.Lock()
    # Connecting reads the app's whole API description, which is slow work for the server: done
    # before the clock starts, so the figures are about generating.
    connections = [Client(url, verbose=False) for _ in range(clients)]
    deadline = time.monotonic() + time_limit
    threads = [
        threading.Thread(target=client_loop, args=(client, i, requests, deadline, settings, record, lock), daemon=True)
        for i, client in enumerate(connections)
    ]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()) + 120)  # an answer in flight may finish
    wall = time.monotonic() - start
    done = [r for r in record if r["ok"]]
    latencies = sorted(r["seconds"] for r in done)

    def percentile(q: float) -> float | None:
        if not latencies:
            return None
        return statistics.quantiles(latencies, n=100, method="inclusive")[int(q) - 1] if len(latencies) > 1 else latencies[0]

    return dict(
        clients=clients,
        requests=len(record),
        failed=len(record) - len(done),
        not_sent=clients * requests - len(record),
        images=sum(r["images"] for r in done),
        seconds=wall,
        images_per_second=sum(r["images"] for r in done) / wall if wall else 0.0,
        p50_seconds=percentile(50),
        p95_seconds=percentile(95),
        errors=sorted({r["error"] for r in record if r["error"]})[:5],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nextstep.tools.loadtest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:7860")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=4, help="generations per client")
    parser.add_argument("--time-limit", type=float, default=600.0, help="stop sending after this many seconds")
    parser.add_argument("--size", default=None, help="WIDTHxHEIGHT (default: the app's)")
    parser.add_argument("--num-sampling-steps", type=int, default=None, help="sampling steps (default: the app's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    settings = dict(preview="none")
    if args.size:
        settings["size"] = args.size
    if args.num_sampling_steps:
        settings["num_sampling_steps"] = args.num_sampling_steps
    report = run(args.url, args.clients, args.requests, args.time_limit, settings)
    if args.json:
        print(json.dumps(report))
    else:
        p50 = "-" if report["p50_seconds"] is None else f"{report['p50_seconds']:.2f} s"
        p95 = "-" if report["p95_seconds"] is None else f"{report['p95_seconds']:.2f} s"
        print(
            f"{report['clients']} clients, {report['requests']} requests ({report['failed']} failed, "
            f"{report['not_sent']} not sent) in {report['seconds']:.1f} s: "
            f"{report['images_per_second']:.2f} images/s, p50 {p50}, p95 {p95}"
        )
        for error in report["errors"]:
            print(f"  error: {error}")
    return 0 if report["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
