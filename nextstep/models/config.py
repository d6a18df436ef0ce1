"""The NextStep model configuration, read from a checkpoint's ``config.json`` as published."""

from __future__ import annotations

from transformers import LlamaConfig

# NextStep-1.1's config.json spells the image/head settings differently from the names the
# inference code reads. Each field takes the reader's name when present, else the 1.1
# spelling, else the default (the defaults equal the released 14B models' values).
_SPELLINGS = {
    "latent_patch_size": ("patch_size", 2),
    "latent_channels": ("num_channels", 16),
    "fm_head_dim": ("genloss_width", 1536),
    "fm_head_layers": ("genloss_depth", 12),
}


class NextStepConfig(LlamaConfig):
    """Llama/Qwen2 backbone fields plus the image-token and flow-head settings.

    ``token_dim`` (values per image token) is ``latent_channels * latent_patch_size**2``.
    """

    model_type = "nextstep"

    def __init__(
        self,
        latent_patch_size: int | None = None,
        latent_channels: int | None = None,
        fm_head_dim: int | None = None,
        fm_head_layers: int | None = None,
        boi: int | None = None,
        eoi: int | None = None,
        image_placeholder_id: int | None = None,
        use_gen_pos_embed: bool = False,
        gen_pos_embed_grid: int | None = None,
        o_attention_bias: bool | None = None,
        vae_name_or_path: str | None = None,
        **kwargs,
    ):
        given = {
            "latent_patch_size": latent_patch_size,
            "latent_channels": latent_channels,
            "fm_head_dim": fm_head_dim,
            "fm_head_layers": fm_head_layers,
        }
        for name, (twin, default) in _SPELLINGS.items():
            value = given[name]
            if value is None:
                value = kwargs.get(twin, default)
            setattr(self, name, int(value))
        self.boi = boi
        self.eoi = eoi
        self.image_placeholder_id = image_placeholder_id
        self.use_gen_pos_embed = bool(use_gen_pos_embed)
        # The side of the generation position table's token grid. NextStep-1's reference builds it for
        # 32x32 whatever the image size; the releases' configs name the grid ``base_image_grid_size``
        # (32 for NextStep-1-Large-Pretrain, 64 for NextStep-1.1), and a stored table has that size.
        if gen_pos_embed_grid is None:
            gen_pos_embed_grid = kwargs.get("base_image_grid_size", 32)
        self.gen_pos_embed_grid = int(gen_pos_embed_grid)
        self.vae_name_or_path = vae_name_or_path
        if kwargs.get("rope_scaling", 0) is None:
            del kwargs["rope_scaling"]  # an explicit null means plain RoPE; transformers warns on the legacy key
        kwargs.setdefault("bos_token_id", None)
        kwargs.setdefault("eos_token_id", None)
        super().__init__(**kwargs)
        self.o_attention_bias = self.attention_bias if o_attention_bias is None else bool(o_attention_bias)

    @property
    def token_dim(self) -> int:
        return self.latent_channels * self.latent_patch_size**2
