"""The page's side of a Ray Serve application (``python -m nextstep.serving.ray_app``): each model
the cluster serves, as a ``service.Service``.

The HTTP protocol is described in ``nextstep.serving.ray_app``. The page draws the seed when none is given,
so it can show it at once; the replica completes and validates the rest of the request, and its
refusals arrive as they would in-process: ``ValueError`` (the user's input), ``Busy`` (the
replica's line is full) and ``GenerationFailed`` (anything else, a replica that went away included).
Closing ``frames`` closes the HTTP stream, which withdraws the request on its replica.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
from PIL import Image

from ..engine.core import GenerationResult, check_preview
from ..engine.inputs import load_image
from ..engine.settings import draw_seed
from ..engine.sizes import Size
from ..pnginfo import with_parameters
from .examples import EXAMPLES
from .service import Busy, GenerationFailed, Order, Progress

PREVIEW_FORMAT = "WEBP"  # previews: small and quick to encode
RESULT_FORMAT = "PNG"  # results: lossless, so a remote image is the in-process one pixel for pixel
# Errors by the ``kind`` the replica gives them; the messages are written for users.
ERRORS = {"invalid": ValueError, "busy": Busy, "failed": GenerationFailed}
# No read timeout: a request may wait in its replica's line, silently, for a while.
TIMEOUT = httpx.Timeout(30.0, read=None)
LOST = "The generation service stopped before the image was finished; please try again."
UNREACHABLE = "The generation service cannot be reached right now; please try again in a moment."


def encode_image(image: Image.Image, format: str) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_image(text: str) -> Image.Image:
    with Image.open(io.BytesIO(base64.b64decode(text))) as opened:
        return opened.convert("RGB")


def image_payload(image) -> str | None:
    """An input image (a PIL image, a file path or a file's bytes), read here as in-process (the
    same refusals, in the same words) and sent as a lossless PNG of what was read."""
    return None if image is None else encode_image(load_image(image), "PNG")


def frame_of(message: dict) -> Progress:
    """One JSON line of the stream -> the page's frame (a failure raised as the in-process one)."""
    if "error" in message:
        raise ERRORS.get(message["error"]["kind"], GenerationFailed)(message["error"]["message"])
    frame = Progress(message["done"], message["total"], message["elapsed"])
    if message.get("preview"):
        frame.preview = [decode_image(text) for text in message["preview"]]
    if (result := message.get("result")) is not None:
        images = [with_parameters(decode_image(text), result["parameters"]) for text in result["images"]]
        # The sampled tokens stay on the replica: the page shows pictures only.
        frame.result = GenerationResult(images, torch.empty(0), result["seed"], result["parameters"])
    return frame


def refusal_of(response: httpx.Response, body: bytes) -> Exception:
    """The error a refused request (not 200) stands for."""
    try:
        error = json.loads(body)["error"]
        return ERRORS.get(error["kind"], GenerationFailed)(error["message"])
    except (ValueError, KeyError, TypeError):  # not the replica's answer (Ray's proxy, say)
        return GenerationFailed(f"The generation service answered {response.status_code}; please try again.")


@dataclass(eq=False)
class RayTicket:
    seed: int  # drawn here when the order named none, so the page shows it at once
    body: dict  # the request as sent
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)
    _left: threading.Event = field(default_factory=threading.Event, repr=False)  # its stream is closed
    _opened: bool = field(default=False, repr=False)

    @property
    def reservation(self) -> None:
        return None  # the cluster's GPUs are its own

    def cancel(self) -> None:
        """Withdraw the request: its stream closes at the next frame (closing ``frames`` does at once)."""
        self._cancelled.set()
        if not self._opened:
            self._left.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def wait_left(self, timeout: float | None = None) -> bool:
        """Wait until the request's stream is closed: no frame of it arrives any more, and its
        replica lets go of the model at its next token."""
        return self._left.wait(timeout)


class RayService:
    """One model of a Ray Serve application, as a ``service.Service``.

    ``facts``: the model's entry of the application's ``/info`` (defaults, sizes, description)."""

    def __init__(self, url: str, model: str, facts: dict):
        self.url = url.rstrip("/")
        self.model = model  # its name in the application: "generate" or "edit"
        self.facts = facts
        self._running: set[RayTicket] = set()

    @property
    def busy(self) -> bool:
        """Whether a request of this page is in flight on the cluster."""
        return bool(self._running)

    @property
    def supports_images(self) -> bool:
        return self.facts["supports_images"]

    def defaults(self, edit: bool) -> dict:
        values = dict(self.facts["defaults"]["edit" if edit else "generate"])
        values["size"] = Size.parse(values["size"])
        return values

    def sizes(self, edit: bool) -> list[Size]:
        return [Size.parse(size) for size in self.facts["sizes"]["edit" if edit else "generate"]]

    def describe(self) -> dict[str, str]:
        return self.facts["describe"]

    def reservation(self, order: Order) -> None:
        return None  # a cluster reserves nothing per request

    def allowance(self, visitor) -> None:
        return None

    def submit(self, order: Order) -> RayTicket:
        """The request to send (it is sent by ``frames``); the seed drawn here when none is given."""
        preview_every = check_preview(order.preview, order.preview_every)
        seed = draw_seed() if order.seed is None else order.seed
        body = dict(model=self.model, prompt=order.prompt, image=image_payload(order.image), preview=order.preview,
                    preview_every=preview_every, settings=dict(order.settings, seed=seed))
        return RayTicket(seed, body)

    async def frames(self, ticket: RayTicket) -> AsyncIterator[Progress]:
        """The ticket's frames, streamed from a replica. Closing the iterator (or cancelling its
        task) closes the stream, which withdraws the request there."""
        if ticket.cancelled:
            return
        ticket._opened = True
        self._running.add(ticket)
        try:
            async with httpx.AsyncClient(timeout=TIMEOUT) as client:
                # Settings may hold a Size; it travels as its text.
                content = json.dumps(ticket.body, default=str)
                async with client.stream("POST", f"{self.url}/stream", content=content,
                                         headers={"content-type": "application/json"}) as response:
                    if response.status_code != 200:
                        raise refusal_of(response, await response.aread())
                    async for line in response.aiter_lines():
                        if ticket.cancelled:
                            return
                        if not line:
                            continue
                        try:
                            message = json.loads(line)
                        except ValueError:  # a line cut short
                            raise GenerationFailed(LOST) from None
                        frame = frame_of(message)
                        yield frame
                        if frame.result is not None:
                            return
            raise GenerationFailed(LOST)  # the stream ended without a result
        except (httpx.ConnectError, httpx.ConnectTimeout):
            raise GenerationFailed(UNREACHABLE) from None
        except httpx.HTTPError:  # cut or lost on the way
            raise GenerationFailed(LOST) from None
        finally:
            self._running.discard(ticket)
            ticket._left.set()


@dataclass
class Cluster:
    """What ``/info`` says the page's tabs get: a service per tab (the Edit tab's None without an
    edit-capable model, the Generate tab's own where one model serves both), the VAE's name, the
    examples files (on this side) that fit the models, and how many requests the replicas take."""

    generator: RayService
    editor: RayService | None
    vae: str | None
    examples: dict[str, Path | None]
    capacity: dict[str, int]  # {"in_flight", "waiting"}: requests all replicas run and queue together


def connect(url: str) -> Cluster:
    """Read a Ray Serve application's ``/info``; ``httpx.HTTPError`` when it cannot be reached."""
    info = httpx.get(f"{url.rstrip('/')}/info", timeout=TIMEOUT).raise_for_status().json()
    services = {name: RayService(url, name, facts) for name, facts in info["models"].items()}
    tabs = info["tabs"]
    examples = {kind: EXAMPLES / Path(name).name if name else None for kind, name in info["examples"].items()}
    return Cluster(services[tabs["generate"]], services.get(tabs["edit"]), info["vae"], examples, info["capacity"])
