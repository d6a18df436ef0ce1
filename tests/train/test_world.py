"""The shapes world: reproducible specs, captions that say what is drawn, edits that change only
what they say; and the evaluator, which reads right pictures as right and wrong ones as wrong."""

import random
from dataclasses import replace

import numpy as np
import pytest

from nextstep.train.evaluate import (
    average,
    held_out_edits,
    held_out_scenes,
    read_scene,
    score_edit,
    score_scene,
    shape_hits,
    share_by_kind,
)
from nextstep.train.world import (
    CELL_PHRASES,
    CELLS,
    COLOURS,
    EDIT_KINDS,
    SHAPES,
    SIZE_WORDS,
    SIZES,
    caption,
    cell_box,
    random_edit,
    random_scene,
    render,
)


def scenes(count, seed=0, num_objects=None):
    rng = random.Random(seed)
    return [random_scene(rng, num_objects) for _ in range(count)]


def test_same_seed_same_scenes_captions_and_pictures():
    first, second = scenes(20, seed=7), scenes(20, seed=7)
    assert first == second
    assert [caption(s, random.Random(1)) for s in first] == [caption(s, random.Random(1)) for s in second]
    assert np.array_equal(np.asarray(render(first[0])), np.asarray(render(second[0])))
    assert scenes(20, seed=8) != first


def test_scene_rules_hold():
    for scene in scenes(200):
        assert 1 <= len(scene.objects) <= 3
        assert len({o.cell for o in scene.objects}) == len(scene.objects)
        assert len(scene.used_colours()) == len(scene.objects) + 1


def test_splits_are_fixed_and_disjoint():
    all_scenes = scenes(500)
    splits = {s.split for s in all_scenes}
    assert splits == {"train", "validation", "test"}
    rng = random.Random(3)
    assert all(random_scene(rng, split="test").split == "test" for _ in range(20))


@pytest.mark.parametrize("seed", range(5))
def test_caption_mentions_every_attribute_of_every_object(seed):
    rng = random.Random(seed)
    for scene in scenes(20, seed=seed):
        text = caption(scene, rng)
        assert f"{scene.background} background" in text
        for obj in scene.objects:
            assert obj.colour in text and obj.shape in text
            assert any(word in text.split() for word in SIZE_WORDS[obj.size])
            assert any(phrase in text for phrase in CELL_PHRASES[obj.cell])


def test_picture_agrees_with_spec():
    for scene in scenes(30, seed=11):
        background, found = read_scene(render(scene))
        assert background == scene.background
        assert sorted((d.colour, d.cell, d.shape, d.size) for d in found) == sorted(
            (o.colour, o.cell, o.shape, o.size) for o in scene.objects
        )


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_edits_change_what_they_say_and_nothing_else(kind):
    rng = random.Random(kind)
    for scene in scenes(30, seed=5, num_objects=2):
        edit = random_edit(scene, rng, kind)
        assert edit.kind == kind
        source, target = edit.source, edit.target
        before = {o.cell: o for o in source.objects}
        after = {o.cell: o for o in target.objects}
        if kind == "background":
            assert target.background != source.background and target.background in edit.instruction
            assert before == after
            continue
        assert target.background == source.background
        if kind == "add":
            assert len(after) == 3 and set(before) < set(after)
            new = after[(set(after) - set(before)).pop()]
            assert new.colour in edit.instruction and new.shape in edit.instruction
        elif kind == "remove":
            assert len(after) == 1 and set(after) < set(before)
            gone = before[(set(before) - set(after)).pop()]
            assert gone.shape in edit.instruction
        elif kind == "recolour":
            changed = [c for c in before if before[c] != after[c]]
            assert len(changed) == 1 and after[changed[0]].colour in edit.instruction
            assert after[changed[0]].shape == before[changed[0]].shape
        else:  # move
            moved = [o for o in source.objects if o not in target.objects]
            assert len(moved) == 1 and moved[0].shape in edit.instruction
            assert len(set(before) ^ set(after)) == 2
        # Objects the instruction does not name are untouched, and so are their pixels.
        untouched = [o for o in source.objects if o in target.objects]
        assert len(untouched) == len(source.objects) - (kind != "add")
        a, b = np.asarray(render(source)), np.asarray(render(target))
        for obj in untouched:
            cx, cy, side = cell_box(obj.cell, a.shape[0])
            box = np.s_[int(cy - side / 2) + 1 : int(cy + side / 2), int(cx - side / 2) + 1 : int(cx + side / 2)]
            assert np.array_equal(a[box], b[box])
        assert score_scene(render(target), target)["all"] == 1.0


def wrong_colour(scene):
    """Every object in another colour that is still distinct from the rest of the scene."""
    free = [c for c in COLOURS if c not in scene.used_colours()]
    return replace(scene, objects=tuple(replace(o, colour=free[i]) for i, o in enumerate(scene.objects)))


def wrong_place(scene):
    taken = [o.cell for o in scene.objects]
    free = [c for c in CELLS if c not in taken]
    return replace(scene, objects=tuple(replace(o, cell=free[i]) for i, o in enumerate(scene.objects)))


@pytest.mark.parametrize("num_objects", [1, 2, 3])
def test_ground_truth_scores_full_marks(num_objects):
    scenes = held_out_scenes(25, num_objects)
    figures = average([score_scene(render(s), s) for s in scenes])
    assert all(value == 1.0 for value in figures.values()), figures


def test_wrong_colours_and_places_score_low():
    scenes = held_out_scenes(25, 1) + held_out_scenes(25, 2)
    colour = average([score_scene(render(wrong_colour(s)), s) for s in scenes])
    place = average([score_scene(render(wrong_place(s)), s) for s in scenes])
    assert colour["colour"] == 0.0 and colour["all"] == 0.0
    assert place["position"] == 0.0 and place["all"] == 0.0
    assert colour["position"] == 1.0 and place["colour"] == 1.0  # the other attributes still read right
    background = average([score_scene(render(replace(s, background=wrong_colour(s).objects[0].colour)), s) for s in scenes])
    assert background["background"] == 0.0


def test_shape_figures_by_kind_name_the_shape_that_is_drawn_wrong():
    scenes = held_out_scenes(60, 1) + held_out_scenes(20, 2)
    right = share_by_kind([hit for s in scenes for hit in shape_hits(render(s), s)])
    assert set(right) == {f"{size} {shape}" for size in SIZES for shape in SHAPES}
    assert all(value == 1.0 for value in right.values()), right

    def squares_as_circles(scene):
        return replace(scene, objects=tuple(
            replace(o, shape="circle") if o.shape == "square" and o.size == "small" else o for o in scene.objects))

    wrong = share_by_kind([hit for s in scenes for hit in shape_hits(render(squares_as_circles(s)), s)])
    assert wrong.pop("small square") == 0.0
    assert all(value == 1.0 for value in wrong.values()), wrong


def test_edit_scores_separate_doing_it_from_not_doing_it():
    edits = held_out_edits(10)
    done = average([score_edit(render(e.target), e.source, e.target, render(e.source)) for e in edits])
    ignored = average([score_edit(render(e.source), e.source, e.target, render(e.source)) for e in edits])
    assert done["success"] == 1.0 and done["untouched_psnr"] > 60
    assert ignored["success"] == 0.0
    move = next(e for e in edits if e.kind == "move")
    misplaced = render(wrong_place(move.target))
    assert score_edit(misplaced, move.source, move.target, render(move.source))["success"] == 0.0
