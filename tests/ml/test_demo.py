"""Tests of the procedural demo dataset: determinism, masks, vocabulary and the folder contract."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pycocotools import mask as mask_utils

import ml.demo.dataset as dataset_module
from ml.demo.dataset import write_demo_dataset
from ml.demo.geometry import (
    POLYGONS,
    SHAPES,
    Placement,
    inside_polygon,
    pixel_centres,
    shape_mask,
    unit_area,
)
from ml.demo.painting import OBJECT_COLOURS, shade
from ml.demo.scenes import (
    MAX_SIDE,
    MIN_SIDE,
    MIN_VISIBLE_FRACTION,
    MIN_VISIBLE_PIXELS,
    Scene,
    SceneObject,
    generate_scenes,
    visible_masks,
)
from ml.demo.sizes import class_bounds, size_class, size_spread
from ml.demo.vocabulary import (
    VOCABULARY,
    ancestors,
    children,
    get_tag,
    resolve_tag,
    tag_names,
    with_ancestors,
)

SEED = 7
N_SCENES = 24  # for checks on scenes in memory
N_WRITTEN = 12  # for checks on the written folder
MAX_BACKGROUND_CHROMA = 45  # max(rgb) - min(rgb); object colours are far above, backgrounds below
EXHAUSTIVE_PARENTS = ("shape", "polygon", "patterned")

# pycocotools' decode trips a NumPy 2 deprecation inside the library, not in our code
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return list(generate_scenes(seed=SEED, n_images=N_SCENES))


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("written") / "demo"
    write_demo_dataset(out, seed=SEED, n_images=N_WRITTEN)
    return out


def _all_objects(scenes: list[Scene]) -> list[SceneObject]:
    return [obj for scene in scenes for obj in scene.objects]


def _file_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _load_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


# --- determinism ---------------------------------------------------------------------------


def test_same_seed_writes_identical_bytes(tmp_path: Path) -> None:
    write_demo_dataset(tmp_path / "a", seed=3, n_images=5)
    write_demo_dataset(tmp_path / "b", seed=3, n_images=5)
    first, second = _file_bytes(tmp_path / "a"), _file_bytes(tmp_path / "b")
    assert len(first) == 5 + 3
    assert first == second


def test_other_seed_writes_other_data(tmp_path: Path) -> None:
    write_demo_dataset(tmp_path / "a", seed=3, n_images=5)
    write_demo_dataset(tmp_path / "b", seed=4, n_images=5)
    first, second = _file_bytes(tmp_path / "a"), _file_bytes(tmp_path / "b")
    assert first["vocabulary.json"] == second["vocabulary.json"]
    assert first["annotations.json"] != second["annotations.json"]
    assert all(first[name] != second[name] for name in first if name.startswith("images/"))


def test_scene_depends_only_on_seed_and_index() -> None:
    short = list(generate_scenes(seed=SEED, n_images=2))
    longer = list(generate_scenes(seed=SEED, n_images=4))
    for a, b in zip(short, longer, strict=False):
        assert a.name == b.name
        assert np.array_equal(a.image, b.image)


# --- scenes ---------------------------------------------------------------------------------


def test_sizes_in_range_and_not_all_square(scenes: list[Scene]) -> None:
    assert (MIN_SIDE, MAX_SIDE) == (384, 1024)  # sides like real photos, not thumbnails
    sizes = [(scene.height, scene.width) for scene in scenes]
    assert all(MIN_SIDE <= side <= MAX_SIDE for size in sizes for side in size)
    assert min(min(size) for size in sizes) < 512 and max(max(size) for size in sizes) > 900
    assert any(h != w for h, w in sizes)
    assert any(h > w for h, w in sizes) and any(h < w for h, w in sizes)
    assert all(scene.image.dtype == np.uint8 and scene.image.shape[2] == 3 for scene in scenes)


def test_visible_masks_are_full_shapes_minus_later_ones(scenes: list[Scene]) -> None:
    for scene in scenes:
        assert scene.objects
        expected = visible_masks([obj.full_mask for obj in scene.objects])
        stacked = np.stack([obj.mask for obj in scene.objects]).astype(int)  # (N, H, W)
        assert stacked.sum(axis=0).max() <= 1  # visible parts never overlap
        for obj, mask in zip(scene.objects, expected, strict=True):
            assert np.array_equal(obj.mask, mask)
            assert obj.mask.sum() >= MIN_VISIBLE_FRACTION * obj.full_mask.sum()


def test_occlusion_happens(scenes: list[Scene]) -> None:
    occluded = [obj for obj in _all_objects(scenes) if obj.mask.sum() < obj.full_mask.sum()]
    assert len(occluded) >= 5
    assert len({id(s) for s in scenes if any(o in occluded for o in s.objects)}) >= 3


def test_object_sizes_spread_over_coco_classes(scenes: list[Scene]) -> None:
    spread = size_spread(scenes)
    assert spread.total == len(_all_objects(scenes))
    shares = spread.shares()
    # Aimed at about 35% small, 40% medium, 25% large; 24 scenes (~90 objects) stay in these bands.
    assert all(0.15 <= share <= 0.6 for share in shares.values()), shares
    assert 0.001 < spread.median_image_share < 0.05, spread
    assert min(int(obj.mask.sum()) for obj in _all_objects(scenes)) >= MIN_VISIBLE_PIXELS


def test_size_classes_follow_coco_bounds() -> None:
    areas = (1, 32**2 - 1, 32**2, 96**2 - 1, 96**2, 10**6)
    expected = ["small", "small", "medium", "medium", "large", "large"]
    assert [size_class(area) for area in areas] == expected
    assert class_bounds("large", 400, 600)[1] > class_bounds("large", 400, 500)[1]
    with pytest.raises(KeyError, match="known"):
        class_bounds("huge", 400, 400)


@pytest.mark.parametrize("shape", SHAPES)
def test_shape_masks_match_a_whole_image_evaluation(shape: str) -> None:
    height, width = 60, 80
    xs, ys = pixel_centres(height, width)  # (H, W) each
    places = (Placement(40.3, 30.7, 17.2, 0.4), Placement(2.0, 57.5, 25.0, 1.1))
    for place in (*places, Placement(79.9, 0.2, 9.0, 2.0)):  # inside, across borders, corner
        if shape == "circle":
            expected = (xs - place.cx) ** 2 + (ys - place.cy) ** 2 <= place.radius**2
        else:
            expected = inside_polygon(xs, ys, POLYGONS[shape](place))
        assert np.array_equal(shape_mask(shape, height, width, place), expected)
    inside = shape_mask(shape, height, width, places[0]).sum()
    assert inside == pytest.approx(unit_area(shape) * places[0].radius ** 2, rel=0.05)


def _nearest_palette(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return, per pixel, the nearest object colour and whether it is the dark shade; (K,)."""
    names = list(OBJECT_COLOURS)
    palette = [np.asarray(OBJECT_COLOURS[n], float) for n in names] + [shade(n) for n in names]
    dist = np.linalg.norm(pixels[:, None, :] - np.stack(palette)[None], axis=2)  # (K, 2C)
    nearest = dist.argmin(axis=1)
    return np.asarray(names)[nearest % len(names)], nearest >= len(names)


def test_objects_are_painted_exactly_through_their_masks(scenes: list[Scene]) -> None:
    for scene in scenes:
        image = scene.image.astype(int)  # (H, W, 3)
        chroma = image.max(axis=2) - image.min(axis=2)  # (H, W)
        foreground = np.logical_or.reduce([obj.mask for obj in scene.objects])
        assert chroma[~foreground].max() <= MAX_BACKGROUND_CHROMA  # no object shows outside
        assert chroma[foreground].min() > MAX_BACKGROUND_CHROMA
        for obj in scene.objects:
            colours, dark = _nearest_palette(image[obj.mask].astype(float))
            assert (colours == obj.colour).all()
            if obj.texture is None:
                assert not dark.any()
            else:  # a texture tag means both inks show
                assert 0.1 < dark.mean() < 0.9


def test_tag_masks_are_unions_of_object_masks(scenes: list[Scene]) -> None:
    for scene in scenes:
        present = {tag for obj in scene.objects for tag in obj.tags}
        assert set(scene.tag_masks) == present
        assert list(scene.tag_masks) == [t for t in tag_names() if t in present]
        for tag, mask in scene.tag_masks.items():
            carriers = [obj.mask for obj in scene.objects if tag in obj.tags]
            assert np.array_equal(mask, np.logical_or.reduce(carriers))


def test_parent_masks_contain_children(scenes: list[Scene]) -> None:
    for scene in scenes:
        for obj in scene.objects:
            assert obj.tags == with_ancestors(obj.tags)
            assert {obj.shape, obj.colour} <= set(obj.tags)
        for tag, mask in scene.tag_masks.items():
            parent = get_tag(tag).parent
            if parent is not None:
                assert not (mask & ~scene.tag_masks[parent]).any()
        for parent in EXHAUSTIVE_PARENTS:
            kids = [scene.tag_masks[c] for c in children(parent) if c in scene.tag_masks]
            union = np.logical_or.reduce(kids) if kids else None
            if parent in scene.tag_masks:
                assert union is not None and np.array_equal(union, scene.tag_masks[parent])


def test_combination_tags_match_colour_and_shape(scenes: list[Scene]) -> None:
    objects = _all_objects(scenes)
    for obj in objects:
        assert ("red_circle" in obj.tags) == (obj.colour == "red" and obj.shape == "circle")
        assert ("blue_star" in obj.tags) == (obj.colour == "blue" and obj.shape == "star")
    seen = {tag for obj in objects for tag in obj.tags}
    assert seen == set(tag_names())  # every tag occurs in a couple dozen scenes


# --- vocabulary -----------------------------------------------------------------------------


def test_vocabulary_has_hierarchy_and_aliases() -> None:
    names = tag_names()
    assert len(names) >= 8 and len(set(names)) == len(names)
    assert {tag.category for tag in VOCABULARY} == {"general", "attribute"}
    assert all(tag.parent is None or tag.parent in names for tag in VOCABULARY)
    assert max(len(ancestors(name)) for name in names) >= 2
    aliases = [alias for tag in VOCABULARY for alias in tag.aliases]
    assert len(aliases) >= 3 and len(set(aliases)) == len(aliases)
    assert not set(aliases) & set(names)
    assert ancestors("red_circle") == ("circle", "shape")
    assert resolve_tag("stripes") == "striped" and resolve_tag("circle") == "circle"
    with pytest.raises(KeyError, match="known tags"):
        get_tag("purple")


# --- written folder -------------------------------------------------------------------------


def test_folder_layout_and_vocabulary_json(written: Path) -> None:
    assert sorted(p.name for p in written.iterdir()) == [
        "annotations.json",
        "images",
        "tags.txt",
        "vocabulary.json",
    ]
    assert len(list((written / "images").glob("*.png"))) == N_WRITTEN
    vocabulary = _load_json(written / "vocabulary.json")["tags"]
    assert [t["name"] for t in vocabulary] == list(tag_names())
    assert vocabulary[0].keys() == {
        "name",
        "display_name",
        "category",
        "parent",
        "aliases",
        "description",
        "exhaustive",
    }
    # A parent is exhaustive when every instance is one of its children's.
    assert {t["name"] for t in vocabulary if t["exhaustive"]} == {"shape", "polygon", "patterned"}
    assert not list(written.parent.glob(".demo.partial-*"))


def test_tags_txt_lists_every_tag_with_some_aliases(written: Path, scenes: list[Scene]) -> None:
    lines = (written / "tags.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == N_WRITTEN
    canonical = set(tag_names())
    alias_uses = 0
    for line, scene in zip(lines, scenes, strict=False):
        file_name, *tokens = line.split(" ")
        assert file_name == f"{scene.name}.png"
        assert [resolve_tag(token) for token in tokens] == list(scene.tag_masks)
        alias_uses += sum(token not in canonical for token in tokens)
    assert alias_uses >= 3


def _decoded_union(annotations: list[dict[str, Any]]) -> np.ndarray:
    masks = [mask_utils.decode(a["segmentation"]).astype(bool) for a in annotations]
    return np.logical_or.reduce(masks)


def test_annotations_decode_to_scene_tag_masks(written: Path, scenes: list[Scene]) -> None:
    coco = _load_json(written / "annotations.json")
    category_names = {c["id"]: c["name"] for c in coco["categories"]}
    assert list(category_names.values()) == list(tag_names())
    grouped: dict[tuple[int, str], list[dict[str, Any]]] = defaultdict(list)
    for annotation in coco["annotations"]:
        assert annotation["iscrowd"] == 1 and isinstance(annotation["segmentation"]["counts"], str)
        grouped[(annotation["image_id"], category_names[annotation["category_id"]])].append(
            annotation
        )
    by_id = {image["id"]: image for image in coco["images"]}
    for image_id, scene in enumerate(scenes[:N_WRITTEN], start=1):
        image = by_id[image_id]
        assert (image["file_name"], image["height"], image["width"]) == (
            f"{scene.name}.png",
            scene.height,
            scene.width,
        )
        tags = {tag for (i, tag) in grouped if i == image_id}
        assert tags == set(scene.tag_masks)
        for tag, mask in scene.tag_masks.items():
            group = grouped[(image_id, tag)]
            assert np.array_equal(_decoded_union(group), mask)
            assert sum(a["area"] for a in group) == mask.sum()  # one per object, disjoint
    assert len(coco["annotations"]) == sum(
        len(obj.tags) for scene in scenes[:N_WRITTEN] for obj in scene.objects
    )


def test_annotation_bbox_and_area_match_mask(written: Path) -> None:
    coco = _load_json(written / "annotations.json")
    for annotation in coco["annotations"][:200]:
        mask = mask_utils.decode(annotation["segmentation"]).astype(bool)
        ys, xs = np.nonzero(mask)
        assert annotation["area"] == mask.sum()
        x0, y0 = xs.min(), ys.min()
        assert annotation["bbox"] == [x0, y0, xs.max() - x0 + 1, ys.max() - y0 + 1]


# --- writing safely -------------------------------------------------------------------------


def test_refuses_non_empty_folder_and_leaves_it_untouched(written: Path) -> None:
    before = _file_bytes(written)
    with pytest.raises(FileExistsError, match="not an empty folder"):
        write_demo_dataset(written, seed=SEED + 1, n_images=2)
    assert _file_bytes(written) == before
    assert not list(written.parent.glob(".demo.partial-*"))


def test_writes_into_empty_existing_folder(tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    manifest = write_demo_dataset(out, seed=1, n_images=2)
    assert manifest.out_dir == out and manifest.n_images == 2
    assert manifest.tags == tag_names()
    assert manifest.n_annotations == len(_load_json(out / "annotations.json")["annotations"])


def test_crash_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(path: Path, image: np.ndarray) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(dataset_module, "_write_image", broken)
    with pytest.raises(OSError, match="disk full"):
        write_demo_dataset(tmp_path / "demo", n_images=2)
    assert list(tmp_path.iterdir()) == []


def test_rejects_empty_dataset(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        write_demo_dataset(tmp_path / "demo", n_images=0)
