"""The page served as on a ZeroGPU Space, on a CPU: ``tests/serving/zerogpu_space.py`` in a process of
its own (spaces patches torch for the whole process it is imported in), with ZeroGPU's environment;
that file says what it fakes and why. The device API that spaces' client schedules GPUs with is the
HTTP server here, which records what it was asked (reservations, releases), so tests can wait on
its state."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from ..conftest import ROOT, TINY
from ..pages import free_port


class DeviceAPI(ThreadingHTTPServer):
    """ZeroGPU's device API, as spaces' client calls it: every GPU asked for is granted at once,
    unless the test has it refuse the next one for the visitor's quota (``refuse_next``)."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), DeviceAPIHandler)
        self.calls: list[tuple[str, dict]] = []  # (path, query), in order
        self.changed = threading.Condition()
        self.refusals: list[tuple[dict, dict]] = []  # (body, headers) of the next /schedule answers
        self.granted = 0  # GPUs granted, each released once its task ends

    def refuse_next(self, left: int, wait_seconds: int, auth: str | None = None) -> None:
        """Answer the next /schedule as ZeroGPU answers a request over the visitor's quota: 429,
        what is left and how long to wait, and the visitor's tier in X-Authenticated."""
        headers = {"X-Approve-Result": "quota-exceeded", **({"X-Authenticated": auth} if auth else {})}
        with self.changed:
            self.refusals.append(({"left": left, "wait": wait_seconds}, headers))

    def next_refusal(self) -> tuple[dict, dict] | None:
        """The answer the next /schedule gets: a refusal the test asked for, or None (a GPU, granted)."""
        with self.changed:
            if self.refusals:
                return self.refusals.pop(0)
            self.granted += 1
            return None

    def wait_idle(self) -> None:
        """Until every GPU granted so far was released (an earlier test's task may end after its answer)."""
        self.wait_for(lambda: len(self.called("/release")) >= self.granted)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def record(self, path: str, query: dict) -> None:
        with self.changed:
            self.calls.append((path, query))
            self.changed.notify_all()

    def called(self, path: str) -> list[dict]:
        with self.changed:
            return [query for called, query in self.calls if called == path]

    def wait_for(self, predicate, timeout: float = 120) -> None:
        with self.changed:
            assert self.changed.wait_for(predicate, timeout), f"the device API saw {self.calls}"


class DeviceAPIHandler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's name
        url = urlparse(self.path)
        query = {key: values[0] for key, values in parse_qs(url.query).items()}
        self.server.record(url.path, query)
        body, status, headers = b"", 200, {}
        if url.path == "/schedule" and (refusal := self.server.next_refusal()) is not None:
            (answer, headers), status = refusal, 429
            body = json.dumps(answer).encode()
        elif url.path == "/schedule":
            token = f"token-{len(self.server.called('/schedule'))}"
            body = json.dumps({"idle": True, "nvidiaIndex": 0, "nvidiaUUID": "GPU-fake", "allowToken": token}).encode()
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def hub_cache_copy(source: Path, hub: Path, name: str) -> Path:
    """``source`` laid out as a Hub cache entry (files are links to blobs); returns its snapshot."""
    snapshot = hub / f"models--test--{name}" / "snapshots" / "main"
    blobs = hub / f"models--test--{name}" / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir(parents=True)
    for file in source.iterdir():
        if file.is_file():
            shutil.copy(file, blobs / file.name)
            (snapshot / file.name).symlink_to(blobs / file.name)
    return snapshot


@dataclass
class Space:
    url: str
    api: DeviceAPI
    pid: int  # the server's process (GPU tasks run in processes it forks)
    blobs: list[Path]  # the weight files left in its Hub cache once it launched
    scheduled_at_launch: int  # GPUs asked for by then


@contextmanager
def zero_gpu_space(tmp: Path):
    """The page served as on ZeroGPU."""
    api = DeviceAPI()
    threading.Thread(target=api.serve_forever, daemon=True).start()
    hub = tmp / "hub"
    model, vae = hub_cache_copy(TINY / "model", hub, "tiny"), hub_cache_copy(TINY / "vae", hub, "tiny-vae")
    (tmp / "cgroup").write_text("0::/zerogpu-test\n")
    env = dict(
        os.environ, SPACES_ZERO_GPU="true", SPACES_ZERO_DEVICE_API_URL=api.url,
        ZEROGPU_OFFLOAD_DIR=str(tmp / "offload"), ZEROGPU_MMAP_AUTOPRUNE_PATTERN=str(hub / "models--*/blobs/*"),
        ZEROGPU_PROC_SELF_CGROUP_PATH=str(tmp / "cgroup"), GRADIO_CACHE_EXAMPLES="true",
        GRADIO_EXAMPLES_CACHE=str(tmp / "examples"),
        # A Space with Hugging Face sign-in (hf_oauth: true sets these; nobody signs in here), behind
        # the Space's one proxy, whose X-Forwarded-For tells visitors apart.
        SYSTEM="spaces", SPACE_ID="test/nextstep-studio", SPACE_HOST="127.0.0.1", OAUTH_CLIENT_ID="test-client",
        OAUTH_CLIENT_SECRET="test-secret", OAUTH_SCOPES="openid profile", OPENID_PROVIDER_URL=api.url,
        GRADIO_SSR_MODE="false", GRADIO_ANALYTICS_ENABLED="false",
    )
    port = free_port()
    # A session of its own, so that ending it ends the GPU workers spaces forked from it too.
    server = subprocess.Popen([sys.executable, "-m", "tests.serving.zerogpu_space", str(model), str(vae), str(port)],
                              cwd=ROOT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:  # up once spaces has reported the launch and the web server accepts connections
            assert server.poll() is None, "the Space exited"
            if api.called("/startup-report"):
                with socket.socket() as probe:
                    if probe.connect_ex(("127.0.0.1", port)) == 0:
                        break
            assert time.monotonic() < deadline, "the Space did not come up"
            time.sleep(0.05)
        yield Space(f"http://127.0.0.1:{port}/", api, server.pid, [*hub.glob("models--*/blobs/*.safetensors")],
                    len(api.called("/schedule")))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
        api.shutdown()
