"""Model families: which reference behaviour a checkpoint follows, and what differs between them.

``nextstep-1`` (NextStep-1-Large, -Large-Edit) and ``nextstep-1.1`` share the architecture; their
reference inference code differs in default settings, the direction of the ``linear`` guidance
schedule, the order of random draws for an input image, BOS handling, and the generation
position table. Everything here is data; the pipeline reads it.

Detection: a checkpoint is ``nextstep-1.1`` when its ``config.json`` carries NextStep-1.1's
flow-head spelling, keys named ``genloss_*`` (``genloss_width``, ``genloss_depth``, ...); NextStep-1
releases name the head ``fm_head_*`` and have no ``genloss_*`` key. Keys both releases may carry
are no sign: ``base_image_grid_size`` is in NextStep-1.1's config and in NextStep-1-Large-Pretrain's
(32, beside its ``fm_head_*`` keys), and 1.1 configs may carry the ``fm_head_*`` / ``latent_*``
names too (the official 1.1 reader needs them for heads of other sizes). Nor is a bundled
``vae/`` folder: any checkpoint may carry one.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..models.config import NextStepConfig
from ..models.vae import VAEConfig
from .sampling import Ramp, falling_ramp, rising_ramp

NEXTSTEP_1 = "nextstep-1"
NEXTSTEP_1_1 = "nextstep-1.1"
_NEXTSTEP_1_1_PREFIX = "genloss_"


@dataclass(frozen=True)
class Family:
    name: str
    defaults: dict  # the sampling settings its reference examples use (default_settings())
    linear_ramp: Ramp  # per-token guidance of the "linear" schedule
    # Random draws in order: "posterior" (the input image's VAE sample), "head" (all flow-head noise).
    # NextStep-1.1 draws the posterior noise before seeding; we draw it after the head noise, so the
    # head noise is the seed's first draws as in the reference and results stay a function of the seed.
    draw_order: tuple[str, ...]
    bos_as_text: bool  # prepend the tokenizer's BOS token to every prompt row as text
    position_table: bool  # honour config.use_gen_pos_embed (NextStep-1.1's inference never adds it)
    vae_defaults: VAEConfig  # for fields a VAE's config.json leaves out


FAMILIES = {
    NEXTSTEP_1: Family(
        name=NEXTSTEP_1,
        defaults=dict(
            num_sampling_steps=50, cfg=7.5, cfg_img=1.0, timesteps_shift=1.0,
            cfg_schedule="constant", use_norm=True, sampler="v1",
        ),
        linear_ramp=falling_ramp,
        draw_order=("posterior", "head"),
        bos_as_text=False,
        position_table=True,
        vae_defaults=VAEConfig(),
    ),
    NEXTSTEP_1_1: Family(
        name=NEXTSTEP_1_1,
        defaults=dict(
            num_sampling_steps=30, cfg=7.5, cfg_img=1.0, timesteps_shift=1.0,
            cfg_schedule="constant", use_norm=False, sampler="sde",
        ),
        linear_ramp=rising_ramp,
        draw_order=("head", "posterior"),
        bos_as_text=True,
        position_table=False,
        vae_defaults=VAEConfig(encoder_norm=True, psz=1, deterministic=True),
    ),
}


def detect_family(config: NextStepConfig) -> str:
    """``nextstep-1.1`` if the config carries NextStep-1.1's ``genloss_*`` keys, else ``nextstep-1``."""
    return NEXTSTEP_1_1 if any(key.startswith(_NEXTSTEP_1_1_PREFIX) for key in vars(config)) else NEXTSTEP_1


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {name!r}")
    return FAMILIES[name]
