"""Objects from masks, attribute groups, the attribute model and the object index."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
import torch

from ml.demo.scenes import generate_scenes
from ml.demo.vocabulary import VOCABULARY
from ml.objects.attributes import (
    AttributeOptions,
    attribute_dim,
    feature_blocks,
    object_features,
    train_attributes,
)
from ml.objects.index import ObjectIndex, build_index
from ml.objects.instances import (
    DESCRIPTION_DIM,
    GREY,
    NONE,
    SURROUNDINGS_DIM,
    Group,
    Instance,
    attribute_groups,
    clean_prediction,
    describe,
    find_instances,
    largest,
    object_crop,
)

CATEGORIES = {t.name: t.category for t in VOCABULARY}
PARENTS = {t.name: t.parent for t in VOCABULARY}


def _disc(h: int, w: int, cy: int, cx: int, r: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return np.asarray((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r)


def test_touching_objects_of_one_tag_are_told_apart_by_their_attributes() -> None:
    left, right = _disc(60, 100, 30, 30, 20), _disc(60, 100, 30, 68, 20)  # they touch
    far = _disc(60, 100, 8, 92, 5)
    masks = {
        "circle": left | right | far,
        "shape": left | right | far,
        "red": left,
        "green": right | far,
        "striped": right,
        "patterned": right,
    }
    objects = find_instances(masks, categories=CATEGORIES, parents=PARENTS)
    assert len(objects) == 3
    by_colour = {frozenset(o.attributes): o for o in objects}
    assert by_colour[frozenset({"red"})].tags == {"circle", "shape"}
    striped = by_colour[frozenset({"green", "striped", "patterned"})]
    assert abs(striped.area - int(right.sum())) < 0.2 * right.sum()  # cut where red meets green
    assert all(len(o.outline()) >= 3 for o in objects)
    assert (objects[0].full_mask(60, 100) & ~masks["shape"]).sum() == 0


def test_a_parent_mask_of_several_objects_adds_its_tag_and_no_object() -> None:
    a, b = _disc(40, 80, 20, 20, 12), _disc(40, 80, 20, 44, 12)  # touching, both squares
    masks = {"square": a, "star": b, "polygon": a | b, "shape": a | b, "red": a | b}
    objects = find_instances(masks, categories=CATEGORIES, parents=PARENTS)
    assert len(objects) == 2
    assert {frozenset(o.tags) for o in objects} == {
        frozenset({"square", "polygon", "shape"}),
        frozenset({"star", "polygon", "shape"}),
    }


def test_demo_objects_are_found_with_their_own_attributes() -> None:
    scenes = list(generate_scenes(seed=3, n_images=8))
    found = wrong = total = 0
    for scene in scenes:
        objects = find_instances(scene.tag_masks, categories=CATEGORIES, parents=PARENTS)
        for drawn in scene.objects:
            total += 1
            h, w = drawn.mask.shape
            ious = [
                (o.full_mask(h, w) & drawn.mask).sum() / (o.full_mask(h, w) | drawn.mask).sum()
                for o in objects
            ]
            best = objects[int(np.argmax(ious))]
            found += max(ious) > 0.5
            wrong += not set(drawn.tags) <= best.tags | best.attributes
    assert found >= 0.9 * total
    assert wrong <= 0.1 * total


def test_groups_are_sets_of_tags_that_never_meet_on_one_object() -> None:
    rng = np.random.default_rng(0)
    colours, textures, shapes = ["red", "green", "blue"], ["striped", "dotted"], ["circle", "star"]
    tag_sets = []
    for _ in range(120):
        tags = {str(rng.choice(colours)), str(rng.choice(shapes)), "shape"}
        if rng.random() < 0.5:
            tags |= {str(rng.choice(textures)), "patterned"}
        if "circle" in tags and "red" in tags:
            tags.add("red_circle")
        tag_sets.append(tags)
    groups = attribute_groups(tag_sets, categories=CATEGORIES, parents=PARENTS)
    values = {frozenset(g.values) for g in groups}
    assert frozenset(colours) in values
    assert frozenset([*textures, NONE]) in values  # plain objects take the NONE value
    assert frozenset(shapes) in values  # not red_circle (a circle) nor polygon (their parent)
    assert len(groups) == 3
    texture = next(g for g in groups if "striped" in g.values)
    assert texture.name == "patterned"  # the members' common parent names it
    assert texture.value_of({"red", "circle"}) == texture.values.index(NONE)
    assert Group("c", ("red", "blue")).value_of({"green"}) == -1


def test_an_object_crop_shows_the_object_alone_and_its_weights() -> None:
    pixels = np.full((50, 80, 3), 200, np.uint8)
    pixels[10:30, 20:40] = (255, 0, 0)
    obj = Instance((20, 10, 40, 30), np.ones((20, 20), bool))
    crop, weights = object_crop(pixels, obj, size=32)
    assert crop.shape == (32, 32, 3) and weights.shape == (32, 32)
    assert tuple(crop[0, 0]) == GREY and tuple(crop[16, 16]) == (255, 0, 0)
    assert weights[16, 16] == pytest.approx(1.0) and weights[0, 0] == 0.0
    framed, _ = object_crop(pixels, obj, size=32, alone=False)
    assert tuple(framed[0, 0]) == (200, 200, 200)  # with its surroundings
    description = describe(pixels, obj)
    assert description.shape == (DESCRIPTION_DIM,) and np.isfinite(description).all()


def _toy_objects(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[Group]]:
    """Features where each of two groups' values moves its own directions, plus noise."""
    groups = [Group("colour", ("red", "green", "blue")), Group("shape", ("circle", "star"))]
    labels = np.stack([rng.integers(0, 3, n), rng.integers(0, 2, n)], axis=1)
    centres = [rng.normal(0, 1, (3, 12)), rng.normal(0, 1, (2, 12))]
    x = np.concatenate(
        [centres[0][labels[:, 0]], centres[1][labels[:, 1]], rng.normal(0, 1, (n, 6))], axis=1
    )
    return (x + rng.normal(0, 0.3, x.shape)).astype(np.float32), labels, groups


def test_the_attribute_model_reads_values_and_changes_them() -> None:
    rng = np.random.default_rng(0)
    x, labels, groups = _toy_objects(300, rng)
    weights, report = train_attributes(
        x[:200], labels[:200], groups, AttributeOptions(steps=200), blocks=[12, 12, 6]
    )
    assert min(report.accuracy.values()) > 0.95
    assert min(report.manipulated.values()) > 0.9
    held_out = weights.accuracy(x[200:], labels[200:], groups)
    assert min(held_out.values()) > 0.9
    index = build_index(
        weights,
        groups,
        x,
        image_ids=list(range(300)),
        labels=labels,
        boxes=[(0, 0, 1, 1)] * 300,
        tags=[[] for _ in range(300)],
        outlines=[[] for _ in range(300)],
    )
    kept = {"learned": 0, "prototype": 0}
    for row in range(200, 220):
        plain = index.search(index.query(row), k=1)[0]
        assert plain.row == row  # an object is most like itself
        new = (int(labels[row, 0]) + 1) % 3
        for method in ("learned", "prototype"):
            hits = index.search(
                index.query(row, (0, new), method=method), k=5, exclude_images=[row]
            )
            assert len(hits) == 5 and row not in {h.row for h in hits}
            # the colour changed and the shape kept
            kept[method] += sum(
                labels[h.row, 0] == new and labels[h.row, 1] == labels[row, 1] for h in hits
            )
    assert kept["learned"] == 100
    assert kept["prototype"] >= 60  # the baseline: arithmetic on prototypes


def test_the_index_round_trips_and_keeps_one_object_per_image() -> None:
    rng = np.random.default_rng(1)
    x, labels, groups = _toy_objects(120, rng)
    weights, _ = train_attributes(x, labels, groups, AttributeOptions(steps=50))
    image_ids = np.repeat(np.arange(20), 6)  # six objects per image
    index = build_index(
        weights,
        groups,
        x,
        image_ids=image_ids.tolist(),
        labels=labels,
        boxes=[(1, 2, 3, 4)] * 120,
        tags=[["red", "circle"]] * 120,
        outlines=[[[1, 2], [3, 2], [3, 4]]] * 120,
        meta={"tagger_version": 3},
    )
    buffer = io.BytesIO()
    index.save(buffer)
    buffer.seek(0)
    again = ObjectIndex.load(buffer)
    assert np.array_equal(again.vectors, index.vectors)
    assert again.groups == index.groups and again.meta == {"tagger_version": 3}
    assert np.allclose(
        again.query(5, (1, 1 - int(labels[5, 1]))), index.query(5, (1, 1 - int(labels[5, 1])))
    )
    hits = again.search(again.query(0), k=19, exclude_images=[0])
    images = [int(again.image_ids[h.row]) for h in hits]
    assert len(images) == 19 and len(set(images)) == 19 and 0 not in images
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert again.group_index("shape") == 1
    with pytest.raises(KeyError, match="no attribute group"):
        again.group_index("size")


def test_object_features_have_the_blocks_the_model_reads() -> None:
    from ml.tagger import TaggerConfig, build_tagger

    scene = next(iter(generate_scenes(seed=1, n_images=1)))
    objects = find_instances(scene.tag_masks, categories=CATEGORIES, parents=PARENTS)
    hand = object_features(scene.image, objects, None, torch.device("cpu"))
    assert hand.shape == (len(objects), DESCRIPTION_DIM + SURROUNDINGS_DIM)
    assert feature_blocks(hand.shape[1]) == [DESCRIPTION_DIM, SURROUNDINGS_DIM]
    assert attribute_dim(hand.shape[1]) == DESCRIPTION_DIM
    tagger = build_tagger(TaggerConfig(tags=("a", "b"), backbone="resnet18", input_size=64))
    deep = object_features(scene.image, objects, tagger, torch.device("cpu"))
    width = deep.shape[1] - DESCRIPTION_DIM - SURROUNDINGS_DIM
    assert feature_blocks(deep.shape[1]) == [
        width // 2,
        DESCRIPTION_DIM,
        width // 2,
        SURROUNDINGS_DIM,
    ]
    assert attribute_dim(deep.shape[1]) == width // 2 + DESCRIPTION_DIM
    with pytest.raises(ValueError, match="not what object_features gives"):
        feature_blocks(DESCRIPTION_DIM + SURROUNDINGS_DIM + 3)


def test_a_prediction_loses_its_speckle_and_an_image_keeps_its_largest_objects() -> None:
    rng = np.random.default_rng(0)
    mask = _disc(200, 200, 100, 100, 40) | (rng.random((200, 200)) < 0.02)
    clean = clean_prediction(mask)
    count, _ = cv2.connectedComponents(clean.astype(np.uint8))
    assert count - 1 == 1  # the disc alone
    assert clean.sum() == pytest.approx(_disc(200, 200, 100, 100, 40).sum(), rel=0.05)
    objects = [Instance((0, 0, s, s), np.ones((s, s), bool)) for s in (3, 9, 5, 7)]
    assert [o.box[2] for o in largest(objects, 2)] == [9, 7]  # their order kept
    assert largest(objects, 10) == objects
