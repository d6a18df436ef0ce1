"""Pictures of a partly sampled token grid, for live previews.

Tokens not sampled yet are zero (the mean of the normalised token space). ``"vae"`` runs the
VAE decoder on that latent; ``"fast"`` applies a per-VAE linear map from latent channels to
RGB and upsamples, at almost no cost. Either way the picture is then masked: where no token is
sampled yet it shows a neutral fill (the decoder's guess of empty tokens is a purple-grey mush
that reads as a broken picture), and a thin line marks the row being sampled.

The fast map is fitted once per VAE, lazily on first use: a handful of smooth synthetic
pictures are encoded and least squares relates each latent pixel to the mean colour of the
8x8 pixels it covers. Deriving it at load time makes it work for any VAE, the official one
included, with nothing extra to ship or keep in step with the weights.

``PreviewWorker`` decodes previews on a thread of its own (and a CUDA stream of its own), so a
token loop that hands them over never waits for one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
import time
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from PIL import Image

from ..models.tokens import unpatchify
from ..models.vae import AutoencoderKL

PREVIEW_MODES = {"vae": "Exact", "fast": "Fast", "none": "Off"}  # value -> label
NEUTRAL = (204, 204, 204)  # RGB of the area no token has reached yet
MARKER = (255, 128, 0)  # RGB of the line under the row being sampled


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) pixels in [-1, 1] -> RGB images; ``round(clamp(x/2 + 0.5, 0, 1) * 255)``."""
    values = torch.round((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).to(torch.uint8)
    return [Image.fromarray(v.permute(1, 2, 0).cpu().numpy()) for v in values]


def _unit(rgb: tuple[int, int, int]) -> torch.Tensor:
    """An RGB colour as (3, 1, 1) pixel values in [-1, 1], exact through ``to_pil``."""
    return torch.tensor(rgb, dtype=torch.float32)[:, None, None] / 127.5 - 1


def mask_unsampled(pixels: torch.Tensor, grid: tuple[int, int], done: int) -> torch.Tensor:
    """(B, 3, H, W) pixels of a grid whose first ``done`` tokens (raster order) are sampled: the
    rest painted ``NEUTRAL``, and a line of ``MARKER`` along the bottom of the row being sampled."""
    rows, columns = grid
    height, width = pixels.shape[-2:]
    side_y, side_x = height // rows, width // columns  # pixels per token
    row, column = divmod(done, columns)  # the row being sampled, and how far along it
    if row >= rows:
        return pixels
    out = pixels.float().clone()
    neutral, marker = _unit(NEUTRAL).to(out.device), _unit(MARKER).to(out.device)
    out[..., (row + 1) * side_y:, :] = neutral
    out[..., row * side_y:(row + 1) * side_y, column * side_x:] = neutral
    thickness = max(1, side_y // 8)
    bottom = (row + 1) * side_y
    out[..., bottom - thickness:bottom, :] = marker
    return out


def replay_stages(images: list[Image.Image], tokens: int, count: int) -> list[list[Image.Image]]:
    """A finished request's pictures as they were being sampled, at ``count`` evenly spaced points,
    then as they are: each the final picture masked as ``mask_unsampled`` masks a preview. A token
    never changes once sampled, so a point's sampled area is the final one's; nothing is decoded
    again (near the front, the VAE's picture of a partial grid may differ by a few pixels)."""
    width, height = images[0].size
    down = round(math.sqrt(width * height / tokens))  # pixels per token side
    grid = (height // down, width // down)
    pixels = torch.stack([torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
                          .reshape(height, width, 3).permute(2, 0, 1) for image in images]).float() / 127.5 - 1
    points = [round(tokens * index / (count + 1)) for index in range(1, count + 1)]
    return [*(to_pil(mask_unsampled(pixels, grid, done)) for done in points), list(images)]


def decode_tokens(vae: AutoencoderKL, tokens: torch.Tensor, grid: tuple[int, int], patch: int) -> torch.Tensor:
    """Image tokens (B, N, D) -> VAE pixels (B, 3, H, W), unclamped."""
    latents = vae.denormalize(unpatchify(tokens.to(vae.dtype), grid, patch))
    return vae.decode(latents)


def fit_fast_preview(vae: AutoencoderKL, size: int = 64, count: int = 24, seed: int = 0) -> torch.Tensor:
    """Least-squares (z + 1, 3) map from normalised latent channels (plus a bias) to RGB in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 4, 4, generator=generator) * 2 - 1
    pictures = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    device = vae.encoder.conv_in.weight.device
    mean, _ = vae.posterior(pictures.to(device))
    latents = vae.normalize(mean).float().cpu()  # (count, z, size/f, size/f)
    colours = F.avg_pool2d(pictures, vae.config.downsample_factor)  # (count, 3, size/f, size/f)
    inputs = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    inputs = torch.cat([inputs, torch.ones(inputs.shape[0], 1)], dim=1)
    targets = colours.permute(0, 2, 3, 1).reshape(-1, 3)
    return torch.linalg.lstsq(inputs, targets).solution


class Previewer:
    def __init__(self, vae: AutoencoderKL, patch: int):
        self.vae = vae
        self.patch = patch
        self._fast_map: torch.Tensor | None = None

    def __call__(self, tokens: torch.Tensor, grid: tuple[int, int], mode: str, done: int | None = None
                 ) -> list[Image.Image]:
        """The pictures of ``tokens`` (B, N, D) on ``grid``; with ``done``, those not sampled yet masked."""
        if mode == "vae":
            pixels = decode_tokens(self.vae, tokens, grid, self.patch)
        else:
            if self._fast_map is None:
                self._fast_map = fit_fast_preview(self.vae)
            latents = unpatchify(tokens.float().cpu(), grid, self.patch)  # (B, z, h*p, w*p)
            rgb = torch.einsum("bchw,cd->bdhw", latents, self._fast_map[:-1]) + self._fast_map[-1][None, :, None, None]
            pixels = F.interpolate(rgb, scale_factor=self.vae.config.downsample_factor, mode="nearest")
        return to_pil(pixels if done is None else mask_unsampled(pixels, grid, done))


class PreviewWorker:
    """Decodes previews off the token loop: ``offer`` snapshots a run's tokens and returns at once;
    the picture reaches the run's sink as a ``StreamEvent`` when it is ready. A run whose previous
    preview is still being decoded gets none this time (its next one is at most a cadence away),
    so previews never queue up behind a slow decoder, and the loop and the final decode never
    wait behind them.

    ``min_interval``: the fewest seconds between the starts of two previews of one run. A page
    shows a frame per ``frame_interval`` at most; decoding more would only take the processor
    (and, on a CPU, the interpreter's lock) from the token loop for pictures nobody sees."""

    def __init__(self, decode: Callable[[torch.Tensor, tuple[int, int], str, int], list[Image.Image]], device,
                 min_interval: float = 0.0):
        self._decode = decode
        self._device = torch.device(device)
        self.min_interval = min_interval
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._busy: set[int] = set()  # ids of runs with a preview in flight
        self._started: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # run -> its last preview's start
        self.decoded, self.decode_seconds = 0, 0.0  # previews decoded so far, and the time it took
        self._lock = threading.Condition()
        self._stream = torch.cuda.Stream(self._device) if self._device.type == "cuda" else None
        threading.Thread(target=self._work, name="nextstep-previews", daemon=True).start()

    def offer(self, run, done: int, make_event: Callable) -> bool:
        """Decode ``run``'s preview after ``done`` tokens unless one is in flight; True if taken.
        ``make_event(done, images)`` builds what the sink receives."""
        now = time.monotonic()
        with self._lock:
            if id(run) in self._busy or now - self._started.get(run, -math.inf) < self.min_interval:
                return False
            self._busy.add(id(run))
            self._started[run] = now
        tokens = run.job.tokens.clone()  # the loop goes on writing into the original
        ready = None
        if self._stream is not None:  # the clone is queued on the loop's stream: wait for it there
            ready = torch.cuda.Event()
            ready.record()
        self._jobs.put((run, done, tokens, ready, make_event))
        return True

    def _work(self) -> None:
        while True:
            run, done, tokens, ready, make_event = self._jobs.get()
            try:
                on_stream = torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()
                start = time.perf_counter()
                with torch.inference_mode(), on_stream:
                    if ready is not None:
                        self._stream.wait_event(ready)
                    images = self._decode(tokens, run.job.grid, run.preview, done)  # PIL images: on the host now
                self.decoded, self.decode_seconds = self.decoded + 1, self.decode_seconds + time.perf_counter() - start
                run.sink.progress(make_event(done, images))
            except Exception as error:  # noqa: BLE001 - a preview that fails must not fail its request
                logging.getLogger(__name__).warning("a preview could not be decoded: %r", error)
            finally:
                with self._lock:
                    self._busy.discard(id(run))
                    self._lock.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no preview is being decoded (every one offered has reached its sink)."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._busy, timeout)
