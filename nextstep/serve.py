"""``python -m nextstep.serve``: the models as a Ray Serve application, many replicas behind one
HTTP address, for a page in front (``python app.py --serve-url http://HOST:PORT``).

Each replica loads the model(s) once and runs the batching scheduler (``SharedPipeline``), so
compatible requests share a token loop inside a replica while Ray spreads requests across
replicas. The page's client is ``nextstep.remote``.

The HTTP protocol (JSON; images base64-encoded):

* ``GET /info``: what a page builds itself from, without a model of its own::

      {"models": {"generate": FACTS, "edit": FACTS (only with a separate edit model)},
       "tabs": {"generate": "generate", "edit": "generate" | "edit" | null},
       "vae": NAME | null, "examples": {"text_to_image": FILE | null, "edit": FILE | null},
       "capacity": {"in_flight": replicas x (max_batch + max_waiting), "waiting": replicas x max_waiting}}

  FACTS: ``{"defaults": {"generate": {...}, "edit": {...}}, "sizes": {"generate": ["WxH", …],
  "edit": […]}, "describe": {...} (``serving.describe``), "supports_images": bool}``; FILE: the
  name of the examples file in ``assets/examples`` that fits the model (``serving.examples_for``).
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
client goes away, and closing ``SharedPipeline.frames`` cancels the ticket, as Stop does in-process.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the handlers' annotations as types.
import argparse
import base64
import contextlib
import json
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, fields
from pathlib import Path

import ray
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from ray import serve

from .devices import DTYPES, pick_device, pick_dtype, set_threads
from .quantize import QUANTIZATIONS
from .remote import PREVIEW_FORMAT, RESULT_FORMAT, encode_image
from .scheduler import Busy, GenerationFailed
from .serving import EMBEDDED_MODEL, FRAME_INTERVAL, Progress, SharedPipeline, examples_for, load_pipelines

PACKAGE = Path(__file__).resolve().parent
# Requests a replica accepts beyond its scheduler's line and batch: the quick ``/info`` and ``/status``.
SPARE_REQUESTS = 4

api = FastAPI(title="NextStep Studio models")


@dataclass(frozen=True)
class ReplicaConfig:
    """What each replica loads and how it serves (app.py's flags of the same names)."""

    model: str
    edit_model: str | None = None
    vae: str | None = None
    device: str | None = None
    edit_device: str | None = None
    dtype: str | None = None
    quantize: str | None = None
    threads: int | None = None
    frame_interval: float = FRAME_INTERVAL
    max_batch: int = 8
    max_waiting: int = 16
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


def facts(service: SharedPipeline) -> dict:
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

    def __init__(self, config: ReplicaConfig, adjust: Callable[[SharedPipeline], None] | None = None):
        device = pick_device(config.device)
        set_threads(device, config.threads)
        second = config.edit_model if config.edit_model and config.edit_model != config.model else None
        placed = [(config.model, device), *([(second, config.edit_device or device)] if second else [])]
        pipes, _ = load_pipelines(placed, config.vae, pick_dtype(config.dtype, device), config.quantize)
        self.services = {
            name: SharedPipeline(pipe, config.frame_interval, max_batch=config.max_batch,
                                 max_waiting=config.max_waiting)
            for name, pipe in zip(("generate", "edit"), pipes)
        }
        if adjust is not None:
            for service in self.services.values():
                adjust(service)
        edit_tab = "edit" if second else ("generate" if pipes[0].supports_images else None)
        self.description = dict(
            models={name: facts(service) for name, service in self.services.items()},
            tabs={"generate": "generate", "edit": edit_tab},
            vae=config.vae,
            capacity=dict(in_flight=config.replicas * (config.max_batch + config.max_waiting),
                          waiting=config.replicas * config.max_waiting),
            examples={kind: file.name if (file := examples_for(name)) else None
                      for kind, name in (("text_to_image", config.model), ("edit", config.edit_model or config.model))},
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
            ticket = service.submit(body.prompt, image, preview=body.preview, preview_every=body.preview_every,
                                    **body.settings)
        except ValueError as error:
            return JSONResponse(error_message("invalid", error), status_code=422)
        except Busy as error:
            return JSONResponse(error_message("busy", error), status_code=503)
        return StreamingResponse(self._lines(service, ticket), media_type="application/x-ndjson")

    @staticmethod
    async def _lines(service: SharedPipeline, ticket) -> AsyncIterator[str]:
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
                adjust: Callable[[SharedPipeline], None] | None = None):
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
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="python -m nextstep.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=env("NEXTSTEP_MODEL", str(EMBEDDED_MODEL)),
                        help="model directory or Hub id [env NEXTSTEP_MODEL; default: the embedded model]")
    parser.add_argument("--edit-model", default=env("NEXTSTEP_EDIT_MODEL"),
                        help="model for the Edit tab [default: --model if it takes images]")
    parser.add_argument("--vae", default=env("NEXTSTEP_VAE"), help="VAE directory or Hub id [default: the model's own]")
    parser.add_argument("--device", default=env("NEXTSTEP_DEVICE"),
                        help="device in each replica [default: cuda when the replica has a GPU]")
    parser.add_argument("--edit-device", default=env("NEXTSTEP_EDIT_DEVICE"),
                        help="device for --edit-model in each replica, such as cuda:1 [default: --device]")
    parser.add_argument("--dtype", default=env("NEXTSTEP_DTYPE"), choices=list(DTYPES),
                        help="[default: bfloat16 on GPU, float32 on CPU]")
    parser.add_argument("--quantize", default=env("NEXTSTEP_QUANTIZE"), choices=QUANTIZATIONS,
                        help="weight-only quantization of the backbone [default: none]")
    parser.add_argument("--threads", type=int, help="CPU threads for torch in each replica [default: 1 on CPU]")
    parser.add_argument("--replicas", type=int, default=1, help="copies of the model(s), each with its own scheduler")
    parser.add_argument("--gpus-per-replica", type=float, default=0.0,
                        help="GPUs Ray gives each replica (2 with --edit-device cuda:1; 0.5 puts two on one GPU)")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0)
    parser.add_argument("--max-batch", type=int, default=8, help="images a replica decodes together")
    parser.add_argument("--max-waiting", type=int, default=16,
                        help="requests waiting in a replica's line; more are answered busy")
    parser.add_argument("--frame-interval", type=float, default=FRAME_INTERVAL,
                        help="seconds between a request's progress frames (and previews)")
    parser.add_argument("--address", default=env("RAY_ADDRESS"),
                        help="Ray cluster to join, HEAD:6379 or auto [env RAY_ADDRESS; default: a local one]")
    parser.add_argument("--host", default="127.0.0.1", help="where the HTTP address listens (0.0.0.0: all)")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    if Path(args.model).is_dir():  # a local directory names the same model on every node of this machine
        args.model = str(Path(args.model).resolve())
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = ReplicaConfig(**{field.name: getattr(args, field.name) for field in fields(ReplicaConfig)})
    # The package travels to every node with the application; models load there by name (a Hub id,
    # or a directory that exists on each node).
    ray.init(address=args.address, runtime_env={"py_modules": [str(PACKAGE)]})
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(application(config, args.gpus_per_replica, args.cpus_per_replica),
              name="nextstep", route_prefix="/", blocking=True)


if __name__ == "__main__":
    main()
