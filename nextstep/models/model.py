"""NextStep: the backbone, the image projectors and the flow-matching head, with official names.

Top-level parameter names match the released checkpoints: ``embed_tokens``, ``layers.N``,
``norm``, ``image_in_projector``, ``image_out_projector``, ``image_head.net`` and the buffer
``gen_pos_embed``. The checkpoints' ``lm_head`` (text logits, 0.78 B parameters in the 14B
release) is never built: images do not use it. Reading and writing checkpoint files is
``nextstep.loading.checkpoints``' business: this module knows nothing of files.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import AttentionPlan, causal_mask, flash_kernels
from .backbone import DecoderLayer, RMSNorm, RotaryEmbedding, StaticKVCache
from .config import NextStepConfig
from .flow_head import FlowMatchingHead
from .quantize import check_quantization, quantize_linear, quantized_linears
from .tokens import patchify


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
        self.norm = RMSNorm(hidden, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.image_in_projector = nn.Linear(config.token_dim, hidden)
        self.image_out_projector = nn.Linear(hidden, hidden)
        self.image_head = FlowMatchingHead(config.token_dim, hidden, config.fm_head_dim, config.fm_head_layers)
        grid = config.gen_pos_embed_grid
        self.register_buffer("gen_pos_embed", sincos_2d_table(hidden, grid)[None], persistent=True)
        # How the weights are held: None, a scheme ("int8", "int4", "fp8") applied while loading, or
        # what a checkpoint stored quantized names (see nextstep.loading.autoround).
        self.quantization: str | None = None
        self.use_flash_attention = True  # where flash-attn is installed (the bench compares it with SDPA)

    # ---- building -----------------------------------------------------------------------

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
        model.build_computed_buffers(device, keep_loaded=False)
        return model.eval()

    def quantize_weights(self, quantize: str) -> None:
        """Quantize the backbone's weights of a model already built (``nextstep.loading`` does it
        while loading instead, so that full precision never fills the device)."""
        check_quantization(quantize, self.device)
        for name in quantized_linears(self, quantize):
            quantize_linear(self, name, quantize)
        self.quantization = quantize

    def build_computed_buffers(self, device, keep_loaded: bool) -> None:
        """The buffers computed rather than stored (rotary tables; the position table unless one
        was loaded), built on ``device`` once the parameters are there."""
        with torch.device(device):
            self.rotary_emb = RotaryEmbedding(self.config)
        if not keep_loaded:
            table = sincos_2d_table(self.config.hidden_size, self.config.gen_pos_embed_grid)[None]
            self.gen_pos_embed = table.to(device=device, dtype=self.embed_tokens.weight.dtype)

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
        prompt_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the decoder over ``embeds`` (B, T, hidden) stored at cache ``slots`` (T,).

        valid: (B, T) bool, False for padding; ``prompt_valid``, the same on the host for a prefill
        from slot 0 (``StaticKVCache.plan``). positions: (B, T) rotary positions, by default the
        slots (as in the reference, left padding does not shift positions). Returns the
        final-normed hidden states (B, T, hidden). ``cache=None`` (training) attends causally
        within ``embeds`` alone and stores nothing.
        """
        plan = cache.plan(slots, valid, prompt_valid) if cache is not None else AttentionPlan(mask=causal_mask(valid))
        cos, sin = self.rotary_emb(embeds, slots[None] if positions is None else positions)
        x = embeds
        for layer in self.layers:
            x = layer(x, cos, sin, plan, slots, cache)
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
        kernels = flash_kernels(self.device, self.dtype) if self.use_flash_attention else None
        return StaticKVCache(self.config, batch_size, max_len, self.device, self.dtype, kernels=kernels)
