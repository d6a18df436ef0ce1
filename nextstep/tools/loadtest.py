"""``python -m nextstep.tools.loadtest``: drive a running NextStep Studio app with concurrent clients.

Each of ``--clients`` threads opens its own ``gradio_client`` connection and sends
``--requests`` requests one after another: generations through ``/generate``, and with
``--edits F`` that share of them edits through ``/edit`` of a picture made for each and uploaded
with it; ``--varied`` draws each request's settings at random within what the page offers (its
sizes and samplers as the app's API lists them). The run reports images per second, p50/p95
latency and failed requests (a result that is not the request's own, by the seed and prompt it
carries, or whose picture does not download whole, counts as failed). The pictures are fetched
as the page fetches them, into memory: a load test leaves no files behind. It only talks to this
machine (loopback addresses) and stops sending after ``--time-limit`` seconds.
"""

from __future__ import annotations

import argparse
import io
import ipaddress
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx
from gradio_client import Client, handle_file
from PIL import Image, ImageDraw

EDITS = ["make the circle blue", "paint the background white", "make the circle green"]
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


@dataclass(frozen=True)
class Mix:
    """What the clients send besides plain generations."""

    edits: float = 0.0  # the share of requests that are edits, each of a picture uploaded with it
    varied: bool = False  # each request's settings drawn within what the page offers


def offered(client: Client) -> dict[str, list]:
    """The choices the page lists for ``/generate`` (sizes, samplers, schedules, preview modes)."""
    info = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/generate"]["parameters"]
    return {p["parameter_name"]: p["type"]["enum"] for p in info if "enum" in p["type"]}


def varied_settings(rng: random.Random, choices: dict[str, list]) -> dict:
    """Settings within the page's ranges, the costly ones kept moderate so a soak goes on."""
    return dict(size=rng.choice(choices["size"]), num_images=rng.choice([1, 1, 2]),
                num_sampling_steps=rng.randint(4, 30), cfg=round(rng.uniform(1.0, 6.0), 1),
                timesteps_shift=round(rng.uniform(0.5, 3.0), 1), cfg_schedule=rng.choice(choices["cfg_schedule"]),
                sampler=rng.choice(choices["sampler"]), use_norm=rng.random() < 0.5,
                preview=rng.choice(choices["preview"]), preview_every=rng.randint(1, 16))


def picture(rng: random.Random, folder: Path) -> Path:
    """A picture to upload for an edit: a background and a disc, of a random size."""
    width, height = rng.randint(32, 512), rng.randint(32, 512)
    image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    radius = min(width, height) // 3
    ImageDraw.Draw(image).ellipse((width // 2 - radius, height // 2 - radius, width // 2 + radius,
                                   height // 2 + radius), fill=tuple(rng.randrange(256) for _ in range(3)))
    path = folder / f"{rng.getrandbits(64):016x}.png"
    image.save(path)
    return path


def fetched(client: Client, gallery: list[dict]) -> int:
    """Download a result's pictures by their URLs, as the page does; how many there are (a body cut
    short fails to decode and raises)."""
    for item in gallery:
        response = httpx.get(item["image"]["url"], headers=client.headers, timeout=60)
        response.raise_for_status()
        Image.open(io.BytesIO(response.content)).verify()
    return len(gallery)


def one_request(client: Client, rng: random.Random, seed: int, prompt: str, settings: dict, mix: Mix,
                choices: dict, folder: Path) -> dict:
    """Send one request as the mix says; its outcome (ok: the request's own result arrived)."""
    settings = dict(settings, **(varied_settings(rng, choices) if mix.varied else {}))
    start = time.monotonic()
    try:
        if rng.random() < mix.edits:
            prompt = EDITS[seed % len(EDITS)]
            outputs = client.predict(image=handle_file(str(picture(rng, folder))), prompt=prompt, seed=seed,
                                     randomize_seed=False, **settings, api_name="/edit")
        else:
            outputs = client.predict(prompt=prompt, seed=seed, randomize_seed=False, **settings, api_name="/generate")
        images = fetched(client, outputs[1]) if isinstance(outputs, (list, tuple)) and outputs[1] else 0
        # The parameters shown with the images: this request's, not another's.
        shown = outputs[3] if images else {}
        mixed = images > 0 and (shown.get("seed"), shown.get("prompt")) != (seed, prompt)
        error = f"got another request's result (seed {shown.get('seed')})" if mixed else None
        return dict(ok=images > 0 and not mixed, images=images, seconds=time.monotonic() - start, error=error)
    except Exception as error:  # noqa: BLE001 - a failed request is a result of the test
        return dict(ok=False, images=0, seconds=time.monotonic() - start, error=str(error)[:200])


def client_loop(client: Client, index: int, requests: int, deadline: float, settings: dict, mix: Mix,
                record: list, lock) -> None:
    rng = random.Random(index)
    choices = offered(client) if mix.varied else {}
    with tempfile.TemporaryDirectory(prefix="nextstep-loadtest-") as folder:
        for n in range(requests):
            if time.monotonic() > deadline:
                return
            outcome = one_request(client, rng, 1000 * index + n, PROMPTS[(index + n) % len(PROMPTS)], settings, mix,
                                  choices, Path(folder))
            with lock:
                record.append(outcome)


def run(url: str, clients: int, requests: int, time_limit: float, settings: dict, mix: Mix = Mix()) -> dict:
    require_loopback(url)
    record: list[dict] = []
    lock = threading.Lock()
    # Connecting reads the app's whole API description, which is slow work for the server: done
    # before the clock starts, so the figures are about generating.
    connections = [Client(url, verbose=False, download_files=False) for _ in range(clients)]
    deadline = time.monotonic() + time_limit
    threads = [
        threading.Thread(target=client_loop, args=(client, i, requests, deadline, settings, mix, record, lock),
                         daemon=True)
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


def add_mix_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--edits", type=float, default=0.0,
                        help="share of requests that are edits of a picture uploaded with each (0 to 1)")
    parser.add_argument("--varied", action="store_true",
                        help="draw each request's settings within what the page offers")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nextstep.tools.loadtest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:7860")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=4, help="generations per client")
    parser.add_argument("--time-limit", type=float, default=600.0, help="stop sending after this many seconds")
    parser.add_argument("--size", default=None, help="WIDTHxHEIGHT (default: the app's)")
    parser.add_argument("--num-sampling-steps", type=int, default=None, help="sampling steps (default: the app's)")
    add_mix_flags(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    settings = dict(preview="none")
    if args.size:
        settings["size"] = args.size
    if args.num_sampling_steps:
        settings["num_sampling_steps"] = args.num_sampling_steps
    report = run(args.url, args.clients, args.requests, args.time_limit, settings, Mix(args.edits, args.varied))
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
