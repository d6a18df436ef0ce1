"""What keeps a public page's server within bounds whatever its visitors send: uploads limited per
client and in total, the page's cache held under a size with the oldest files removed first,
requests dropped once nobody reads them, and a message instead of a bare 500 for an endpoint
that does not exist; image inputs taken only from the upload folder or inline. (Live previews
never reach the disk: ``runs.LivePreview`` sends them inside the stream.)

Gradio's own pieces are used where they fit: its upload folder (where it caches every file it
serves), its queue's per-session message line (how a reader is told apart from none) and its
FastAPI app's middleware.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from gradio.utils import get_upload_folder
from starlette.middleware import Middleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

LOG = logging.getLogger("nextstep.page")  # refused input: one line each (app.py shows them)
MB = 2**20
MAX_FILE_SIZE = 20 * MB  # one uploaded file, or one image sent inline as a data: URL
CACHE_LIMIT = 1024 * MB  # the page's cache (uploads and results) is held at or under this
UPLOAD_PER_CLIENT = 64 * MB  # bytes one client may upload per UPLOAD_WINDOW
UPLOAD_TOTAL = 256 * MB  # bytes all clients together may upload per UPLOAD_WINDOW
UPLOAD_WINDOW = 60.0  # seconds
READER_PATIENCE = 30.0  # seconds a request's frames may wait unread before it is dropped


# ---- the cache's size ------------------------------------------------------------------------


def folder_files(folder: Path) -> list[tuple[Path, float, int]]:
    """(path, last written, bytes) of every file below ``folder``."""
    found = []
    for path in folder.rglob("*"):
        try:
            if path.is_file():
                stat = path.stat()
                found.append((path, stat.st_mtime, stat.st_size))
        except FileNotFoundError:  # removed meanwhile
            continue
    return found


def folder_usage(folder: Path) -> tuple[int, int]:
    """(files, bytes) below ``folder``."""
    files = folder_files(folder)
    return len(files), sum(size for _, _, size in files)


class CacheBound:
    """Holds a folder (Gradio's upload folder: its uploads and every file it serves) at or under
    ``limit`` bytes, removing the least recently written files first. ``poke()`` after anything
    that writes there; a thread of its own sweeps, so no request waits for it."""

    def __init__(self, limit: int = CACHE_LIMIT, folder: str | Path | None = None):
        self.limit = limit
        self.folder = Path(folder or get_upload_folder())
        self._poked = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        threading.Thread(target=self._work, name="nextstep-cache-bound", daemon=True).start()

    def poke(self) -> None:
        self._idle.clear()
        self._poked.set()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every poke so far has been swept."""
        return self._idle.wait(timeout)

    def usage(self) -> tuple[int, int]:
        """(files, bytes) in the folder now."""
        return folder_usage(self.folder)

    def sweep(self) -> None:
        files = sorted(folder_files(self.folder), key=lambda item: item[1])  # oldest first
        total = sum(size for _, _, size in files)
        for path, _, size in files:
            if total <= self.limit:
                break
            path.unlink(missing_ok=True)
            total -= size
            if path.parent != self.folder:
                with contextlib.suppress(OSError):  # not empty: Gradio keeps one folder per cached file
                    path.parent.rmdir()

    def _work(self) -> None:
        while True:
            self._poked.wait()
            self._poked.clear()
            self.sweep()
            if not self._poked.is_set():
                self._idle.set()


# ---- uploads -----------------------------------------------------------------------------------


class UploadLedger:
    """Bytes uploaded over the last ``window`` seconds, per client and in total."""

    def __init__(self, per_client: int = UPLOAD_PER_CLIENT, total: int = UPLOAD_TOTAL, window: float = UPLOAD_WINDOW):
        self.per_client, self.total, self.window = per_client, total, window
        self._entries: deque[tuple[float, str, int]] = deque()  # (when, client, bytes)
        self._lock = threading.Lock()

    def charge(self, client: str, size: int) -> str | None:
        """Record an upload of ``size`` bytes, or say why it is refused (and record nothing)."""
        now = time.monotonic()
        with self._lock:
            while self._entries and now - self._entries[0][0] > self.window:
                self._entries.popleft()
            mine = sum(n for _, who, n in self._entries if who == client)
            everyone = sum(n for _, _, n in self._entries)
            minutes = "minute" if self.window == 60 else f"{self.window / 60:g} minutes"
            if mine + size > self.per_client:
                return (f"Too many uploads: at most {self.per_client / MB:.3g} MB per {minutes} from one visitor. "
                        "Please wait a little and try again.")
            if everyone + size > self.total:
                return "The server takes too many uploads right now; please try again in a minute."
            self._entries.append((now, client, size))
            return None

    def refund(self, client: str, size: int) -> None:
        """Take back a charge whose upload was refused after all: it costs nothing."""
        with self._lock:
            for index in range(len(self._entries) - 1, -1, -1):
                if self._entries[index][1:] == (client, size):
                    del self._entries[index]
                    return


def trusted_proxies_default() -> int:
    """The proxies in front of this server whose X-Forwarded-For entries can be believed: on a
    Hugging Face Space (``SPACE_ID`` is set there) its one proxy, elsewhere none unless told."""
    return 1 if os.environ.get("SPACE_ID") else 0


def client_address(forwarded_for: str | None, peer: str | None, trusted_proxies: int) -> str:
    """Who sent a request. Each proxy appends the address it was reached from to X-Forwarded-For,
    so with ``trusted_proxies`` proxies in front, the entry the farthest of them wrote is the
    visitor's: entries left of it are whatever the visitor sent, and can be forged."""
    entries = [entry.strip() for entry in (forwarded_for or "").split(",") if entry.strip()]
    if trusted_proxies and entries:
        return entries[-min(trusted_proxies, len(entries))]
    return peer or "unknown"


def client_of(scope: Scope, trusted_proxies: int) -> str:
    """``client_address`` of an ASGI request."""
    forwarded = dict(scope.get("headers", [])).get(b"x-forwarded-for")
    client = scope.get("client")
    return client_address(forwarded.decode("latin-1") if forwarded else None, client[0] if client else None,
                          trusted_proxies)


def request_client(request, trusted_proxies: int) -> str:
    """``client_address`` of a handler's ``gr.Request``."""
    forwarded = request.headers.get("x-forwarded-for") if request.headers else None
    return client_address(forwarded, request.client.host if request.client else None, trusted_proxies)


def uploaded_file(path: str) -> bool:
    """Whether ``path`` is a file inside Gradio's upload folder (where the upload route puts what
    visitors send, and the page the files it serves), links resolved: nothing else on the server
    is a visitor's to name."""
    folder = Path(get_upload_folder()).resolve()
    resolved = Path(path).resolve()
    return resolved.is_relative_to(folder) and resolved.is_file()


# Routes that find their function by the name in the path. /run/predict and /api/predict are the
# page's own, naming the function by number in the body instead.
ENDPOINT = re.compile(r"/gradio_api/(call/v2|call|run|api)/([^/]+)")
BY_NUMBER = {("run", "predict"), ("api", "predict")}


class PageGate:
    """ASGI middleware in front of the page's app. An upload must state its size and is refused
    (429, with a message) beyond the ledger's bounds; ``uploaded`` runs after each one. A call
    of an endpoint name the page does not offer gets a 404 that names the ones it does (Gradio
    answers a bare 500)."""

    def __init__(self, app: ASGIApp, limits: PageLimits, offered: list[str]):
        self.app, self.limits, self.offered = app, limits, offered

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http":
            await self.app(scope, receive, send)
        elif scope["method"] == "POST" and path.rstrip("/").endswith("/gradio_api/upload"):
            await self._upload(scope, receive, send)
        elif (called := ENDPOINT.match(path)) and called[2] not in self.offered and called.groups() not in BY_NUMBER:
            names = ", ".join(f"/{name}" for name in self.offered)
            message = f"There is no endpoint /{called[2]}; this app offers {names}."
            await JSONResponse({"error": message}, status_code=404)(scope, receive, send)
        elif called:
            await self._call(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _call(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A call of a named endpoint whose arguments Gradio cannot match to its parameters (one
        missing, say) gets a message (422), not a bare 500 and a traceback."""
        started = []

        async def sending(message) -> None:
            started.append(True)
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except (TypeError, ValueError) as error:
            if started:
                raise
            message = f"The call could not be read: {error}"
            LOG.info("refused: %s", message)
            await JSONResponse({"error": message}, status_code=422)(scope, receive, send)

    async def _upload(self, scope: Scope, receive: Receive, send: Send) -> None:
        length = dict(scope["headers"]).get(b"content-length")
        client = client_of(scope, self.limits.trusted_proxies)
        if length is None or not length.isdigit():
            refusal, status = "An upload must state its size (Content-Length).", 411
        else:
            refusal, status = self.limits.uploads.charge(client, int(length)), 429
        if refusal is not None:
            await JSONResponse({"error": refusal}, status_code=status)(scope, receive, send)
            return
        answered = []

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                answered.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            if not answered or answered[0] >= 400:  # refused (too large, say) or cut off: it costs nothing
                self.limits.uploads.refund(client, int(length))
            self.limits.cache.poke()


# ---- readers -------------------------------------------------------------------------------------


class ReaderWatch:
    """Whether anyone still reads one session's stream: Gradio queues each frame in the session's
    message line until its reader (the page, or a client's GET of a /call) takes it. Frames left
    untaken for ``patience`` seconds mean the reader is gone or never came."""

    def __init__(self, blocks, session_hash: str, patience: float = READER_PATIENCE):
        self._messages = blocks._queue.pending_messages_per_session
        self._session = session_hash
        self.patience = patience
        self._last_read = time.monotonic()

    def abandoned(self) -> bool:
        line = self._messages.get(self._session)
        now = time.monotonic()
        if line is None or line.empty():
            self._last_read = now
            return False
        return now - self._last_read > self.patience

    async def cancel_when_abandoned(self, ticket, interval: float = 1.0) -> None:
        """Run beside a request: cancel its ticket once nobody reads its frames."""
        while not self.abandoned():
            await asyncio.sleep(interval)
        ticket.cancel()


@dataclass
class PageLimits:
    """The bounds one page serves under (``layout.build_demo`` and ``layout.launch`` take them)."""

    cache: CacheBound = field(default_factory=CacheBound)
    uploads: UploadLedger = field(default_factory=UploadLedger)
    reader_patience: float = READER_PATIENCE
    # Proxies whose X-Forwarded-For entries are believed (``client_address``).
    trusted_proxies: int = field(default_factory=trusted_proxies_default)


def app_options(limits: PageLimits, offered: list[str]) -> dict:
    """``Blocks.launch``'s ``app_kwargs`` for a page under ``limits`` that offers the endpoints ``offered``."""
    return dict(middleware=[Middleware(PageGate, limits=limits, offered=offered)])


def charge_inline_image(image, request, limits: PageLimits) -> str | None:
    """For an input image that arrived inline (bytes, from a ``data:`` URL): charge it to its
    visitor's upload budget as an upload through the upload route would be; the refusal's message
    beyond it, else None. ``request``: the handler's ``gr.Request``."""
    if not isinstance(image, bytes):
        return None
    return limits.uploads.charge(request_client(request, limits.trusted_proxies), len(image))
