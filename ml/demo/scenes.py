"""Procedural scenes with exact ground-truth masks.

A scene is a muted, textured background with two to six saturated objects (circle, square,
triangle, star; plain, striped, dotted or checkered) drawn one after the other, so later objects
occlude earlier ones. Each object's mask is its *visible* part: its full shape minus every later
shape. Objects are painted through their full masks in drawing order, so the pixels each object
keeps are exactly its visible mask.

Images are 384 to 1024 px on each side (aspect ratios from 1:1 to 2:1, either orientation), so
even the pyramid's finest cells show enough pixels to judge. Object sizes spread over COCO's
small, medium and large classes (``ml.demo.sizes``). Placement keeps every object useful for 3x3
grid questions: every object keeps at least ``MIN_VISIBLE_FRACTION`` of its shape and
``MIN_VISIBLE_PIXELS`` pixels, and a textured object (never one narrower than
``MIN_TEXTURED_DIAMETER``) keeps both of its inks visible. Candidates that break a rule are
redrawn; after ``MAX_ATTEMPTS`` the object is dropped. Everything comes from the given
generator, so a seed fixes the scene.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ml.demo.geometry import SHAPES, Placement, shape_mask, unit_area
from ml.demo.painting import (
    OBJECT_COLOURS,
    TEXTURES,
    background,
    paint_object,
    texture_ink,
    to_uint8,
)
from ml.demo.sizes import draw_area
from ml.demo.vocabulary import tag_names, with_ancestors

MIN_SIDE, MAX_SIDE = 384, 1024
ASPECTS = (1.0, 1.0, 4 / 3, 3 / 2, 16 / 9, 2.0)  # long side / short side
MIN_TEXTURED_DIAMETER = 28.0  # pixels; below this a pattern would not read as one
TEXTURED_SHARE = 0.55
TEXTURE_PERIOD = (8.0, 18.0)  # pixels; 0.45 of the radius, clipped to this range
MIN_VISIBLE_FRACTION = 0.4
MIN_VISIBLE_PIXELS = 100  # a 10 x 10 blob, the least that reads as an object at full size
MIN_INK_SHARE = 0.12  # each ink of a textured object covers at least this share of what shows
OVERLAP_SHARE = 0.5  # chance to place an object against an earlier one, to force occlusion
MAX_ATTEMPTS = 25
COMBO_TAGS: dict[tuple[str, str], str] = {
    ("red", "circle"): "red_circle",
    ("blue", "star"): "blue_star",
}


@dataclass(frozen=True, eq=False)
class SceneObject:
    """One drawn object: what it is, its tags (with parents) and its masks."""

    shape: str
    colour: str
    texture: str | None
    tags: tuple[str, ...]
    mask: np.ndarray  # (H, W) bool, visible part
    full_mask: np.ndarray  # (H, W) bool, whole shape inside the image, before occlusion


@dataclass(frozen=True, eq=False)
class Scene:
    """One generated image with its objects and one ground-truth mask per present tag."""

    name: str
    image: np.ndarray  # (H, W, 3) uint8
    objects: tuple[SceneObject, ...]
    tag_masks: dict[str, np.ndarray]  # tag -> (H, W) bool, vocabulary order, present tags only

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])


@dataclass(frozen=True, eq=False)
class _Draft:
    """An object before occlusion: its full mask and, if textured, where its dark ink goes."""

    shape: str
    colour: str
    texture: str | None
    place: Placement
    full_mask: np.ndarray  # (H, W) bool
    ink: np.ndarray | None  # (H, W) bool


def object_tags(shape: str, colour: str, texture: str | None) -> tuple[str, ...]:
    """Return every tag an object carries, parents included, in vocabulary order."""
    leaves = [shape, colour]
    if texture is not None:
        leaves.append(texture)
    if (colour, shape) in COMBO_TAGS:
        leaves.append(COMBO_TAGS[(colour, shape)])
    return with_ancestors(leaves)


def image_size(rng: np.random.Generator) -> tuple[int, int]:
    """Draw (height, width) in [MIN_SIDE, MAX_SIDE] with a random aspect and orientation."""
    aspect = float(rng.choice(ASPECTS))
    short = int(rng.integers(MIN_SIDE, int(MAX_SIDE / aspect) + 1))
    long = min(MAX_SIDE, round(short * aspect))
    return (short, long) if rng.random() < 0.5 else (long, short)


def _draw_placement(
    rng: np.random.Generator, shape: str, height: int, width: int, drafts: list[_Draft]
) -> Placement:
    """Draw a size, an angle and a centre, often right against an earlier object."""
    radius = float(np.sqrt(draw_area(rng, height, width) / unit_area(shape)))
    if drafts and rng.random() < OVERLAP_SHARE:
        other = drafts[int(rng.integers(len(drafts)))].place
        direction = rng.uniform(0.0, 2 * np.pi)
        reach = (other.radius + radius) * rng.uniform(0.45, 0.9)
        cx, cy = other.cx + reach * np.cos(direction), other.cy + reach * np.sin(direction)
    else:
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
    margin = 0.7 * radius  # keeps most of the shape inside the image
    cx = float(np.clip(cx, margin, width - margin))
    cy = float(np.clip(cy, margin, height - margin))
    return Placement(cx, cy, radius, rng.uniform(0.0, 2 * np.pi))


def _draw_texture(rng: np.random.Generator, radius: float) -> str | None:
    if 2 * radius < MIN_TEXTURED_DIAMETER or rng.random() >= TEXTURED_SHARE:
        return None
    return str(rng.choice(list(TEXTURES)))


def _draw_candidate(
    rng: np.random.Generator, height: int, width: int, drafts: list[_Draft]
) -> _Draft:
    """Draw one random object against the ones already placed."""
    shape = str(rng.choice(list(SHAPES)))
    colour = str(rng.choice(list(OBJECT_COLOURS)))
    place = _draw_placement(rng, shape, height, width, drafts)
    texture = _draw_texture(rng, place.radius)
    ink = None
    if texture is not None:
        period = float(np.clip(place.radius * 0.45, *TEXTURE_PERIOD))
        angle = rng.uniform(0.0, np.pi)
        ink = texture_ink(texture, height, width, place, period, angle)
    full = shape_mask(shape, height, width, place)
    return _Draft(shape, colour, texture, place, full, ink)


def visible_masks(full_masks: list[np.ndarray]) -> list[np.ndarray]:
    """Remove from each mask everything that a later mask covers.

    Args:
        full_masks: full shapes in drawing order (the last is on top).

    Shape:
        each mask (H, W) bool; outputs the same.

    Returns:
        The visible part of each shape, pairwise disjoint.
    """
    visible: list[np.ndarray] = []
    covered = np.zeros_like(full_masks[0]) if full_masks else np.zeros((0, 0), dtype=bool)
    for full in reversed(full_masks):
        visible.append(full & ~covered)
        covered = covered | full
    return visible[::-1]


def _reads_well(draft: _Draft, visible: np.ndarray) -> bool:
    """Whether enough of an object shows, and both inks of its texture show."""
    area = int(visible.sum())
    if area < MIN_VISIBLE_PIXELS or area < MIN_VISIBLE_FRACTION * int(draft.full_mask.sum()):
        return False
    if draft.ink is None:
        return True
    ink_share = float(draft.ink[visible].mean())
    return MIN_INK_SHARE <= ink_share <= 1 - MIN_INK_SHARE


def _all_read_well(drafts: list[_Draft]) -> bool:
    visible = visible_masks([draft.full_mask for draft in drafts])
    return all(_reads_well(d, v) for d, v in zip(drafts, visible, strict=True))


def _place_objects(rng: np.random.Generator, height: int, width: int) -> list[_Draft]:
    """Place two to six objects so that each keeps a fair visible part."""
    drafts: list[_Draft] = []
    for _ in range(int(rng.integers(2, 7))):
        for _ in range(MAX_ATTEMPTS):
            candidate = _draw_candidate(rng, height, width, drafts)
            if _all_read_well([*drafts, candidate]):
                drafts.append(candidate)
                break
    return drafts


def _tag_masks(objects: tuple[SceneObject, ...]) -> dict[str, np.ndarray]:
    """Return the union of visible masks per tag, for the tags present, in vocabulary order."""
    masks: dict[str, np.ndarray] = {}
    for name in tag_names():
        carriers = [obj.mask for obj in objects if name in obj.tags]
        if carriers:
            masks[name] = np.logical_or.reduce(carriers)  # (H, W)
    return masks


def generate_scene(rng: np.random.Generator, name: str) -> Scene:
    """Generate one scene: background, occluding objects, and exact masks per tag.

    Args:
        rng: the only random source; the same generator state gives the same scene.
        name: the image name (without extension).

    Returns:
        A scene of size in [MIN_SIDE, MAX_SIDE] x [MIN_SIDE, MAX_SIDE] with at least one object.
    """
    height, width = image_size(rng)
    canvas = background(rng, height, width)  # (H, W, 3) float
    drafts = _place_objects(rng, height, width)
    for draft in drafts:
        paint_object(rng, canvas, draft.full_mask, draft.colour, draft.ink)
    visible = visible_masks([draft.full_mask for draft in drafts])
    objects = tuple(
        SceneObject(
            shape=d.shape,
            colour=d.colour,
            texture=d.texture,
            tags=object_tags(d.shape, d.colour, d.texture),
            mask=v,
            full_mask=d.full_mask,
        )
        for d, v in zip(drafts, visible, strict=True)
    )
    return Scene(name, to_uint8(canvas), objects, _tag_masks(objects))


def scene_name(index: int) -> str:
    """Return the image name of the scene at ``index`` (``demo_0000``, ...)."""
    return f"demo_{index:04d}"


def generate_scenes(*, seed: int, n_images: int) -> Iterator[Scene]:
    """Yield ``n_images`` scenes; scene i depends only on (seed, i), not on ``n_images``.

    Args:
        seed: the dataset seed.
        n_images: how many scenes to generate.
    """
    children = np.random.SeedSequence(seed).spawn(n_images)
    for index, child in enumerate(children):
        yield generate_scene(np.random.default_rng(child), scene_name(index))
