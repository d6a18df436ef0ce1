"""``python -m nextstep.serving.ray_app``: the models as a Ray Serve application, many replicas
behind one HTTP address, for a page in front (``python app.py --serve-url http://HOST:PORT``).

Each replica loads the model(s) once, as the app does (``compose.load_services``), and runs the
batching scheduler (``LocalService``), so compatible requests share a token loop inside a
replica while Ray spreads requests across replicas. The page's client is ``ray_client``.

The HTTP protocol (JSON; images base64-encoded):

* ``GET /info``: what a page builds itself from, without a model of its own::

      {"models": {"generate": FACTS, "edit": FACTS (only with a separate edit model)},
       "tabs": {"generate": "generate", "edit": "generate" | "edit" | null},
       "vae": NAME | null, "examples": {"text_to_image": FILE | null, "edit": FILE | null},
       "capacity": {"in_flight": replicas x (max_batch + max_waiting), "waiting": replicas x max_waiting}}

  FACTS: ``{"defaults": {"generate": {...}, "edit": {...}}, "sizes": {"generate": ["WxH", …],
  "edit": […]}, "describe": {...} (``service.describe``), "supports_images": bool}``; FILE: the
  name of the examples file in ``assets/examples`` that fits the model (``examples.examples_for``).
* ``GET /status``: the answering replica: ``{"replica": its actor's name, "load": requests
  waiting or holding part of its models}``.
* ``POST /stream`` ``{"model": "generate" | "edit", "prompt", "image": PNG | null,
  "preview", "preview_every", "settings": {request field: value}}``. Refused at once with
  ``{"error": {"kind", "message"}}``: 422 (kind "invalid": the user's input), 503 ("busy": the
  replica's line is full). Otherwise 200 and one JSON line per frame, throttled as the page's:
  ``{"done", "total", "elapsed", "preview": [WebP, …] | null}``, and last ``{"done", "total",
  "elapsed", "result": {"seed", "parameters", "images": [PNG, …]}}``, or ``{"error": {"kind":
  "invalid" | "failed", "message"}}`` for a request that failed on the way.

Closing the stream withdraws the request at its next token: Ray Serve cancels the handler when its
client goes away, and closing ``LocalService.frames`` cancels the ticket, as Stop does in-process.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the handlers' annotations as types.
import argparse
import base64
import contextlib
import dataclasses
import json
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import ray
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from ray import serve

from ..loading.options import RuntimeOptions, add_runtime_flags, runtime_options
from .compose import MAX_BATCH, MAX_WAITING, load_services
from .ray_client import PREVIEW_FORMAT, RESULT_FORMAT, encode_image
from .scheduler import LocalService
from .service import FRAME_INTERVAL, Busy, GenerationFailed, Order, Progress

PACKAGE = Path(__file__).resolve().parents[1]
# Requests a replica accepts beyond its scheduler's line and batch: the quick ``/info`` and ``/status``.
SPARE_REQUESTS = 4

api = FastAPI(title="NextStep Studio models")


@dataclass(frozen=True)
class ReplicaConfig:
    """What each replica loads (``options``, app.py's flags of the same names) and how it serves."""

    options: RuntimeOptions
    frame_interval: float = FRAME_INTERVAL
    max_batch: int = MAX_BATCH
    max_waiting: int = MAX_WAITING
    replicas: int = 1  # of the application: the page sizes its own queue by all of them


class StreamBody(BaseModel):
    model: str = "generate"
    prompt: str | None = None
    image: str | None = None  # base64 of an image file (the page sends PNG)
    preview: str = "vae"
    preview_every: int | str = 8
    settings: dict = {}


def frame_message(frame: Progress) -> dict:
    message = dict(done=frame.done, total=frame.total, elapsed=frame.elapsed)
    if frame.preview:
        message["preview"] = [encode_image(image, PREVIEW_FORMAT) for image in frame.preview]
    if (result := frame.result) is not None:
        message["result"] = dict(seed=result.seed, parameters=result.parameters,
                                 images=[encode_image(image, RESULT_FORMAT) for image in result.images])
    return message


def error_message(kind: str, error: Exception) -> dict:
    return {"error": {"kind": kind, "message": str(error)}}


def facts(service: LocalService) -> dict:
    """A model's entry of ``/info``."""
    def plain(defaults: dict) -> dict:
        return dict(defaults, size=defaults["size"].value)

    return dict(
        defaults={"generate": plain(service.defaults(edit=False)), "edit": plain(service.defaults(edit=True))},
        sizes={"generate": [size.value for size in service.sizes(False)],
               "edit": [size.value for size in service.sizes(True)]},
        describe=service.describe(),
        supports_images=service.supports_images,
    )


@serve.deployment
@serve.ingress(api)
class StudioReplica:
    """One replica: the models of ``config`` behind the batching scheduler, served over HTTP.

    ``adjust``, when given, is called with each loaded service before the replica serves
    (the tests pace or hold the token loop with it)."""

    def __init__(self, config: ReplicaConfig, adjust: Callable[[LocalService], None] | None = None):
        loaded = load_services(config.options, frame_interval=config.frame_interval, max_batch=config.max_batch,
                               max_waiting=config.max_waiting)
        separate = loaded.editor is not None and loaded.editor is not loaded.generator
        self.services = {"generate": loaded.generator, **({"edit": loaded.editor} if separate else {})}
        if adjust is not None:
            for service in self.services.values():
                adjust(service)
        edit_tab = "edit" if separate else ("generate" if loaded.editor is not None else None)
        self.description = dict(
            models={name: facts(service) for name, service in self.services.items()},
            tabs={"generate": "generate", "edit": edit_tab},
            vae=loaded.vae,
            capacity=dict(in_flight=config.replicas * (config.max_batch + config.max_waiting),
                          waiting=config.replicas * config.max_waiting),
            examples={kind: file.name if file else None for kind, file in loaded.examples.items()},
        )

    @api.get("/info")
    def info(self) -> dict:
        return self.description

    @api.get("/status")
    def status(self) -> dict:
        replica = serve.get_replica_context().replica_id.to_full_id_str()
        return dict(replica=replica, load=sum(service.scheduler.load for service in self.services.values()))

    @api.post("/stream")
    async def stream(self, body: StreamBody):
        service = self.services.get(body.model)
        if service is None:
            unknown = ValueError(f"model must be one of {', '.join(self.services)}, got {body.model!r}")
            return JSONResponse(error_message("invalid", unknown), status_code=422)
        try:
            image = None if body.image is None else base64.b64decode(body.image, validate=True)
            settings = dict(body.settings)
            order = Order(body.prompt, image, settings, settings.pop("seed", None), body.preview, body.preview_every)
            ticket = service.submit(order)
        except ValueError as error:
            return JSONResponse(error_message("invalid", error), status_code=422)
        except Busy as error:
            return JSONResponse(error_message("busy", error), status_code=503)
        return StreamingResponse(self._lines(service, ticket), media_type="application/x-ndjson")

    @staticmethod
    async def _lines(service: LocalService, ticket) -> AsyncIterator[str]:
        # Closed (the client went away) or cancelled (Ray Serve does so then) at any point, the
        # frames end too, and with them the ticket.
        async with contextlib.aclosing(service.frames(ticket)) as frames:
            try:
                async for frame in frames:
                    yield json.dumps(frame_message(frame)) + "\n"
            except ValueError as error:
                yield json.dumps(error_message("invalid", error)) + "\n"
            except GenerationFailed as error:
                yield json.dumps(error_message("failed", error)) + "\n"


def application(config: ReplicaConfig, gpus_per_replica: float = 0.0, cpus_per_replica: float = 1.0,
                adjust: Callable[[LocalService], None] | None = None):
    """The Ray Serve application: ``config.replicas`` copies of ``StudioReplica``, each with its
    own GPU(s) (``gpus_per_replica``; a fraction shares one) and CPUs."""
    return StudioReplica.options(
        num_replicas=config.replicas,
        ray_actor_options=dict(num_cpus=cpus_per_replica, num_gpus=gpus_per_replica),
        max_ongoing_requests=config.max_batch + config.max_waiting + SPARE_REQUESTS,
        # A replica that takes minutes to load a 14B checkpoint is still starting, not failing.
        health_check_timeout_s=120,
    ).bind(config, adjust)


# ---- command line -------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m nextstep.serving.ray_app", description=__doc__.split("\n\n")[0])
    add_runtime_flags(parser)
    parser.add_argument("--replicas", type=int, default=1, help="copies of the model(s), each with its own scheduler")
    parser.add_argument("--gpus-per-replica", type=float, default=0.0,
                        help="GPUs Ray gives each replica (2 with --edit-device cuda:1; 0.5 puts two on one GPU)")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0)
    parser.add_argument("--max-batch", type=int, default=MAX_BATCH, help="images a replica decodes together")
    parser.add_argument("--max-waiting", type=int, default=MAX_WAITING,
                        help="requests waiting in a replica's line; more are answered busy")
    parser.add_argument("--frame-interval", type=float, default=FRAME_INTERVAL,
                        help="seconds between a request's progress frames (and previews)")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                        help="Ray cluster to join, HEAD:6379 or auto [env RAY_ADDRESS; default: a local one]")
    parser.add_argument("--host", default="127.0.0.1", help="where the HTTP address listens (0.0.0.0: all)")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    try:
        args.options = runtime_options(args)
    except ValueError as error:
        parser.error(str(error))
    if Path(args.options.model).is_dir():  # a local directory names the same model on every node of this machine
        args.options = dataclasses.replace(args.options, model=str(Path(args.options.model).resolve()))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = ReplicaConfig(args.options, args.frame_interval, args.max_batch, args.max_waiting, args.replicas)
    # The package travels to every node with the application; models load there by name (a Hub id,
    # or a directory that exists on each node).
    ray.init(address=args.address, runtime_env={"py_modules": [str(PACKAGE)]})
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(application(config, args.gpus_per_replica, args.cpus_per_replica),
              name="nextstep", route_prefix="/", blocking=True)


if __name__ == "__main__":
    main()
