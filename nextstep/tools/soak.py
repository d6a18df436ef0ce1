"""``python -m nextstep.tools.soak``: run the app under load for minutes and report what it holds.

Starts ``app.py`` (the embedded model unless ``--model``) on a free loopback port with a cache
folder of its own (removed at the end), drives it with ``nextstep.tools.loadtest``'s clients for
``--minutes``, and prints the requests, failures and latencies, the server's resident memory
(RSS) over the run, and the files and bytes its cache holds at the end. Linux only (RSS is read from /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.request import urlopen

from ..page.guard import folder_usage
from .loadtest import Mix, add_mix_flags
from .loadtest import run as load

ROOT = Path(__file__).resolve().parents[2]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_serving(url: str, server: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the app exited with code {server.returncode} before it served")
        try:
            with urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"the app did not serve {url} within {timeout:g} s")


def soak(minutes: float, clients: int, settings: dict, app_args: list[str], mix: Mix = Mix(),
         sample_seconds: float = 60.0) -> dict:
    """Serve the app under load for ``minutes``; the load test's report with the server's RSS and
    cache (files, MB) sampled every ``sample_seconds``: (seconds, RSS MB, files, cache MB)."""
    cache = Path(tempfile.mkdtemp(prefix="nextstep-soak-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = dict(os.environ, GRADIO_TEMP_DIR=str(cache), GRADIO_ANALYTICS_ENABLED="False")
    server = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), *app_args], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_serving(url, server)
        start = time.monotonic()

        def measured() -> tuple:
            files, size = folder_usage(cache)
            return (round(time.monotonic() - start), round(rss_mb(server.pid)), files, round(size / 2**20, 1))

        samples = [measured()]
        finished = threading.Event()

        def sample() -> None:
            while not finished.wait(sample_seconds):
                samples.append(measured())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        # Enough requests that the clients send until the time is up.
        report = load(url, clients, 10**6, 60 * minutes, settings, mix)
        finished.set()
        sampler.join()
        samples.append(measured())
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(cache, ignore_errors=True)
    return dict(report, samples=samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nextstep.tools.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--preview", choices=["vae", "fast", "none"], default="vae",
                        help="the clients' live previews (default vae, as the page)")
    parser.add_argument("--sample-seconds", type=float, default=60.0, help="how often the server is measured")
    add_mix_flags(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args, app_args = parser.parse_known_args(argv)  # the rest goes to app.py (--model, --threads, …)
    report = soak(args.minutes, args.clients, dict(preview=args.preview), app_args, Mix(args.edits, args.varied),
                  args.sample_seconds)
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{report['clients']} clients for {report['seconds'] / 60:.1f} min: {report['requests']} requests, "
          f"{report['failed']} failed, {report['images_per_second']:.2f} images/s, "
          f"p50 {report['p50_seconds']:.2f} s, p95 {report['p95_seconds']:.2f} s")
    print("seconds  RSS MB  cache files  cache MB")
    for seconds, rss, files, size in report["samples"]:
        print(f"{seconds:>7}  {rss:>6}  {files:>11}  {size:>8}")
    for error in report["errors"]:
        print(f"  error: {error}")
    return 0 if report["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
