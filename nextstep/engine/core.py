"""The engine: what a caller gave -> a complete request -> prompt rows and noise -> the one token
loop -> results. ``NextStepPipeline``, the scheduler, the bench and the CLI all drive it.

A request's life: ``Engine.request`` completes and validates it (``nextstep.engine.settings.resolve``
over the family's defaults, the official editing ones, the model's stored sets and the caller's
values; the seed drawn there when none is given). ``Engine.prepare`` turns it into a
``DecodeJob`` (prompt rows, all of its noise). ``Engine.decode`` is the token loop for runs that
share a batch key: it steps them together, makes previews at each run's cadence, drops the runs
whose sink asks to stop, and reports to each run's ``Sink``. ``Engine.finish`` decodes a run's
tokens into its result.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
from PIL import Image, ImageOps

from ..models.model import NextStepModel
from ..models.vae import AutoencoderKL
from .families import Family
from .inputs import clean_text, load_image, number
from .preview import PREVIEW_MODES, Previewer, PreviewWorker, decode_tokens, to_pil
from .prompts import IMAGE_SLOT, PromptBuilder, check_image_slot_place, with_image_slot
from .sampling import guidance_schedule, noise_draws, time_grid
from .settings import OFFICIAL_EDIT, GenerationRequest, resolve
from .sizes import Size, default_size, supported_sizes
from .steps import StepRunner
from .token_loop import BatchDecoder, DecodeJob, batch_key, batch_shape, decode_step


@dataclass
class GenerationResult:
    images: list[Image.Image]
    tokens: torch.Tensor  # (num_images, N, token_dim) float32, after use_norm
    seed: int
    parameters: dict = field(default_factory=dict)


@dataclass
class StreamEvent:
    done: int  # image tokens sampled so far
    total: int  # image tokens in all
    preview: list[Image.Image] | None = None
    result: GenerationResult | None = None


def check_preview(preview: str, preview_every) -> int:
    """Validate the preview settings; return ``preview_every`` as an int."""
    if preview not in PREVIEW_MODES:
        raise ValueError(f"preview must be one of {', '.join(PREVIEW_MODES)}, got {preview!r}")
    return number(preview_every, "preview_every", minimum=1, integer=True)


def prepare_image(image: Image.Image, size: Size) -> torch.Tensor:
    """An RGB image (``nextstep.engine.inputs.load_image``), resized and center-cropped to ``size`` ->
    (1, 3, H, W) in [-1, 1]."""
    wanted = (size.width, size.height)
    rgb = image if image.size == wanted else ImageOps.fit(image, wanted, Image.Resampling.BICUBIC)
    pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).reshape(size.height, size.width, 3)
    return ((pixels.permute(2, 0, 1).float() / 255 - 0.5) / 0.5)[None]


class Sink(Protocol):
    """Where the token loop reports one run: called on the loop's thread, and ``progress`` also
    from a ``PreviewWorker``'s, so a sink must take events from both."""

    def should_stop(self) -> bool:
        """True to leave the batch at this token (cancelled, out of time)."""

    def wants_progress(self) -> bool:
        """Whether an event without a preview is worth sending now."""

    def progress(self, event: StreamEvent) -> None: ...

    def dropped(self) -> None:
        """The run left the batch because ``should_stop`` said so."""


@dataclass(eq=False)
class Run:
    """One request in the token loop: how to preview it and where to report."""

    request: GenerationRequest
    job: DecodeJob | None  # set by ``Engine.prepare``'s caller
    sink: Sink
    preview: str = "none"
    preview_every: int = 8
    decoded: bool = False  # every token sampled: ready for ``Engine.finish``

    def preview_due(self, done: int) -> bool:
        return self.preview != "none" and done % self.preview_every == 0 and done < self.job.total


class Hooks:
    """Observes the token loop's phases ("prefill", "step", "preview", "finish"); the bench times them."""

    def timed(self, phase: str):
        return contextlib.nullcontext()


NO_HOOKS = Hooks()


class Engine:
    """A loaded model, VAE and tokenizer following one family's reference behaviour."""

    def __init__(
        self, model: NextStepModel, vae: AutoencoderKL, tokenizer, family: Family, stored: dict, name: str,
    ):
        """stored: the settings the model keeps beside its weights (``read_stored_settings``)."""
        self.model = model
        self.vae = vae
        self.tokenizer = tokenizer
        self.family = family
        self.name = name
        self.config = model.config
        self.stored = stored
        self.prompts = PromptBuilder(tokenizer, self.config.boi, bos_as_text=family.bos_as_text)
        self.previewer = Previewer(vae, self.config.latent_patch_size)
        self._previews: PreviewWorker | None = None  # ``decode``'s own, made at first use
        self._previews_pid = os.getpid()
        self.runner = StepRunner(decode_step)  # how the per-token step runs: ``set_step`` changes it
        # Where an edit prompt without ``<image>`` takes the input image: as the model was trained
        # (a model may store "image_slot"), else before the instruction, as the official examples.
        self.image_slot = check_image_slot_place(stored.get("image_slot", "before"))

    @property
    def device(self) -> torch.device:
        return self.model.device

    def set_step(self, mode: str, cuda_graphs: bool = False) -> None:
        """Run the per-token step as ``mode`` says (``steps.STEP_MODES``: eager, graph, compiled,
        background), captured once per batch shape as a CUDA graph when ``cuda_graphs`` (mode
        "graph" is the eager step captured)."""
        self.runner = StepRunner(decode_step, mode, cuda_graphs or mode == "graph", self.runner.store)

    def warm_up(self) -> None:
        """In background mode, have the step compiled now for the default request of each tab
        (one image, the model's defaults): the shapes most requests have."""
        if self.runner.compiler is None:
            return
        for image in [None] + ([Image.new("RGB", (64, 64))] if self.supports_images else []):
            job = self.prepare(self.request("a picture", image, seed=0))
            shape, make, arguments = batch_shape(self.model, [job], self.uses_position_table)
            self.runner.compiler.ask(shape, lambda make=make, arguments=arguments: (self.model, make()[0], *arguments))

    @property
    def supports_images(self) -> bool:
        return self.config.image_placeholder_id is not None

    @property
    def down_factor(self) -> int:
        """Pixels per image token along each side."""
        return self.vae.config.downsample_factor * self.config.latent_patch_size

    @property
    def uses_position_table(self) -> bool:
        return self.config.use_gen_pos_embed and self.family.position_table

    # ---- settings ------------------------------------------------------------------------

    def sizes(self, edit: bool) -> list[Size]:
        """The sizes offered for text-to-image or editing (which inlines the input image too)."""
        return supported_sizes(self.config, self.vae.config.downsample_factor, input_images=int(edit))

    def _layers(self, edit: bool) -> list[dict]:
        base = dict(self.family.defaults, size=default_size(self.sizes(edit)), num_images=1,
                    negative_prompt="", positive_prompt="")
        return [base, OFFICIAL_EDIT if edit else {}, self.stored.get("edit" if edit else "text_to_image", {})]

    def defaults(self, edit: bool) -> dict:
        """The settings a request takes when the caller gives none (the seed aside: a fresh one)."""
        values = resolve(self._layers(edit), {"seed": 0})
        values["seed"] = None
        return values

    def request(self, prompt: str, image=None, **given) -> GenerationRequest:
        """Complete a request from the defaults and ``given`` (request fields; None: not given) and
        validate it: ValueError with a message a user understands. ``image``: a PIL image, a path
        or a file's bytes (``nextstep.engine.inputs.load_image``)."""
        if prompt is None:
            raise ValueError("prompt must be text, got None")
        prompt = clean_text(prompt, "prompt")
        values = resolve(self._layers(edit=image is not None), given)
        size, down = values["size"], self.down_factor
        if size.width < down or size.height < down or size.width % down or size.height % down:
            raise ValueError(f"size: width and height must be multiples of {down} pixels, got {size.value}")
        request = GenerationRequest(prompt=prompt, image=None, grid=(size.height // down, size.width // down), **values)
        slots = prompt.count(IMAGE_SLOT)
        if slots > 1:
            raise ValueError(f"the prompt may hold at most one {IMAGE_SLOT} slot, it has {slots}")
        if image is None and slots:
            raise ValueError(f"the prompt has an {IMAGE_SLOT} slot but no image was given")
        if image is not None:
            if not self.supports_images:
                raise ValueError("this model takes no input image (its config has no image_placeholder_id)")
            request.image = load_image(image)
        table = self.config.gen_pos_embed_grid**2
        if self.uses_position_table and request.tokens > table:
            raise ValueError(f"this model supports at most {table} image tokens; {size.value} needs {request.tokens}")
        return request

    # ---- preparing -----------------------------------------------------------------------

    @staticmethod
    def batch_key(request: GenerationRequest) -> tuple:
        """A request's ``DecodeJob.batch_key``, known before preparing it."""
        return batch_key(request.grid, request.sampler, request.num_sampling_steps, request.timesteps_shift,
                         request.branches, request.use_norm)

    @torch.inference_mode()
    def prepare(self, request: GenerationRequest) -> DecodeJob:
        """A complete request -> the job to decode: prompt rows and all of its noise."""
        config, device = self.config, self.device
        generator = torch.Generator().manual_seed(request.seed)  # CPU, as the reference: same numbers on any device
        grid, total, branches = request.grid, request.tokens, request.branches

        # 1. Prompt rows for the guidance branches.
        prompt = with_image_slot(request.prompt, self.image_slot) if request.edit else request.prompt
        rows = self.prompts.rows(
            prompt, request.negative_prompt, request.positive_prompt, request.num_images, branches,
            grid if request.edit else None,
        )
        batch = self.prompts.encode(rows, grid)
        prompt_len = batch.input_ids.shape[1]
        if prompt_len + total > config.max_position_embeddings:
            raise ValueError(
                f"prompt and image need {prompt_len + total} positions; this model supports "
                f"{config.max_position_embeddings}: use a smaller size or a shorter prompt"
            )

        # 2. All random draws, in the order of the family's reference: the flow-head noise for
        # every token, and the input image's posterior sample; then the input image's latents.
        draws = noise_draws(request.sampler, request.num_sampling_steps)
        shapes = {"head": (total, draws, request.num_images, config.token_dim)}
        if request.edit:
            pixels = prepare_image(request.image, request.size).expand(batch.images_needed, -1, -1, -1)
            mean, std = self.vae.posterior(pixels.to(device))
            shapes["posterior"] = mean.shape
        noise = {
            name: torch.randn(shapes[name], generator=generator).to(device)
            for name in self.family.draw_order
            if name in shapes
        }
        image_latents = self.vae.normalize(mean + std * noise["posterior"].to(mean.dtype)) if request.edit else None
        cfg, cfg_img = guidance_schedule(
            request.cfg, request.cfg_img, request.cfg_schedule, total, self.family.linear_ramp
        )
        return DecodeJob(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            image_latents=image_latents,
            head_noise=noise["head"],
            cfg=torch.tensor(cfg, dtype=torch.float32, device=device),
            cfg_img=torch.tensor(cfg_img, dtype=torch.float32, device=device),
            grid=grid,
            branches=branches,
            sampler=request.sampler,
            times=time_grid(request.sampler, request.num_sampling_steps, request.timesteps_shift).to(device),
            use_norm=request.use_norm,
            num_sampling_steps=request.num_sampling_steps,
            timesteps_shift=request.timesteps_shift,
        )

    # ---- the token loop ------------------------------------------------------------------

    def decode(self, runs: list[Run], hooks: Hooks = NO_HOOKS, previews: PreviewWorker | None = None) -> Iterator[int]:
        """The token loop for ``runs`` (sharing one batch key): yields the number of tokens done
        after each step. Marks the runs that got every token ``decoded``; closing the generator
        stops sampling at once. Previews are decoded beside the loop, by ``previews`` (else the
        engine's own worker): each reaches its run's sink a little after its token, one due while
        the run's last is still decoding is skipped, and the loop never waits for one."""
        with torch.inference_mode(), hooks.timed("prefill"):
            decoder = BatchDecoder(self.model, [run.job for run in runs], self.uses_position_table, self.runner)
        active = list(runs)
        try:
            while active and not decoder.finished:
                with hooks.timed("step"):
                    done = decoder.step() + 1
                for run in list(active):
                    if run.sink.should_stop():
                        decoder.drop(run.job)
                        active.remove(run)
                        run.sink.dropped()
                        continue
                    if run.preview_due(done):
                        (previews or self.previews).offer(  # the engine's own worker made only once needed
                            run, done, lambda at, images, total=run.job.total: StreamEvent(at, total, images))
                    if done < run.job.total and run.sink.wants_progress():
                        run.sink.progress(StreamEvent(done, run.job.total, None))
                yield done
            for run in active:
                run.decoded = True
        finally:
            decoder.release()

    @property
    def previews(self) -> PreviewWorker:
        """The engine's own preview worker (a scheduler brings one of its own). A forked process
        (ZeroGPU's GPU worker) makes one of its own: a thread does not survive a fork."""
        if self._previews is None or self._previews_pid != os.getpid():
            self._previews, self._previews_pid = PreviewWorker(self.previewer, self.device), os.getpid()
        return self._previews

    @torch.inference_mode()
    def finish(self, run: Run, hooks: Hooks = NO_HOOKS) -> StreamEvent:
        """A decoded run's last event: its tokens turned into the result."""
        with hooks.timed("finish"):
            job, request = run.job, run.request
            pictures = to_pil(decode_tokens(self.vae, job.tokens, job.grid, self.config.latent_patch_size))
            parameters = dict(request.parameters(), model=self.name, family=self.family.name)
            if self.model.quantization:
                parameters["quantization"] = self.model.quantization
            result = GenerationResult(pictures, job.tokens.float().cpu(), request.seed, parameters)
        return StreamEvent(job.total, job.total, None, result)
