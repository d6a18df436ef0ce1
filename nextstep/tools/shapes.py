"""The named model shapes the bench, the memory plan and the acceptance run build with random
weights (speed does not depend on the weights' values): ``tiny`` and ``small`` for the CPU, and
``nextstep-1-large``, the real 14B structure, for a GPU (or the meta device)."""

from __future__ import annotations

import torch

from ..engine.prompts import BEGIN_OF_IMAGE, END_OF_IMAGE, IMAGE_PLACEHOLDER
from ..engine.vocab import build_tokenizer
from ..models.config import NextStepConfig
from ..models.model import NextStepModel
from ..models.vae import AutoencoderKL, VAEConfig
from ..pipeline import NextStepPipeline

PROMPT = "a large red circle in the top left corner of a blue background, high quality"
NEGATIVE = "blurry, low quality"
INSTRUCTION = "make the circle green"  # with --edit, of a synthetic picture (``edit_input``)
_BACKBONE_BASE = dict(
    attention_bias=True, o_attention_bias=False, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=8192
)
CONFIGS = {
    "tiny": (
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, fm_head_dim=32, fm_head_layers=2),
        VAEConfig(ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=1),
    ),
    "small": (
        dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
             intermediate_size=768, fm_head_dim=256, fm_head_layers=3),
        VAEConfig(ch=32, ch_mult=[1, 1, 2, 2], num_res_blocks=1),
    ),
    # Qwen2.5-14B-shaped backbone, 1536 x 12 flow head and the release VAE, as NextStep-1-Large.
    "nextstep-1-large": (
        dict(hidden_size=5120, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
             intermediate_size=13824, fm_head_dim=1536, fm_head_layers=12, vocab_size=152064),
        VAEConfig(),
    ),
}


def random_config(name: str) -> tuple[NextStepConfig, VAEConfig, object]:
    """The named shape's model and VAE configs, and a small word-level tokenizer for the bench's prompts."""
    backbone, vae_config = CONFIGS[name]
    tokenizer = build_tokenizer(sorted(set(f"{PROMPT} {NEGATIVE} {INSTRUCTION}".replace(",", " ").split())))
    config = NextStepConfig(
        **_BACKBONE_BASE,
        **dict(backbone, vocab_size=max(backbone.get("vocab_size", 0), len(tokenizer))),
        boi=tokenizer.convert_tokens_to_ids(BEGIN_OF_IMAGE),
        eoi=tokenizer.convert_tokens_to_ids(END_OF_IMAGE),
        image_placeholder_id=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
        pad_token_id=tokenizer.pad_token_id,
    )
    return config, vae_config, tokenizer


def random_pipeline(name: str, device: str, dtype: torch.dtype, quantize: str | None = None) -> NextStepPipeline:
    """A pipeline of the named shape with random weights (the same ones every time: the quantization
    comparison compares pictures) and a small word-level tokenizer."""
    config, vae_config, tokenizer = random_config(name)
    model = NextStepModel.with_random_weights(config, device, dtype)
    if quantize:
        model.quantize_weights(quantize)
    with torch.device("meta"):
        vae = AutoencoderKL(vae_config).to(dtype)
    vae.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    for parameter in vae.parameters():
        parameter.data.normal_(0.0, 0.02, generator=generator)
    return NextStepPipeline(model, vae.eval(), tokenizer, name=f"random {name}")
