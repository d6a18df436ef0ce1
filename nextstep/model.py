"""NextStep: the backbone, the image projectors and the flow-matching head, with official names.

Top-level parameter names match the released checkpoints: ``embed_tokens``, ``layers.N``,
``norm``, ``image_in_projector``, ``image_out_projector``, ``image_head.net`` and the buffer
``gen_pos_embed``. The checkpoints' ``lm_head`` (text logits, 0.78 B parameters in the 14B
release) is never built: images do not use it, and loading leaves it in the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

from .backbone import DecoderLayer, StaticKVCache, causal_mask, flash_attn_module
from .config import NextStepConfig
from .flow_head import FlowMatchingHead
from .quantize import check_quantization, is_quantized, quantize_linear, quantized_linears
from .tokens import patchify
from .weights import Checkpoint, load_strict, save_safetensors

# Checkpoint tensors that image generation never uses: present in the releases, left unread.
UNUSED_KEYS = frozenset({"lm_head.weight"})


def sincos_2d_table(dim: int, grid: int) -> torch.Tensor:
    """(grid*grid, dim) fixed 2-D sin-cos table, row-major; first half of channels encodes the column."""

    def table_1d(half_dim: int, pos: torch.Tensor) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(half_dim // 2, dtype=torch.float64) / (half_dim / 2))
        out = pos.reshape(-1, 1).double() * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # sin first

    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([table_1d(dim // 2, cols), table_1d(dim // 2, rows)], dim=1).float()


class NextStepModel(nn.Module):
    def __init__(self, config: NextStepConfig):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, hidden, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(hidden, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)
        self.image_in_projector = nn.Linear(config.token_dim, hidden)
        self.image_out_projector = nn.Linear(hidden, hidden)
        self.image_head = FlowMatchingHead(config.token_dim, hidden, config.fm_head_dim, config.fm_head_layers)
        grid = config.gen_pos_embed_grid
        self.register_buffer("gen_pos_embed", sincos_2d_table(hidden, grid)[None], persistent=True)
        self.quantization: str | None = None  # how the backbone's weights are held ("int8", "fp8")
        self.use_flash_attention = True  # where flash-attn is installed (the bench compares it with SDPA)

    # ---- loading and saving -------------------------------------------------------------

    @classmethod
    def from_directory(
        cls, directory: Path, device="cpu", dtype=torch.float32, quantize: str | None = None
    ) -> NextStepModel:
        """Build on the meta device and take the checkpoint's tensors one at a time (no random
        init, one copy). ``quantize`` ("int8" or "fp8", see ``nextstep.quantize``) quantizes each
        backbone linear weight as soon as it is on the device, before the next one is read, so the
        full-precision backbone is never held there."""
        directory = Path(directory)
        device = torch.device(device)
        check_quantization(quantize, device)
        config = NextStepConfig.from_pretrained(directory)
        checkpoint = Checkpoint(directory)
        if "o_attention_bias" not in json.loads((directory / "config.json").read_text()):
            # Officially a missing o_attention_bias follows attention_bias, and o_proj biases absent
            # from the file are zero-filled: the same numbers as no bias. Reading the choice from the
            # file gives the official result either way, stays strict about a partial set of biases,
            # and holds no zeros.
            config.o_attention_bias = any(key.endswith("self_attn.o_proj.bias") for key in checkpoint.shapes)
        with torch.device("meta"):
            model = cls(config)
        linears = quantized_linears(model) if quantize else {}
        to_quantize = {f"{name}.weight": linear for name, linear in linears.items()}

        def loaded(key: str) -> None:
            if key in to_quantize:
                quantize_linear(to_quantize[key], quantize)

        try:
            # NextStep-1 checkpoints carry the position table; NextStep-1.1 ones need not.
            keys = load_strict(
                model, checkpoint, f"checkpoint {directory}", device, dtype,
                optional=frozenset({"gen_pos_embed"}), unused=UNUSED_KEYS, loaded=loaded,
            )
        except torch.OutOfMemoryError as error:
            from .memory import loading_refusal, weight_bytes  # memory builds models: imported here, not at the top

            with torch.device("meta"):
                need = weight_bytes(cls(config), dtype, quantize)
            raise loading_refusal(f"{directory} ({str(dtype).removeprefix('torch.')})", device, need) from error
        model._build_computed_buffers(device, keep_loaded="gen_pos_embed" in keys)
        model.quantization = quantize
        return model.eval()

    @classmethod
    def with_random_weights(cls, config: NextStepConfig, device="cpu", dtype=torch.float32, seed: int = 0):
        """A model of ``config``'s shape with small random weights, allocated once on ``device``
        in ``dtype`` (for speed measurements at real size without a checkpoint)."""
        with torch.device("meta"):
            model = cls(config).to(dtype)
        model.to_empty(device=device)
        generator = torch.Generator(device=device).manual_seed(seed)
        for name, parameter in model.named_parameters():
            if name.endswith(("norm.weight", "in_ln.weight")):  # RMSNorm / LayerNorm gains
                parameter.data.fill_(1.0)
            else:
                parameter.data.normal_(0.0, 0.02, generator=generator)
        model._build_computed_buffers(device, keep_loaded=False)
        return model.eval()

    def quantize_weights(self, quantize: str) -> None:
        """Quantize the backbone's weights of a model already loaded (``from_directory`` does it
        while loading instead, so that full precision never fills the device)."""
        check_quantization(quantize, self.device)
        for linear in quantized_linears(self).values():
            quantize_linear(linear, quantize)
        self.quantization = quantize

    def _build_computed_buffers(self, device, keep_loaded: bool) -> None:
        with torch.device(device):
            self.rotary_emb = LlamaRotaryEmbedding(self.config)
        if not keep_loaded:
            table = sincos_2d_table(self.config.hidden_size, self.config.gen_pos_embed_grid)[None]
            self.gen_pos_embed = table.to(device=device, dtype=self.embed_tokens.weight.dtype)

    def save_pretrained(self, directory: Path) -> None:
        if is_quantized(self):
            raise ValueError("a quantized model cannot be saved (quantization happens while loading): save it unquantized")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(directory)
        save_safetensors(self, directory, self.config.dtype)  # weights stored in the dtype the config names

    # ---- forward pieces used by the token loop ------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def embed(self, input_ids: torch.Tensor, image_latents: torch.Tensor | None = None) -> torch.Tensor:
        """Text embeddings, with image placeholders replaced by projected image tokens.

        image_latents: (n_img, C, H/8, W/8) normalised latents; image i fills the placeholders of
        the i-th row that has any (rows are scanned in order).
        """
        embeds = self.embed_tokens(input_ids)
        if image_latents is None:
            return embeds
        image_embeds = self.image_in_projector(patchify(image_latents.to(self.dtype), self.config.latent_patch_size))
        rows = (input_ids == self.config.image_placeholder_id).any(dim=1).nonzero().flatten().tolist()
        if len(rows) != image_embeds.shape[0]:
            raise ValueError(f"{len(rows)} prompt rows hold an image slot but {image_embeds.shape[0]} images were given")
        for image_index, row in enumerate(rows):
            slots = input_ids[row] == self.config.image_placeholder_id
            if int(slots.sum()) != image_embeds.shape[1]:
                raise ValueError("the image slot in the prompt does not match the image's token count")
            embeds[row, slots] = image_embeds[image_index]
        return embeds

    def forward_backbone(
        self,
        embeds: torch.Tensor,
        slots: torch.Tensor,
        valid: torch.Tensor,
        cache: StaticKVCache | None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the decoder over ``embeds`` (B, T, hidden) stored at cache ``slots`` (T,).

        valid: (B, T) bool, False for padding. positions: (B, T) rotary positions, by default the
        slots (as in the reference, left padding does not shift positions). Returns the
        final-normed hidden states (B, T, hidden). ``cache=None`` (training) attends causally
        within ``embeds`` alone and stores nothing.
        """
        mask = cache.mark(slots, valid) if cache is not None else causal_mask(valid)
        cos, sin = self.rotary_emb(embeds, slots[None] if positions is None else positions)
        x = embeds
        for layer in self.layers:
            x = layer(x, cos, sin, mask, slots, cache)
        return self.norm(x)

    def condition(self, hidden: torch.Tensor, token_index: int | torch.Tensor | None) -> torch.Tensor:
        """Flow-head condition from the last hidden state (B, hidden) for image token
        ``token_index`` (an int, or a (1,) tensor so that the token loop reads nothing back from
        the device); None leaves the generation position table out whatever the config says."""
        if token_index is not None and self.config.use_gen_pos_embed:
            hidden = hidden + self.gen_pos_embed[0, token_index]
        return self.image_out_projector(hidden)

    def new_cache(self, batch_size: int, max_len: int) -> StaticKVCache:
        """The cache the token loop attends through: flash-attn 2 where it is installed and serves
        this device and dtype (unless ``use_flash_attention`` is off), else SDPA."""
        flash = flash_attn_module(self.device, self.dtype) if self.use_flash_attention else None
        return StaticKVCache(self.config, batch_size, max_len, self.device, self.dtype, flash=flash)
