"""Training a small NextStep from scratch on shapes-world captions and edits.

Teacher forcing: the backbone reads the prompt row exactly as the pipeline builds it (left
padded, the image-area prefix and ``<|begin_of_image|>``, edits with the input image inlined),
then the target's image tokens; the hidden state before each image token conditions the flow
head, trained on ``x_t = t x1 + (1 - t) x0`` (x0 noise, x1 the token) to predict ``x1 - x0``.
Captions, instructions and guidance dropout are drawn afresh at every step; the latents of a
fixed pool of training scenes are encoded once.

The background tokens of every training picture are those of a render of its plain background
(``plain_background``): the VAE's encoder sees the whole picture, so its latents of plain
background carry faint traces of the objects elsewhere; a model taught on them finds the objects
from those traces in what it reads back, traces its own samples do not carry, and then draws
objects wherever its first background samples happen to hint.

Tokens are weighted by what of the objects they hold (``object_weights``): most of a picture is
plain background, learnt within the first few hundred steps, and an unweighted loss spends most
of its gradient on it while the objects (what the captions are about) lag far behind. Tokens
that hold part of an outline weigh most: they are the hardest to draw (their loss stays an order
above the background's and well above an object's interior) and the only ones that tell a small
square from a small circle. For the same reason an edit's tokens weigh more where the edit
changes the picture: most of an edited picture is a copy of its input, and a removed or moved
object leaves plain background behind that the object weight alone would count least.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from ..engine.prompts import (
    BEGIN_OF_IMAGE,
    END_OF_IMAGE,
    IMAGE_PLACEHOLDER,
    IMAGE_SLOT,
    PromptBuilder,
    with_image_slot,
)
from ..models.config import NextStepConfig
from ..models.model import NextStepModel
from ..models.tokens import patchify
from ..models.vae import AutoencoderKL
from .optim import make_optimizer
from .vae_training import encode, to_pixels
from .world import (
    COLOURS,
    PALETTE,
    Edit,
    Scene,
    caption,
    random_edit,
    random_scene,
    render,
)

# Guidance dropout: text-to-image rows lose their caption; edit rows lose the instruction
# (the image-only branch) or everything (the negative-only branch).
DROP_CAPTION = 0.1
DROP_INSTRUCTION = 0.1
DROP_ALL = 0.05
EDIT_SHARE = 0.7  # fraction of batches that are edits
EDITS_PER_SCENE = 2  # edits drawn for each training scene (those whose result is a training scene are kept)
TIMES_PER_TOKEN = 2  # flow-head samples per image token, as the head is cheap next to the backbone
PATCH = 2  # latent patch side of one image token, as NextStep-1
OBJECT_WEIGHT = 4.0  # added to the weight (1) of every token an object touches
OUTLINE_WEIGHT = 4.0  # added again where an object covers only part of the token: its outline
CHANGE_WEIGHT = 4.0  # added to an edit's token wholly inside what the edit changes
# The tokens the backbone reads back are noised (std drawn per sequence, uniform up to this; a
# token's entries have unit variance), so that the model does not lean on fine detail of exact
# tokens that its own samples only approximate.
INPUT_NOISE = 0.5
# Each sequence replaces a share of the tokens it reads back (uniform up to this) by the plain
# background's: every picture is a fixed function of its caption, yet teacher forcing lets most
# object tokens copy colour and outline from the object tokens before them, so only an object's
# first, barely covered token would learn them from the text.
READ_BACK_DROP = 1.0
# Edit rows put the input image after the instruction, right before the picture to generate, so
# that every input token sits at the same distance from its cell's output token whatever the
# instruction's length: with rotary positions only, that fixed distance is how the model finds
# the part of the input it copies. Stored with the model, so the pipeline lays prompts out alike.
EDIT_IMAGE_SLOT = "after"


def model_config(tokenizer, latent_size: int = 16, **sizes) -> NextStepConfig:
    """The shapes model's config; ``latent_size`` (latent side it is trained at) bounds the
    sizes the app offers."""
    shape = dict(
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=384,
        fm_head_dim=192,
        fm_head_layers=3,
    )
    shape.update(sizes)
    return NextStepConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        attention_bias=True,
        o_attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        latent_patch_size=PATCH,
        latent_channels=16,
        boi=tokenizer.convert_tokens_to_ids(BEGIN_OF_IMAGE),
        eoi=tokenizer.convert_tokens_to_ids(END_OF_IMAGE),
        image_placeholder_id=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
        pad_token_id=tokenizer.pad_token_id,
        use_gen_pos_embed=True,  # tells the head which grid cell it is drawing
        # The table is indexed by the flat token number; as wide as the token grid, entry k is
        # token k's true (row, column) instead of (k // 32, k % 32).
        gen_pos_embed_grid=latent_size // PATCH,
        latent_size=latent_size,
        vae_name_or_path=None,
        torch_dtype="float16",  # the dtype the weights are stored in (half the size); they load in any dtype
        **shape,
    )


@dataclass
class ScenePool:
    """Training scenes and edits with their latents, encoded once."""

    scenes: list[Scene]
    latents: torch.Tensor  # (N, 16, H/8, W/8) targets, background tokens from the plain background
    encoded: torch.Tensor  # (N, 16, H/8, W/8) the encoder's own latents, as an edit's input image reaches the model
    plain: torch.Tensor  # (colours, 16, H/8, W/8) the latents of each plain background, in COLOURS order
    token_weights: torch.Tensor  # (N, tokens) loss weight of each image token, in patchify order
    edits: list[tuple[int, int, Edit]]  # (source index, target index, edit)
    edit_weights: torch.Tensor  # (edits, tokens) loss weight of each token of an edit's target


def object_coverage(picture, background: str, token_pixels: int) -> torch.Tensor:
    """Fraction of each token's patch of pixels that differs from the background, row-major."""
    return changed_coverage(picture, Image.new("RGB", picture.size, PALETTE[background]), token_pixels)


def object_weights(coverage: torch.Tensor) -> torch.Tensor:
    """Loss weight of each token from its object ``coverage``: 1 for plain background, more
    where an object is, most along its outline."""
    touched = coverage > 0
    outline = touched & (coverage < 1)
    return 1 + OBJECT_WEIGHT * touched.float() + OUTLINE_WEIGHT * outline.float()


def changed_coverage(picture, other, token_pixels: int) -> torch.Tensor:
    """Fraction of each token's patch of pixels that differs between two pictures, row-major."""
    a, b = (torch.from_numpy(np.asarray(p, dtype=np.int16)) for p in (picture, other))
    differs = (a - b).abs().amax(dim=-1) > 8
    return F.avg_pool2d(differs[None, None].float(), token_pixels).flatten()


def plain_background(latents: torch.Tensor, coverage: torch.Tensor, plain: torch.Tensor) -> torch.Tensor:
    """``latents`` (C, H, W) with every token whose patch no object touches (``coverage`` per token,
    row-major) taken from ``plain``, the latents of the same background without objects."""
    grid = (latents.shape[1] // PATCH, latents.shape[2] // PATCH)
    touched = (coverage > 0).reshape(grid).repeat_interleave(PATCH, 0).repeat_interleave(PATCH, 1)
    return torch.where(touched, latents, plain)


@torch.no_grad()
def build_pool(vae: AutoencoderKL, count: int, seed: int, size: int = 128, chunk: int = 32) -> ScenePool:
    """``count`` training scenes, each with up to EDITS_PER_SCENE edits whose results are also
    training scenes."""
    rng = random.Random(seed)
    scenes, edits = [], []
    while len(scenes) < count:
        scene = random_scene(rng, split="train")
        scenes.append(scene)
        source = len(scenes) - 1
        for _ in range(EDITS_PER_SCENE):
            edit = random_edit(scene, rng)
            if edit.target.split == "train":
                scenes.append(edit.target)
                edits.append((source, len(scenes) - 1, edit))
    plain = encode(vae, to_pixels([render(Scene(colour, ()), size) for colour in COLOURS]))
    latents, encodings, weights, pictures = [], [], [], []
    token_pixels = vae.config.downsample_factor * PATCH
    for start in tqdm(range(0, len(scenes), chunk), desc="encode scenes", mininterval=2.0):
        batch = [render(s, size) for s in scenes[start : start + chunk]]
        pictures.extend(batch)
        encoded = encode(vae, to_pixels(batch))
        encodings.append(encoded)
        for scene, picture, latent in zip(scenes[start : start + chunk], batch, encoded):
            coverage = object_coverage(picture, scene.background, token_pixels)
            latents.append(plain_background(latent, coverage, plain[COLOURS.index(scene.background)]))
            weights.append(object_weights(coverage))
    edit_weights = [
        weights[target] + CHANGE_WEIGHT * changed_coverage(pictures[source], pictures[target], token_pixels)
        for source, target, _ in edits
    ]
    return ScenePool(
        scenes, torch.stack(latents), torch.cat(encodings), plain, torch.stack(weights), edits, torch.stack(edit_weights)
    )


def make_batch(pool: ScenePool, prompts: PromptBuilder, rng: random.Random, batch_size: int, edit: bool):
    """Prompt rows, the input-image latents their slots take, the target latents, their token
    weights and their plain backgrounds' latents."""
    rows, sources, targets, weights = [], [], [], []
    grid = (pool.latents.shape[2] // PATCH, pool.latents.shape[3] // PATCH)
    for _ in range(batch_size):
        if edit:
            index = rng.randrange(len(pool.edits))
            source, target, example = pool.edits[index]
            weights.append(pool.edit_weights[index])
            draw = rng.random()
            if draw < DROP_ALL:
                rows.append("")
            else:
                text = with_image_slot("" if draw < DROP_ALL + DROP_INSTRUCTION else example.instruction, EDIT_IMAGE_SLOT)
                rows.append(text.replace(IMAGE_SLOT, prompts.image_text(grid)))
                sources.append(source)
        else:
            target = rng.randrange(len(pool.scenes))
            rows.append("" if rng.random() < DROP_CAPTION else caption(pool.scenes[target], rng))
            weights.append(pool.token_weights[target])
        targets.append(target)
    source_latents = pool.encoded[sources] if sources else None
    return (
        prompts.encode(rows, grid), source_latents, pool.latents[targets], torch.stack(weights),
        pool.plain[[COLOURS.index(pool.scenes[target].background) for target in targets]],
    )


def drop_to_background(
    tokens: torch.Tensor, background: torch.Tensor, max_share: float, generator=None
) -> torch.Tensor:
    """``tokens`` (B, N, D) with each sequence's tokens replaced by ``background``'s at random, a
    share drawn per sequence uniformly up to ``max_share``; see READ_BACK_DROP."""
    share = max_share * torch.rand(tokens.shape[0], 1, 1, generator=generator)
    dropped = torch.rand(tokens.shape[0], tokens.shape[1], 1, generator=generator) < share
    return torch.where(dropped, background, tokens)


def flow_matching_loss(
    model: NextStepModel, batch, source_latents, target_latents, token_weights=None, background_latents=None,
    generator=None, input_noise: float = 0.0, read_back_drop: float = 0.0,
) -> torch.Tensor:
    """Flow-matching loss of the head's velocities, averaged over tokens with ``token_weights``
    (B, tokens), equal weights when None; ``input_noise``: see INPUT_NOISE; ``read_back_drop``:
    see READ_BACK_DROP, it takes the read-back tokens it drops from ``background_latents``."""
    config = model.config
    targets = patchify(target_latents, config.latent_patch_size)  # (B, N, D)
    b, n, d = targets.shape
    prompt = model.embed(batch.input_ids, source_latents)  # (B, L, hidden)
    read_back = targets[:, :-1]
    if read_back_drop:
        plain = patchify(background_latents, config.latent_patch_size)[:, :-1]
        read_back = drop_to_background(read_back, plain, read_back_drop, generator)
    if input_noise:
        std = input_noise * torch.rand(b, 1, 1, generator=generator)
        read_back = read_back + std * torch.randn(read_back.shape, generator=generator)
    embeds = torch.cat([prompt, model.image_in_projector(read_back)], dim=1)
    length = prompt.shape[1]
    valid = torch.cat([batch.attention_mask.bool(), torch.ones(b, n - 1, dtype=torch.bool)], dim=1)
    hidden = model.forward_backbone(embeds, torch.arange(embeds.shape[1]), valid, cache=None)
    cond = model.condition(hidden[:, length - 1 :], torch.arange(n))  # (B, N, hidden)
    cond = cond.reshape(b * n, -1).repeat(TIMES_PER_TOKEN, 1)
    x1 = targets.reshape(b * n, d).repeat(TIMES_PER_TOKEN, 1)
    x0 = torch.randn(x1.shape, generator=generator)
    t = torch.rand(x1.shape[0], generator=generator)
    xt = t[:, None] * x1 + (1 - t[:, None]) * x0
    errors = (model.image_head(xt, t, cond) - (x1 - x0)).pow(2).mean(dim=-1)
    weights = torch.ones(b * n) if token_weights is None else token_weights.reshape(b * n)
    weights = weights.repeat(TIMES_PER_TOKEN)
    return (errors * weights).sum() / weights.sum()


def train_model(
    model: NextStepModel,
    pool: ScenePool,
    prompts: PromptBuilder,
    steps: int,
    batch_size: int = 24,
    lr: float = 1e-3,
    seed: int = 0,
    save_every: int = 250,
    save=None,
) -> list[float]:
    """Train in place; ``save(model)`` writes a checkpoint every ``save_every`` steps and at the end."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer, schedule = make_optimizer(model.parameters(), lr, steps, weight_decay=0.01)
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="nextstep", mininterval=2.0)
    for step in bar:
        edit = rng.random() < EDIT_SHARE
        batch = make_batch(pool, prompts, rng, batch_size, edit)
        loss = flow_matching_loss(
            model, *batch, generator=generator, input_noise=INPUT_NOISE, read_back_drop=READ_BACK_DROP
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        recent = sum(losses[-50:]) / len(losses[-50:])
        bar.set_postfix(loss=f"{loss.item():.3f}", avg50=f"{recent:.3f}", kind="edit" if edit else "t2i")
        if save is not None and ((step + 1) % save_every == 0 or step + 1 == steps):
            save(model)
    model.eval()
    return losses
