"""NextStep Studio: a Gradio page for NextStep-1 with live previews (Generate and Edit tabs).

The Space's entry point: flags, the services behind the page (``nextstep.serving.compose``), the
page itself (``nextstep.page``), and launching it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

try:  # Hugging Face's ZeroGPU package, on Spaces; it must be imported before anything touches CUDA.
    import spaces
except ImportError:
    spaces = None

import httpx

from nextstep.loading.checkpoints import CheckpointMismatchError
from nextstep.loading.hub import ModelNotFoundError
from nextstep.loading.memory import NotEnoughMemoryError
from nextstep.loading.options import RuntimeOptions, add_runtime_flags, runtime_options
from nextstep.page.guard import (
    CACHE_LIMIT,
    LOG,
    MB,
    CacheBound,
    PageLimits,
    trusted_proxies_default,
)
from nextstep.page.health import serve_unavailable
from nextstep.page.layout import build_demo, launch
from nextstep.serving.compose import Services, load_services, remote_services
from nextstep.serving.quota import QuotaPolicy
from nextstep.serving.zerogpu import on_zero_gpu


def serve_models(options: RuntimeOptions, frame_interval: float | None = None) -> Services:
    """The models ``options`` name, served on ZeroGPU through ``spaces.GPU`` where this process
    runs on ZeroGPU hardware (visitors' quotas counted as spaces counts them), else through the
    in-process scheduler."""
    timing = {} if frame_interval is None else {"frame_interval": frame_interval}
    if spaces is None or not on_zero_gpu():
        return load_services(options, **timing)
    return load_services(options, gpu=spaces.GPU, quota=QuotaPolicy.from_environment(factor=duration_factor()),
                         **timing)


def duration_factor() -> float:
    """What spaces multiplies a reservation by on this hardware before asking for it (1.5 on half an
    RTX Pro 6000, 1 on an H200 slice; an ``xlarge`` task counts twice instead)."""
    from spaces.zero import config

    return float(config.get_config()["duration_factor"])


def no_gpu_work() -> None:
    """Stands for the GPU task of a ZeroGPU Space that could not load its model."""


def declare_gpu_function() -> None:
    """On ZeroGPU, declare a GPU function even when no model could be loaded: spaces reports the
    Space's start-up to ZeroGPU only once one exists."""
    if spaces is not None and on_zero_gpu():
        spaces.GPU(no_gpu_work)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description="Serve NextStep Studio, a Gradio page for NextStep-1.")
    add_runtime_flags(parser)
    parser.add_argument("--host", default=env("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="[env GRADIO_SERVER_NAME; default 127.0.0.1]")
    parser.add_argument("--port", type=int, default=int(env("GRADIO_SERVER_PORT", "7860")),
                        help="[env GRADIO_SERVER_PORT; default 7860]")
    parser.add_argument("--cache-limit", type=int, default=int(env("NEXTSTEP_CACHE_MB", str(CACHE_LIMIT // MB))),
                        help="MB the page's cache (uploads and results, in GRADIO_TEMP_DIR) may hold; the oldest "
                             f"files go first [env NEXTSTEP_CACHE_MB; default {CACHE_LIMIT // MB}]")
    parser.add_argument("--trusted-proxies", type=int, default=int(env("NEXTSTEP_TRUSTED_PROXIES",
                                                                        str(trusted_proxies_default()))),
                        help="proxies in front of this server whose X-Forwarded-For entries tell who a visitor is "
                             "(the upload bounds are per visitor) [env NEXTSTEP_TRUSTED_PROXIES; default: 1 on a "
                             "Hugging Face Space, else 0: the connection's own address]")
    parser.add_argument("--serve-url", default=env("NEXTSTEP_SERVE_URL"),
                        help="send requests to the Ray Serve application at this address (python -m "
                             "nextstep.serving.ray_app) instead of loading a model here; the model flags then "
                             "belong to that command [env NEXTSTEP_SERVE_URL]")
    parser.add_argument("--mcp", action="store_true", default=env("NEXTSTEP_MCP") == "1",
                        help="also serve /generate_image and /edit_image as MCP tools for agents, at "
                             "/gradio_api/mcp/ [env NEXTSTEP_MCP=1; default: off]")
    args = parser.parse_args(argv)
    try:
        args.options = runtime_options(args)
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # The page's own log lines (refused input) on stderr; other libraries' logging is left alone.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    if args.serve_url:
        try:
            services = remote_services(args.serve_url)
        except httpx.HTTPError as error:
            sys.exit(f"app.py: error: no NextStep application answers at {args.serve_url} ({error})")
    else:
        try:
            services = serve_models(args.options)
        except (NotEnoughMemoryError, ModelNotFoundError, CheckpointMismatchError, ValueError) as error:
            if os.environ.get("SPACE_ID"):  # on a Space: a page that says why, not a restart loop
                LOG.error("app.py: the model could not be loaded: %s", error)
                declare_gpu_function()
                serve_unavailable(str(error), args.host, args.port)
                return
            hint = "" if isinstance(error, NotEnoughMemoryError) else \
                "\n(choose the checkpoint with --model, --edit-model and --vae)"
            sys.exit(f"app.py: error: {error}{hint}")
    limits = PageLimits(cache=CacheBound(limit=args.cache_limit * MB), trusted_proxies=args.trusted_proxies)
    launch(build_demo(services, limits, mcp=args.mcp), args.host, args.port)


if __name__ == "__main__":
    main()
