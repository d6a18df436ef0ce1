"""``NextStepPipeline``: load a checkpoint, then ``generate`` or ``stream`` images.

A thin front of ``nextstep.engine``: loading (model, VAE, tokenizer, the family and the stored
settings) is here; completing requests, the token loop and decoding are the engine's.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image

from .engine.core import Engine, GenerationResult, Run, StreamEvent, check_preview
from .engine.families import detect_family, get_family
from .engine.prompts import load_tokenizer
from .engine.settings import GenerationRequest, read_stored_settings
from .loading.checkpoints import load_model, load_vae
from .loading.hub import display_name, resolve_directory, vae_directory
from .loading.memory import checkpoint_plan, loading_refusal
from .models.model import NextStepModel
from .models.quantize import check_quantization
from .models.vae import AutoencoderKL


class _Collect:
    """The sink of a single ``stream``: the loop's event for each token waits here until the stream
    yields it, a preview (from the engine's preview worker, on its own thread) riding on the first
    one after it is ready."""

    def __init__(self):
        self._events: list[StreamEvent] = []
        self._preview: list | None = None
        self._lock = threading.Lock()

    def take(self) -> list[StreamEvent]:
        with self._lock:
            events, self._events = self._events, []
            if events and self._preview is not None:
                events[0] = dataclasses.replace(events[0], preview=self._preview)
                self._preview = None
        return events

    def should_stop(self) -> bool:
        return False  # closing the stream is how its caller stops it

    def wants_progress(self) -> bool:
        return True

    def progress(self, event: StreamEvent) -> None:
        with self._lock:
            if event.preview is not None:
                self._preview = event.preview
            else:
                self._events.append(event)

    def dropped(self) -> None:
        raise AssertionError("a single stream is never dropped")


class NextStepPipeline:
    """A loaded NextStep model with its VAE and tokenizer; ``stream`` and ``generate`` sample images.

    ``family`` ("nextstep-1" or "nextstep-1.1") says which reference behaviour to follow; None
    detects it from the checkpoint's config (see ``nextstep.engine.families``).
    """

    def __init__(
        self, model: NextStepModel, vae: AutoencoderKL, tokenizer, name: str = "nextstep", family: str | None = None,
        directory: Path | None = None,
    ):
        self.directory = directory  # where the checkpoint was loaded from (a Hub id's local snapshot), if anywhere
        chosen = get_family(family or detect_family(model.config))
        self.engine = Engine(model, vae, tokenizer, chosen, read_stored_settings(directory), name)

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path,
        vae: str | Path | None = None,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        family: str | None = None,
        quantize: str | None = None,
        check_memory: bool = True,
    ) -> NextStepPipeline:
        """Load a model directory or Hub id; ``vae=None`` takes ``config.vae_name_or_path``
        (relative to the model directory), else a ``vae/`` folder inside the model (where
        NextStep-1.1 ships its VAE). ``family=None`` detects the family from the config; VAE
        config fields left out take that family's defaults. ``quantize`` ("int8", "int4", "fp8" or
        None) quantizes the backbone's weights while they load (``nextstep.models.quantize``); a
        checkpoint stored in 4 bits (auto-round W4A16) loads as stored.

        Before any weight is read, the memory plan of one request (``nextstep.loading.memory.one_request``)
        is checked against the device's free memory: ``NotEnoughMemoryError`` names the need and the
        options. ``check_memory=False`` skips it (a caller that checked several models together)."""
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        chosen = get_family(family) if family is not None else None  # an unknown name fails before loading
        device = torch.device(device)
        check_quantization(quantize, device)
        if check_memory:
            checkpoint_plan(model, device, dtype, quantize, vae).check()
        model_dir = resolve_directory(model, "model")
        try:
            network = load_model(model_dir, device, dtype, quantize=quantize)
        except torch.OutOfMemoryError as error:
            raise loading_refusal(model_dir, device, dtype, quantize) from error
        chosen = chosen or get_family(detect_family(network.config))
        vae_dir = vae_directory(model_dir, vae, network.config.vae_name_or_path)
        autoencoder = load_vae(vae_dir, device, dtype, defaults=chosen.vae_defaults)
        return cls(network, autoencoder, load_tokenizer(model_dir), name=display_name(model), family=chosen.name,
                   directory=model_dir)

    def compile(self, mode: str = "compiled", cuda_graph: bool | None = None) -> None:
        """Speed up the per-token step (backbone decode, every flow-head step, guidance, use_norm).

        mode "compiled": ``torch.compile(fullgraph=True)``, one graph per batch shape, compiled the
        first time that shape runs (minutes on a small CPU, see docs/performance.md), then reused;
        "background": compiled on a thread of its own while the eager step serves, each shape
        switching once its compile is ready; "graph" (CUDA): the eager step captured as a CUDA
        graph, no compile; "eager": back to the plain step. ``cuda_graph`` (default: on CUDA)
        also captures the (compiled) step as a CUDA graph, once per batch shape: one launch per
        token instead of thousands. Opt-in and per instance."""
        captured = mode != "eager" and self.device.type == "cuda" if cuda_graph is None else cuda_graph
        self.engine.set_step(mode, captured)

    # ---- what users need to know about the loaded model ------------------------------------

    @property
    def model(self) -> NextStepModel:
        return self.engine.model

    @property
    def vae(self) -> AutoencoderKL:
        return self.engine.vae

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def name(self) -> str:
        return self.engine.name

    @property
    def config(self):
        return self.engine.config

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def family(self) -> str:
        """Which reference behaviour this checkpoint follows: "nextstep-1" or "nextstep-1.1"."""
        return self.engine.family.name

    @property
    def supports_images(self) -> bool:
        return self.engine.supports_images

    def defaults(self, edit: bool = False) -> dict:
        """The settings ``generate`` and ``stream`` use where the caller gives none (seed: None,
        a fresh one): the family's, then the official editing ones for an edit, then the
        settings the model stores beside its weights."""
        return self.engine.defaults(edit)

    # ---- generating ------------------------------------------------------------------------

    def generate(self, prompt: str, image: Image.Image | None = None, **settings) -> GenerationResult:
        """Sample to the end without previews and return the result."""
        for event in self.stream(prompt, image, preview="none", **settings):
            if event.result is not None:
                return event.result
        raise RuntimeError("the token loop ended without a result")

    def stream(
        self, prompt: str, image: Image.Image | None = None, *, preview_every: int = 8, preview: str = "vae",
        **settings,
    ) -> Iterator[StreamEvent]:
        """Yield one event per sampled token; previews ("vae", "fast" or "none") of every
        ``preview_every``-th token, decoded beside the token loop, each on the first event after it
        is ready (one due while the last is still decoding is skipped); the last event carries the
        result. Closing the generator stops sampling. ``settings`` are ``GenerationRequest``
        fields; those not given take ``defaults``. Bad values raise ValueError here, before
        anything runs."""
        request = self.engine.request(prompt, image, **settings)
        return self.stream_request(request, preview=preview, preview_every=preview_every)

    def stream_request(
        self, request: GenerationRequest, *, preview: str = "vae", preview_every: int = 8,
    ) -> Iterator[StreamEvent]:
        """``stream`` for a request already completed by ``engine.request`` (one handed between
        processes, say): nothing is resolved or validated again but the preview settings."""
        run = Run(request, None, _Collect(), preview, check_preview(preview, preview_every))
        return self._events(run)

    def _events(self, run: Run) -> Iterator[StreamEvent]:
        run.job = self.engine.prepare(run.request)
        for _ in self.engine.decode([run]):
            yield from run.sink.take()
        yield self.engine.finish(run)
