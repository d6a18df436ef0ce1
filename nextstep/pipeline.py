"""Request -> prompt rows -> prefill -> token loop -> events. The one place that orchestrates."""

from __future__ import annotations

import dataclasses
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageOps

from .decoding import BatchDecoder, DecodeJob, batch_key
from .families import detect_family, get_family
from .hub import ModelNotFoundError, resolve_directory
from .inputs import clean_text, load_image, number
from .model import NextStepModel
from .preview import PREVIEW_MODES, Previewer, decode_tokens, to_pil
from .prompts import (
    IMAGE_SLOT, PromptBuilder, check_image_slot_place, guidance_branches, load_tokenizer, with_image_slot,
)
from .sampling import CFG_SCHEDULES, SAMPLERS, guidance_schedule, noise_draws, time_grid
from .vae import AutoencoderKL

MAX_SEED = 2**63 - 1
# Sampling settings a model trained here stores beside its weights: a "text_to_image" and an
# "edit" set of GenerationRequest keywords (official checkpoints have no such sets).
STORED_SETTINGS = "generation_config.json"


@dataclass
class GenerationRequest:
    """Everything that determines one generation (the input image aside, all plain values)."""

    prompt: str
    image: Image.Image | None = None
    negative_prompt: str | None = None
    positive_prompt: str | None = None
    hw: tuple[int, int] = (256, 256)
    num_images: int = 1
    cfg: float = 7.5
    cfg_img: float = 1.0
    cfg_schedule: str = "constant"
    timesteps_shift: float = 1.0
    num_sampling_steps: int = 50
    use_norm: bool = True
    seed: int | None = 42
    sampler: str | None = None  # None: the model family's sampler

    def parameters(self) -> dict:
        """The request as JSON-ready values (without the image), to store beside results."""
        values = dataclasses.asdict(dataclasses.replace(self, image=None))
        del values["image"]
        values["hw"] = list(self.hw)
        values["edit"] = self.image is not None
        return values


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


def prepare_image(image: Image.Image, hw: tuple[int, int]) -> torch.Tensor:
    """An RGB image (``nextstep.inputs.load_image``), resized and center-cropped to hw -> (1, 3, H, W) in [-1, 1]."""
    height, width = hw
    rgb = image if image.size == (width, height) else ImageOps.fit(image, (width, height), Image.Resampling.BICUBIC)
    pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).reshape(height, width, 3)
    return ((pixels.permute(2, 0, 1).float() / 255 - 0.5) / 0.5)[None]


def _vae_directory(model_dir: Path, requested: str | Path | None, configured: str | None) -> Path:
    """The VAE asked for; else the one the config names; else the ``vae/`` folder bundled with
    the model. A configured path that does not exist here (often a path on the machine the
    checkpoint was made on) gives way to a bundled VAE."""
    if requested is not None:
        return resolve_directory(requested, "VAE", relative_to=model_dir)
    bundled = model_dir / "vae"
    if configured is not None:
        try:
            return resolve_directory(configured, "VAE", relative_to=model_dir)
        except ModelNotFoundError:
            if not bundled.is_dir():
                raise
    if bundled.is_dir():
        return bundled
    raise ModelNotFoundError(f"no VAE for {model_dir}: pass vae=..., or set vae_name_or_path in its config.json")


class NextStepPipeline:
    """A loaded NextStep model with its VAE and tokenizer; ``stream`` and ``generate`` sample images.

    ``family`` ("nextstep-1" or "nextstep-1.1") says which reference behaviour to follow; None
    detects it from the checkpoint's config (see ``nextstep.families``).
    """

    def __init__(
        self, model: NextStepModel, vae: AutoencoderKL, tokenizer, name: str = "nextstep", family: str | None = None,
        directory: Path | None = None,
    ):
        self.model = model
        self.vae = vae
        self.tokenizer = tokenizer
        self.name = name
        self.directory = directory  # where the checkpoint was loaded from (a Hub id's local snapshot), if anywhere
        self.config = model.config
        self._family = get_family(family or detect_family(self.config))
        self.prompts = PromptBuilder(tokenizer, self.config.boi, bos_as_text=self._family.bos_as_text)
        self.previewer = Previewer(vae, self.config.latent_patch_size)
        stored = directory / STORED_SETTINGS if directory is not None else None
        self._stored = json.loads(stored.read_text()) if stored is not None and stored.is_file() else {}
        # Where an edit prompt without ``<image>`` takes the input image: as the model was trained
        # (a model may store "image_slot"), else before the instruction, as the official examples.
        self.image_slot = check_image_slot_place(self._stored.get("image_slot", "before"))

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path,
        vae: str | Path | None = None,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        family: str | None = None,
    ) -> NextStepPipeline:
        """Load a model directory or Hub id; ``vae=None`` takes ``config.vae_name_or_path``
        (relative to the model directory), else a ``vae/`` folder inside the model (where
        NextStep-1.1 ships its VAE). ``family=None`` detects the family from the config; VAE
        config fields left out take that family's defaults."""
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        chosen = get_family(family) if family is not None else None  # an unknown name fails before loading
        device = torch.device(device)
        model_dir = resolve_directory(model, "model")
        network = NextStepModel.from_directory(model_dir, device, dtype)
        chosen = chosen or get_family(detect_family(network.config))
        vae_dir = _vae_directory(model_dir, vae, network.config.vae_name_or_path)
        autoencoder = AutoencoderKL.from_directory(vae_dir, device, dtype, defaults=chosen.vae_defaults)
        return cls(network, autoencoder, load_tokenizer(model_dir), name=str(model), family=chosen.name, directory=model_dir)

    def compile(self, mode: str | None = None) -> None:
        """Compile the flow-head velocity net, the per-token hot spot, with ``torch.compile``.

        Opt-in and per instance. ``mode`` defaults to "reduce-overhead" on CUDA (CUDA graphs:
        one launch per evaluation instead of dozens of small kernels) and "default" elsewhere.
        Each new batch shape compiles once; on CPU the compile time outweighs the gain for
        small models (see the README's performance notes).
        """
        mode = mode or ("reduce-overhead" if self.device.type == "cuda" else "default")
        net = self.model.image_head.net
        net.forward_modulated = torch.compile(net.forward_modulated, mode=mode, dynamic=False)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def family(self) -> str:
        """Which reference behaviour this checkpoint follows: "nextstep-1" or "nextstep-1.1"."""
        return self._family.name

    def default_settings(self) -> dict:
        """Sampling settings the reference uses with this family, for UIs and the CLI to show:
        num_sampling_steps, cfg, cfg_img, timesteps_shift, cfg_schedule, use_norm, sampler."""
        return dict(self._family.defaults)

    def stored_settings(self, edit: bool) -> dict:
        """The sampling settings the model stores for text-to-image or for editing (see
        STORED_SETTINGS); ``generate`` and ``stream`` start from them. Empty when it has none."""
        return dict(self._stored.get("edit" if edit else "text_to_image", {}))

    @property
    def supports_images(self) -> bool:
        return self.config.image_placeholder_id is not None

    @property
    def down_factor(self) -> int:
        """Pixels per image token along each side."""
        return self.vae.config.downsample_factor * self.config.latent_patch_size

    # ---- public API ----------------------------------------------------------------------

    def generate(self, prompt: str, image: Image.Image | None = None, **kwargs) -> GenerationResult:
        """Sample to the end without previews and return the result."""
        for event in self.stream(prompt, image, preview="none", **kwargs):
            if event.result is not None:
                return event.result
        raise RuntimeError("the token loop ended without a result")

    def stream(
        self,
        prompt: str,
        image: Image.Image | None = None,
        *,
        preview_every: int = 8,
        preview: str = "vae",
        **kwargs,
    ) -> Iterator[StreamEvent]:
        """Yield one event per sampled token; previews every ``preview_every`` tokens; the
        last event carries the result. Closing the generator stops sampling.

        Settings are ``GenerationRequest``'s fields; those not given take the model's stored
        settings (``stored_settings``), then ``GenerationRequest``'s defaults; ``sampler=None``
        takes the family's sampler."""
        settings = {**self.stored_settings(edit=image is not None), **kwargs}
        request = GenerationRequest(prompt=prompt, image=image, **settings)
        self.validate(request)
        preview_every = self.check_preview(preview, preview_every)
        return self._run(request, preview_every, preview)

    @staticmethod
    def check_preview(preview: str, preview_every) -> int:
        """Validate the preview settings; return ``preview_every`` as an int."""
        if preview not in PREVIEW_MODES:
            raise ValueError(f"preview must be one of {', '.join(PREVIEW_MODES)}, got {preview!r}")
        return number(preview_every, "preview_every", minimum=1, integer=True)

    def validate(self, request: GenerationRequest) -> None:
        """Raise ValueError with a message a user understands; normalise the request in place
        (numbers from numeric text, control characters out of prompts, images to RGB; see
        ``nextstep.inputs``)."""
        if request.prompt is None:
            raise ValueError("prompt must be text, got None")
        request.prompt = clean_text(request.prompt, "prompt")
        request.negative_prompt = clean_text(request.negative_prompt, "negative_prompt")
        request.positive_prompt = clean_text(request.positive_prompt, "positive_prompt")
        if not isinstance(request.hw, (tuple, list)) or len(request.hw) != 2:
            raise ValueError(f"hw must be (height, width), got {request.hw!r}")
        step = self.down_factor
        request.hw = tuple(number(v, side, minimum=step, integer=True) for side, v in zip(("height", "width"), request.hw))
        if any(v % step for v in request.hw):
            raise ValueError(f"height and width must be multiples of {step}, got {request.hw[0]}x{request.hw[1]}")
        request.num_images = number(request.num_images, "num_images", minimum=1, integer=True)
        request.cfg = number(request.cfg, "cfg (text guidance)", minimum=1.0)
        request.cfg_img = number(request.cfg_img, "cfg_img (image guidance)", minimum=1.0)
        request.timesteps_shift = number(request.timesteps_shift, "timesteps_shift")
        if request.timesteps_shift <= 0:
            raise ValueError(f"timesteps_shift must be greater than 0, got {request.timesteps_shift!r}")
        request.num_sampling_steps = number(request.num_sampling_steps, "num_sampling_steps", minimum=1, integer=True)
        if request.cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule must be one of {', '.join(CFG_SCHEDULES)}, got {request.cfg_schedule!r}")
        if request.sampler is None:
            request.sampler = self._family.defaults["sampler"]
        if request.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {request.sampler!r}")
        if not isinstance(request.use_norm, bool):
            raise ValueError(f"use_norm must be true or false, got {request.use_norm!r}")
        if request.seed is not None:
            request.seed = number(request.seed, "seed", minimum=0, maximum=MAX_SEED, integer=True)
        slots = request.prompt.count(IMAGE_SLOT)
        if slots > 1:
            raise ValueError(f"the prompt may hold at most one {IMAGE_SLOT} slot, it has {slots}")
        if request.image is None and slots:
            raise ValueError(f"the prompt has an {IMAGE_SLOT} slot but no image was given")
        if request.image is not None:
            if not self.supports_images:
                raise ValueError("this model takes no input image (its config has no image_placeholder_id)")
            request.image = load_image(request.image)
        tokens = (request.hw[0] // step) * (request.hw[1] // step)
        table = self.config.gen_pos_embed_grid**2
        if self.uses_position_table and tokens > table:
            raise ValueError(f"this model supports at most {table} image tokens; {request.hw} needs {tokens}")

    @property
    def uses_position_table(self) -> bool:
        return self.config.use_gen_pos_embed and self._family.position_table

    # ---- the token loop ------------------------------------------------------------------

    def batch_key(self, request: GenerationRequest) -> tuple:
        """A validated request's ``DecodeJob.batch_key``, known before preparing it."""
        grid = (request.hw[0] // self.down_factor, request.hw[1] // self.down_factor)
        branches = guidance_branches(request.cfg, request.cfg_img, request.image is not None)
        return batch_key(
            grid, request.sampler, request.num_sampling_steps, request.timesteps_shift, branches, request.use_norm
        )

    @torch.inference_mode()
    def prepare(self, request: GenerationRequest) -> tuple[DecodeJob, int]:
        """A validated request -> the job to decode (prompt rows, all its noise) and its seed."""
        model, config, device = self.model, self.config, self.device
        seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED)
        generator = torch.Generator().manual_seed(seed)  # CPU, as the reference: same numbers on any device
        grid = (request.hw[0] // self.down_factor, request.hw[1] // self.down_factor)
        total = grid[0] * grid[1]

        # 1. Prompt rows for the guidance branches.
        has_image = request.image is not None
        branches = guidance_branches(request.cfg, request.cfg_img, has_image)
        prompt = with_image_slot(request.prompt, self.image_slot) if has_image else request.prompt
        rows = self.prompts.rows(
            prompt, request.negative_prompt, request.positive_prompt, request.num_images, branches,
            grid if has_image else None,
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
        if has_image:
            pixels = prepare_image(request.image, request.hw).expand(batch.images_needed, -1, -1, -1)
            mean, std = self.vae.posterior(pixels.to(device))
            shapes["posterior"] = mean.shape
        noise = {
            name: torch.randn(shapes[name], generator=generator).to(device)
            for name in self._family.draw_order
            if name in shapes
        }
        image_latents = self.vae.normalize(mean + std * noise["posterior"].to(mean.dtype)) if has_image else None
        cfg, cfg_img = guidance_schedule(
            request.cfg, request.cfg_img, request.cfg_schedule, total, self._family.linear_ramp
        )
        job = DecodeJob(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            image_latents=image_latents,
            head_noise=noise["head"],
            cfg=torch.tensor(cfg, dtype=torch.float32, device=device),
            cfg_img=torch.tensor(cfg_img, dtype=torch.float32, device=device),
            grid=grid,
            branches=branches,
            sampler=request.sampler,
            time_grid=time_grid(request.sampler, request.num_sampling_steps, request.timesteps_shift).to(device),
            use_norm=request.use_norm,
            num_sampling_steps=request.num_sampling_steps,
            timesteps_shift=request.timesteps_shift,
        )
        return job, seed

    def decoder(self, jobs: list[DecodeJob]) -> BatchDecoder:
        """Prefill ``jobs`` (sharing one batch key) and return their token loop."""
        return BatchDecoder(self.model, jobs, self.uses_position_table)

    @torch.inference_mode()
    def preview(self, job: DecodeJob, mode: str) -> list[Image.Image]:
        """The job's partly sampled grid as pictures; tokens not sampled yet are zero."""
        return self.previewer(job.tokens, job.grid, mode)

    @torch.inference_mode()
    def finish(self, job: DecodeJob, request: GenerationRequest, seed: int) -> GenerationResult:
        """Decode a finished job's tokens into the result."""
        pictures = to_pil(decode_tokens(self.vae, job.tokens, job.grid, self.config.latent_patch_size))
        parameters = dict(request.parameters(), seed=seed, model=self.name, family=self.family)
        return GenerationResult(pictures, job.tokens.float().cpu(), seed, parameters)

    def _run(self, request: GenerationRequest, preview_every: int, preview: str) -> Iterator[StreamEvent]:
        job, seed = self.prepare(request)
        decoder = self.decoder([job])
        while not decoder.finished:
            k = decoder.step()
            if k + 1 < job.total:
                show = preview != "none" and (k + 1) % preview_every == 0
                yield StreamEvent(k + 1, job.total, self.preview(job, preview) if show else None)
        yield StreamEvent(job.total, job.total, None, self.finish(job, request, seed))
