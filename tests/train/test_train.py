"""Training code on toy sizes: the loss goes down and checkpoints load back into the pipeline."""

import random

import pytest
import torch

from nextstep import NextStepPipeline
from nextstep.engine.prompts import PromptBuilder
from nextstep.engine.vocab import build_tokenizer
from nextstep.loading.checkpoints import save_model
from nextstep.models.model import NextStepModel
from nextstep.models.tokens import patchify
from nextstep.models.vae import VAEConfig
from nextstep.train.model_training import (
    build_pool,
    changed_coverage,
    drop_to_background,
    flow_matching_loss,
    make_batch,
    model_config,
    object_coverage,
    object_weights,
    train_model,
)
from nextstep.train.sampling_defaults import (
    coordinate_search,
    read_defaults,
    write_defaults,
)
from nextstep.train.vae_training import (
    EDGE_WEIGHT,
    edge_mask,
    encode,
    reconstruction_loss,
    to_pixels,
    train_vae,
)
from nextstep.train.world import COLOURS, Obj, Scene, render, vocabulary

TOY_VAE = VAEConfig(ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=0, encoder_norm=True, psz=2, deterministic=True)
TOY_MODEL = dict(
    hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
    intermediate_size=64, fm_head_dim=32, fm_head_layers=1,
)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("toy")
    vae = train_vae(out / "vae", steps=2, batch_size=2, size=64, crop=32, config=TOY_VAE)
    tokenizer = build_tokenizer(vocabulary())
    pool = build_pool(vae, count=24, seed=0, size=32)
    return out, vae, tokenizer, pool


def test_pool_takes_the_background_tokens_from_the_plain_background(toy):
    _, vae, _, pool = toy
    kinds = set()
    for index, (scene, latents, encoded) in enumerate(list(zip(pool.scenes, pool.latents, pool.encoded))[:8]):
        picture = render(scene, 32)
        own, plain = encode(vae, to_pixels([picture, render(Scene(scene.background, ()), 32)]))
        torch.testing.assert_close(encoded, own, atol=1e-5, rtol=1e-5)  # what an edit reads as its input
        torch.testing.assert_close(pool.plain[COLOURS.index(scene.background)], plain, atol=1e-5, rtol=1e-5)
        tokens, own, plain = (patchify(x[None], 2)[0] for x in (latents, own, plain))
        coverage = object_coverage(picture, scene.background, 16)
        torch.testing.assert_close(pool.token_weights[index], object_weights(coverage))
        touched = coverage > 0
        torch.testing.assert_close(tokens[touched], own[touched], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tokens[~touched], plain[~touched], atol=1e-5, rtol=1e-5)
        kinds.update(touched.tolist())
    assert kinds == {True, False}


def test_outline_tokens_weigh_most_then_object_interiors_then_plain_background():
    # A large square in the center spans pixels 46-82: token rows and columns 3-4 lie inside it,
    # 2 and 5 hold its outline.
    scene = Scene("white", (Obj("square", "red", "large", "center"),))
    weights = object_weights(object_coverage(render(scene, 128), "white", 16)).reshape(8, 8)
    interior, ring = weights[3:5, 3:5], weights[2:6, 2:6].clone()
    ring[1:3, 1:3] = 0
    outline = ring[ring > 0]
    assert len(outline) == 12 and outline.unique().numel() == 1 and interior.unique().numel() == 1
    background = weights.clone()
    background[2:6, 2:6] = 0
    assert background[background > 0].unique().tolist() == [1.0]
    assert outline[0] > interior[0, 0] > 1


def test_edit_tokens_weigh_more_exactly_where_the_edit_changes_the_picture(toy):
    _, _, _, pool = toy
    assert len(pool.edits) > len(pool.scenes) // 3  # most scenes are edited, some twice
    raised = set()
    for index, (source, target, edit) in enumerate(pool.edits):
        changed = changed_coverage(render(pool.scenes[source], 32), render(pool.scenes[target], 32), 16) > 0
        extra = pool.edit_weights[index] - pool.token_weights[target]
        assert changed.any() and bool((extra[changed] > 0).all()) and bool((extra[~changed] == 0).all())
        raised.add(edit.kind)
    assert raised == {"recolour", "background", "add", "remove", "move"}


def test_read_back_drop_replaces_a_varying_share_of_each_sequence_by_the_background():
    tokens, background = torch.ones(400, 63, 4), torch.zeros(400, 63, 4)
    dropped = drop_to_background(tokens, background, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(dropped.amin(-1), dropped.amax(-1))  # whole tokens, either kept or replaced
    shares = 1 - dropped[..., 0].mean(dim=1)
    assert shares.min() < 0.1 and shares.max() > 0.9 and abs(shares.mean() - 0.5) < 0.05
    half = 1 - drop_to_background(tokens, background, 0.5, torch.Generator().manual_seed(0))[..., 0].mean(dim=1)
    assert half.max() < 0.65 and abs(half.mean() - 0.25) < 0.05


def test_vae_loss_weighs_the_outlines_of_objects():
    pixels = to_pixels([render(Scene("white", (Obj("square", "red", "large", "center"),)), 48)])
    edges = edge_mask(pixels)[0, 0]
    # The square spans pixels 17 to 30 (0.85 of the middle 16-pixel cell): the pixels either side
    # of its outline and one more each way are marked, its inside and the far background are not.
    assert edges[24, 14:19].tolist() == [0, 1, 1, 1, 1] and edges[24, 29:34].tolist() == [1, 1, 1, 1, 0]
    assert edges[:, :12].sum() == 0 and edges[20:28, 20:28].sum() == 0
    wrong_inside, wrong_outline = pixels.clone(), pixels.clone()
    wrong_inside[..., 22:24, 22:24] += 0.5
    wrong_outline[..., 16:18, 22:24] += 0.5  # the same error on the top edge
    inside, outline = reconstruction_loss(wrong_inside, pixels), reconstruction_loss(wrong_outline, pixels)
    assert inside.item() > 0 and abs(outline.item() / inside.item() - (1 + EDGE_WEIGHT)) < 1e-4


def test_tokenizer_keeps_the_layout_tokens(toy):
    _, _, tokenizer, _ = toy
    ids = tokenizer("a big red circle<|image_area|>8*8<|begin_of_image|>")["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens == ["a", "big", "red", "circle", "<|image_area|>", "8", "*", "8", "<|begin_of_image|>"]
    assert tokenizer.unk_token_id not in ids


def test_position_table_gives_each_image_token_its_row_and_column(toy):
    _, _, tokenizer, _ = toy
    config = model_config(tokenizer, latent_size=16, **TOY_MODEL)  # 8x8 image tokens
    table = NextStepModel(config).gen_pos_embed[0]
    columns, rows = table[:, : config.hidden_size // 2], table[:, config.hidden_size // 2 :]
    assert torch.equal(columns[3], columns[3 + 8]) and not torch.equal(rows[3], rows[3 + 8])  # one row down
    assert torch.equal(rows[8], rows[15]) and not torch.equal(columns[8], columns[15])  # same row


def test_cache_free_forward_matches_the_cached_one(toy):
    _, _, tokenizer, pool = toy
    torch.manual_seed(1)
    model = NextStepModel(model_config(tokenizer, **TOY_MODEL)).eval()
    batch, *_ = make_batch(pool, PromptBuilder(tokenizer, model.config.boi), random.Random(0), 3, edit=False)
    embeds = model.embed(batch.input_ids)
    positions = torch.arange(embeds.shape[1])
    valid = batch.attention_mask.bool()
    with torch.no_grad():
        cached = model.forward_backbone(embeds, positions, valid, model.new_cache(3, embeds.shape[1]))
        plain = model.forward_backbone(embeds, positions, valid, cache=None)
    torch.testing.assert_close(plain[valid], cached[valid], atol=1e-5, rtol=1e-5)


def test_a_few_steps_lower_the_loss_and_the_checkpoint_generates(toy, tmp_path):
    out, _, tokenizer, pool = toy
    torch.manual_seed(2)
    config = model_config(tokenizer, **TOY_MODEL)
    config.vae_name_or_path = str(out / "vae")
    model = NextStepModel(config)
    prompts = PromptBuilder(tokenizer, config.boi)

    def held_out_loss():
        rng, generator = random.Random(5), torch.Generator().manual_seed(5)
        with torch.no_grad():
            return sum(
                flow_matching_loss(model, *make_batch(pool, prompts, rng, 8, edit), generator=generator).item()
                for edit in (False, True)
            )

    before = held_out_loss()
    saved = []
    train_model(model, pool, prompts, steps=40, batch_size=8, lr=3e-3, save_every=20, save=saved.append)
    assert held_out_loss() < 0.8 * before
    assert len(saved) == 2

    save_model(model, tmp_path)
    tokenizer.save_pretrained(str(tmp_path))
    write_defaults(tmp_path, {"size": "32x32", "num_sampling_steps": 3}, {"size": "32x32"}, "test")
    pipe = NextStepPipeline.from_pretrained(tmp_path)
    settings = read_defaults(tmp_path)["text_to_image"]
    assert pipe.generate("a red circle", seed=0, **settings).images[0].size == (32, 32)
    wide = pipe.generate("a red circle", seed=0, **dict(settings, size=(64, 32))).images[0]
    assert wide.size == (64, 32)
    edit = pipe.generate("make the background blue", wide.crop((0, 0, 32, 32)), seed=0, **dict(settings, cfg_img=2.0))
    assert edit.images[0].size == (32, 32)
    # Laid out as in training: the input image after the instruction.
    slot_after = pipe.generate("make the background blue<image>", wide.crop((0, 0, 32, 32)), seed=0,
                               **dict(settings, cfg_img=2.0))
    assert torch.equal(edit.tokens, slot_after.tokens)


def test_edit_rows_keep_each_input_token_at_one_distance_from_its_output_token(toy):
    _, _, tokenizer, pool = toy
    config = model_config(tokenizer, **TOY_MODEL)
    batch, *_ = make_batch(pool, PromptBuilder(tokenizer, config.boi), random.Random(0), 40, edit=True)
    distances, instruction_lengths = set(), set()
    for ids in batch.input_ids.tolist():
        if config.image_placeholder_id in ids:
            last = len(ids) - 1 - ids[::-1].index(config.image_placeholder_id)
            distances.add(len(ids) - last)  # from the last input token to the first output token
            first = ids.index(config.image_placeholder_id)
            instruction_lengths.add(sum(i != config.pad_token_id for i in ids[:first]))
    assert len(distances) == 1 and len(instruction_lengths) > 2


def test_coordinate_search_keeps_each_stage_best_and_scores_each_setting_once():
    calls = []

    def score(settings):
        calls.append(settings)
        # Best at cfg 5 and shift 2; 20 and 30 steps tie, so the first listed (20) stays.
        return -abs(settings.get("cfg", 3.0) - 5) - abs(settings.get("timesteps_shift", 1.0) - 2) + (
            settings.get("num_sampling_steps", 20) >= 20)

    stages = [
        [dict(cfg=c) for c in (3.0, 1.5, 5.0)],
        [dict(timesteps_shift=s) for s in (1.0, 0.5, 2.0)],
        [dict(num_sampling_steps=n) for n in (20, 10, 30)],
    ]
    best, tried = coordinate_search(score, stages)
    assert best == dict(cfg=5.0, timesteps_shift=2.0, num_sampling_steps=20)
    # cfg 5 with the base shift, and the best so far with the base step count, are not scored again.
    assert len(calls) == len(tried) == 3 + 2 + 2
    assert [settings for settings, _ in tried] == calls
