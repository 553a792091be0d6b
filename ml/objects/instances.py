"""Objects cut from a project's per-tag masks, their attributes, and what describes them.

A project keeps one mask per (image, tag). Tags that name things (any category but
``attribute``) are cut into connected components, most specific tag first: a component that is
mostly an object found already adds its tag to it (a ``red_circle`` is also a ``circle`` and a
``shape``), one that is mostly made of objects found already (the ``shape`` mask of two touching
objects) adds nothing, anything else is a new object. An object carries an attribute tag when
that tag's mask covers at least half of it, so an attribute belongs to one object, not to the
whole image.

Attribute *groups* are the values one property takes, such as colours or textures: tags of one
category that never (almost never) describe the same object, grown greedily into the largest
such sets. A tag and its parent always meet, so they never share a group. An object without any
tag of a group takes the group's ``NONE`` value ("plain", for textures).

``describe`` gives each object's hand-made description beside the network's: colour statistics
(CIE Lab moments and a saturation-weighted hue histogram), its outline's shape (log Hu moments,
solidity, extent, circularity, elongation, corners) and how busy its inside is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
import numpy.typing as npt

ATTRIBUTE_CATEGORY = "attribute"
NONE = "(none)"
MIN_PIXELS = 64  # a component smaller than an 8 x 8 patch is a crumb, not an object
SAME_OBJECT_IOU = 0.7
MADE_OF_OTHERS = 0.85  # a component this much covered by found objects is their union
ATTRIBUTE_COVER = 0.5
MAX_OBJECTS_PER_IMAGE = 48  # the largest; a crowd scene's smallest things are seldom searched
PREDICTION_MIN_SHARE = 0.002  # of the image: a segmenter's smaller blobs are mostly speckle
EXCLUSIVE_SHARE = 0.02  # two tags "never" meet when they share at most this share of the rarer
SEAM = np.ones((5, 5), np.uint8)  # an opening with this removes seams between masks
HUE_BINS = 12
ORIENTATION_BINS = 8
EDGE = 24.0  # a Sobel magnitude (8-bit levels) that is an edge, not noise
GREY = (124, 116, 104)  # ImageNet's mean colour: what a crop shows outside its object
CROP_MARGIN = 0.12  # of the object's box side, each way


@dataclass(eq=False)
class Instance:
    """One object in one image: its mask's box and the box's mask, the tags that name it and the
    attribute tags that cover it."""

    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive), image pixels
    mask: npt.NDArray[np.bool_]  # (y1 - y0, x1 - x0)
    tags: set[str] = field(default_factory=set)
    attributes: set[str] = field(default_factory=set)

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    def full_mask(self, height: int, width: int) -> npt.NDArray[np.bool_]:
        out = np.zeros((height, width), dtype=bool)
        x0, y0, x1, y1 = self.box
        out[y0:y1, x0:x1] = self.mask
        return out

    def outline(self, *, max_points: int = 64) -> list[list[int]]:
        """The largest outer contour as ``[[x, y], ...]`` in image pixels, simplified."""
        contours, _ = cv2.findContours(
            self.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
        )
        if not contours:
            return []
        contour = max(contours, key=cv2.contourArea)
        epsilon = 0.005 * cv2.arcLength(contour, True)
        while True:
            poly = cv2.approxPolyDP(contour, epsilon, True).reshape(-1, 2)
            if len(poly) <= max_points:
                break
            epsilon *= 1.5
        x0, y0 = self.box[0], self.box[1]
        return [[int(x) + x0, int(y) + y0] for x, y in poly]


def _ancestors(tag: str, parents: Mapping[str, str | None]) -> list[str]:
    """The tag's parent, its parent's parent, and so on (a cycle ends the chain)."""
    out: list[str] = []
    parent = parents.get(tag)
    while parent is not None and parent not in out and parent != tag:
        out.append(parent)
        parent = parents.get(parent)
    return out


def _depth(tag: str, parents: Mapping[str, str | None]) -> int:
    return len(_ancestors(tag, parents))


def _components(mask: npt.NDArray[np.bool_], min_pixels: int = MIN_PIXELS) -> list[Instance]:
    count, labels_, stats_, _ = cv2.connectedComponentsWithStats(
        mask.astype(np.uint8), connectivity=8
    )
    labels, stats = np.asarray(labels_), np.asarray(stats_)
    out = []
    for i in range(1, count):
        x, y, w, h, area = (int(v) for v in stats[i])
        if area >= min_pixels:
            out.append(Instance((x, y, x + w, y + h), labels[y : y + h, x : x + w] == i))
    return out


def _split(part: Instance, signature: npt.NDArray[np.int64]) -> list[Instance]:
    """A component cut where the attribute tags covering it change (two touching stars, one red
    and one green, are one component of the ``star`` mask); pieces thinner than ``SEAM``, such
    as where two masks' borders disagree by a pixel or two, are left out."""
    x0, y0, x1, y1 = part.box
    inside = signature[y0:y1, x0:x1][part.mask]
    kinds = np.unique(inside)
    if len(kinds) == 1:
        return [part]
    pieces = []
    for kind in kinds:
        region = part.mask & (signature[y0:y1, x0:x1] == kind)
        region = cv2.morphologyEx(region.astype(np.uint8), cv2.MORPH_OPEN, SEAM) > 0
        for piece in _components(region):
            bx0, by0, bx1, by1 = piece.box
            pieces.append(Instance((x0 + bx0, y0 + by0, x0 + bx1, y0 + by1), piece.mask))
    return pieces or [part]


def _overlap(a: Instance, b: Instance) -> int:
    x0, y0 = max(a.box[0], b.box[0]), max(a.box[1], b.box[1])
    x1, y1 = min(a.box[2], b.box[2]), min(a.box[3], b.box[3])
    if x1 <= x0 or y1 <= y0:
        return 0
    sa = a.mask[y0 - a.box[1] : y1 - a.box[1], x0 - a.box[0] : x1 - a.box[0]]
    sb = b.mask[y0 - b.box[1] : y1 - b.box[1], x0 - b.box[0] : x1 - b.box[0]]
    return int((sa & sb).sum())


def find_instances(
    masks: Mapping[str, npt.NDArray[np.bool_]],
    *,
    categories: Mapping[str, str],
    parents: Mapping[str, str | None],
) -> list[Instance]:
    """The objects of one image from its tags' masks (tag -> (H, W) bool, all the same size).

    ``categories`` says which tags are attributes (``ATTRIBUTE_CATEGORY``); ``parents`` orders
    the others most specific first. Objects come in that order, then by position.
    """
    things = [t for t in masks if categories.get(t) != ATTRIBUTE_CATEGORY]
    things.sort(key=lambda t: (-_depth(t, parents), t))
    attributes = sorted(t for t in masks if categories.get(t) == ATTRIBUTE_CATEGORY)
    shape = next(iter(masks.values())).shape if masks else (0, 0)
    signature = np.zeros(shape, dtype=np.int64)  # which attribute tags cover each pixel
    for bit, tag in enumerate(attributes[:62]):
        signature |= np.asarray(masks[tag], dtype=bool).astype(np.int64) << bit
    found: list[Instance] = []
    for tag in things:
        whole = _components(np.asarray(masks[tag], dtype=bool))
        for part in (piece for component in whole for piece in _split(component, signature)):
            overlaps = [_overlap(part, obj) for obj in found]
            best = int(np.argmax(overlaps)) if overlaps else -1
            if best >= 0:
                union = part.area + found[best].area - overlaps[best]
                if overlaps[best] / max(union, 1) >= SAME_OBJECT_IOU:
                    found[best].tags.add(tag)
                    continue
            if sum(overlaps) >= MADE_OF_OTHERS * part.area:
                for obj, shared in zip(found, overlaps, strict=True):
                    if shared >= SAME_OBJECT_IOU * obj.area:  # whole objects inside it
                        obj.tags.add(tag)
                continue
            part.tags.add(tag)
            found.append(part)
    for obj in found:  # a circle is a shape, whether or not its component was its own
        obj.tags |= {a for t in list(obj.tags) for a in _ancestors(t, parents) if a in masks}
    for tag, mask in masks.items():
        if categories.get(tag) != ATTRIBUTE_CATEGORY:
            continue
        mask = np.asarray(mask, dtype=bool)
        for obj in found:
            x0, y0, x1, y1 = obj.box
            if (mask[y0:y1, x0:x1] & obj.mask).sum() >= ATTRIBUTE_COVER * obj.area:
                obj.attributes.add(tag)
    return found


def clean_prediction(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """A segmenter's mask without its speckle: opened (5 x 5), blobs under
    ``PREDICTION_MIN_SHARE`` of the image dropped. An early model's prediction scatters
    hundreds of crumbs, each of which would be an object."""
    opened = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, SEAM)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(opened, connectivity=8)
    areas = np.asarray(stats)[:, cv2.CC_STAT_AREA]
    keep = np.flatnonzero(areas >= PREDICTION_MIN_SHARE * mask.size)
    return np.isin(np.asarray(labels), keep[keep > 0])


def largest(objects: list[Instance], most: int = MAX_OBJECTS_PER_IMAGE) -> list[Instance]:
    """The ``most`` largest objects, in their order."""
    if len(objects) <= most:
        return objects
    kept = set(sorted(range(len(objects)), key=lambda i: -objects[i].area)[:most])
    return [obj for i, obj in enumerate(objects) if i in kept]


@dataclass(frozen=True)
class Group:
    """One property's values (tags that never describe the same object), and its name."""

    name: str
    values: tuple[str, ...]  # tag names, most common first, then NONE when some objects lack all

    def value_of(self, tags: set[str]) -> int:
        """The index of the value an object with these tags (and attributes) takes; -1 when it
        takes none and the group has no NONE value."""
        for i, value in enumerate(self.values):
            if value in tags:
                return i
        return self.values.index(NONE) if NONE in self.values else -1


def _exclusive(pair: int, a: int, b: int) -> bool:
    return pair <= EXCLUSIVE_SHARE * min(a, b)


def attribute_groups(
    tag_sets: Sequence[set[str]],
    *,
    categories: Mapping[str, str],
    parents: Mapping[str, str | None],
    min_objects: int = 3,
) -> list[Group]:
    """The groups of mutually exclusive tags among objects' tag sets (tags and attributes
    together), largest group first.

    Each tag seeds a group grown greedily from the commonest tags of its category that meet
    none of its members; the largest (then commonest) group is kept, its tags taken out, and
    the rest grown again. Tags on fewer than ``min_objects`` objects take no part.
    """
    names = sorted({t for tags in tag_sets for t in tags})
    count = {t: sum(t in tags for tags in tag_sets) for t in names}
    names = [t for t in names if count[t] >= min_objects]
    index = {t: i for i, t in enumerate(names)}
    together = np.zeros((len(names), len(names)), dtype=np.int64)
    for tags in tag_sets:
        rows = [index[t] for t in tags if t in index]
        together[np.ix_(rows, rows)] += 1
    by_count = sorted(names, key=lambda t: (-count[t], t))
    left = set(names)
    groups: list[Group] = []
    while True:
        best: list[str] = []
        for seed in by_count:
            if seed not in left:
                continue
            members = [seed]
            for t in by_count:
                fits = t in left and t not in members and categories.get(t) == categories.get(seed)
                if fits and all(
                    _exclusive(together[index[t], index[m]], count[t], count[m]) for m in members
                ):
                    members.append(t)
            if (len(members), sum(count[m] for m in members)) > (
                len(best),
                sum(count[m] for m in best),
            ):
                best = members
        if len(best) < 2:
            break
        # A tag that refines a value (``red_circle``) or sums values up (``polygon``) belongs
        # to no other group: it would make one of the same property's values.
        relatives = {a for m in best for a in _ancestors(m, parents)}
        relatives |= {t for t in left if set(_ancestors(t, parents)) & set(best)}
        left -= set(best) | relatives
        covered = sum(any(m in tags for m in best) for tags in tag_sets)
        values = tuple(best) + ((NONE,) if len(tag_sets) - covered >= min_objects else ())
        groups.append(Group(_group_name(best, parents, categories), values))
    return _unique_names(groups)


def _group_name(
    members: Sequence[str], parents: Mapping[str, str | None], categories: Mapping[str, str]
) -> str:
    """The members' nearest common ancestor, else their category."""

    first = _ancestors(members[0], parents)
    common = [a for a in first if all(a in _ancestors(m, parents) for m in members[1:])]
    return common[0] if common else "/".join(members[:3]) + ("/..." if len(members) > 3 else "")


def _unique_names(groups: list[Group]) -> list[Group]:
    seen: dict[str, int] = {}
    out = []
    for group in groups:
        seen[group.name] = seen.get(group.name, 0) + 1
        name = group.name if seen[group.name] == 1 else f"{group.name} {seen[group.name]}"
        out.append(Group(name, group.values))
    return out


def object_crop(
    pixels: npt.NDArray[np.uint8], obj: Instance, *, size: int, alone: bool = True
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]:
    """The object, centred in a ``size`` square: its box with a margin, everything outside the
    (slightly grown) object grey unless not ``alone`` (then with its surroundings); and the
    object's mask at that size, as weights."""
    height, width = pixels.shape[:2]
    x0, y0, x1, y1 = obj.box
    side = max(x1 - x0, y1 - y0) * (1 + 2 * CROP_MARGIN)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left, top = round(cx - side / 2), round(cy - side / 2)
    side_px = max(round(side), 1)
    canvas = np.empty((side_px, side_px, 3), dtype=np.uint8)
    canvas[:] = GREY
    keep = np.zeros((side_px, side_px), dtype=np.uint8)
    sx0, sy0 = max(left, 0), max(top, 0)
    sx1, sy1 = min(left + side_px, width), min(top + side_px, height)
    canvas[sy0 - top : sy1 - top, sx0 - left : sx1 - left] = pixels[sy0:sy1, sx0:sx1]
    keep[y0 - top : y1 - top, x0 - left : x1 - left] = obj.mask
    if alone:
        grow = max(1, side_px // 48)
        grown = cv2.dilate(keep, np.ones((2 * grow + 1, 2 * grow + 1), np.uint8)) > 0
        canvas[~grown] = GREY
    crop = np.asarray(cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA), np.uint8)
    weights = cv2.resize(keep.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    return crop, np.asarray(weights, np.float32)


def _shape_features(mask: npt.NDArray[np.uint8]) -> list[float]:
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    contour = max(contours, key=cv2.contourArea)
    area = float(mask.sum())
    perimeter = max(cv2.arcLength(contour, True), 1.0)
    hull = cv2.convexHull(contour)
    hull_area = max(cv2.contourArea(hull), 1.0)
    (_, _), (w, h), _ = cv2.minAreaRect(contour)
    corners = len(cv2.approxPolyDP(contour, 0.03 * perimeter, True))
    hu = cv2.HuMoments(cv2.moments(mask, binaryImage=True)).reshape(-1)
    log_hu = -np.sign(hu) * np.log10(np.abs(hu) + 1e-30)
    return [
        *np.clip(log_hu, -30, 30).tolist(),
        min(area / hull_area, 1.0),  # solidity: a star's points leave much of its hull empty
        area / max(mask.shape[0] * mask.shape[1], 1),  # extent of the box
        4 * np.pi * area / perimeter**2,  # circularity
        min(w, h) / max(w, h, 1.0),  # elongation
        float(min(corners, 12)),
    ]


def describe(pixels: npt.NDArray[np.uint8], obj: Instance) -> npt.NDArray[np.float32]:
    """The object's hand-made description (``DESCRIPTION_DIM`` numbers): colour, shape, busyness."""
    x0, y0, x1, y1 = obj.box
    patch = np.ascontiguousarray(pixels[y0:y1, x0:x1])
    inside = obj.mask
    lab = cv2.cvtColor(patch, cv2.COLOR_RGB2LAB).reshape(-1, 3)[inside.reshape(-1)].astype(float)
    hsv = cv2.cvtColor(patch, cv2.COLOR_RGB2HSV).reshape(-1, 3)[inside.reshape(-1)].astype(float)
    hue_bin = (hsv[:, 0] * HUE_BINS / 180.0).astype(int) % HUE_BINS
    hist = np.bincount(hue_bin, weights=hsv[:, 1] / 255.0, minlength=HUE_BINS).astype(float)
    hist = hist / max(float(len(hsv)), 1.0)
    # Pixel noise and JPEG's blocks are not texture: the inside's busyness is read a little
    # blurred, and edge directions only where an edge is.
    grey = cv2.GaussianBlur(cv2.cvtColor(patch, cv2.COLOR_RGB2GRAY).astype(np.float32), (0, 0), 1.0)
    core = cv2.erode(inside.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    if not core.any():
        core = inside
    lap = np.abs(cv2.Laplacian(grey, cv2.CV_32F))[core]
    coarse = cv2.GaussianBlur(grey, (0, 0), 2.0)
    lap2 = np.abs(cv2.Laplacian(coarse, cv2.CV_32F))[core]
    gx, gy = cv2.Sobel(grey, cv2.CV_32F, 1, 0), cv2.Sobel(grey, cv2.CV_32F, 0, 1)
    magnitude, angle = np.hypot(gx, gy)[core], np.arctan2(gy, gx)[core]
    edge = magnitude > EDGE
    bins = ((angle[edge] % np.pi) * ORIENTATION_BINS / np.pi).astype(int) % ORIENTATION_BINS
    counts = np.bincount(bins, weights=magnitude[edge], minlength=ORIENTATION_BINS).astype(float)
    # per pixel of the inside (a plain object has next to none), sorted so that a turned
    # pattern reads the same: stripes have one strong direction, checks two, dots none
    orient = np.sort(counts / (64.0 * max(int(core.sum()), 1)))[::-1]
    spread = lab.std(axis=0) if len(lab) > 1 else np.zeros(3)
    features = [
        *(lab.mean(axis=0) / 255.0).tolist(),
        *(spread / 128.0).tolist(),
        *hist.tolist(),
        *_shape_features(inside.astype(np.uint8)),
        float(lap.mean()) / 64.0,  # how busy the inside is: patterns edge it everywhere
        float((lap > 16).mean()),
        float(lap2.mean()) / 16.0,
        *orient.tolist(),
    ]
    return np.asarray(features, dtype=np.float32)


DESCRIPTION_DIM = 3 + 3 + HUE_BINS + 7 + 5 + 3 + ORIENTATION_BINS


def surroundings(pixels: npt.NDArray[np.uint8], obj: Instance) -> npt.NDArray[np.float32]:
    """What tells this object from another just like it (``SURROUNDINGS_DIM`` numbers): the
    colours of a ring around it, its size in the image, its box's shape and where it lies."""
    height, width = pixels.shape[:2]
    x0, y0, x1, y1 = obj.box
    grow = max(2, round(0.15 * max(x1 - x0, y1 - y0)))
    bx0, by0 = max(x0 - grow, 0), max(y0 - grow, 0)
    bx1, by1 = min(x1 + grow, width), min(y1 + grow, height)
    inside = np.zeros((by1 - by0, bx1 - bx0), np.uint8)
    inside[y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0] = obj.mask
    ring = (cv2.dilate(inside, np.ones((2 * grow + 1, 2 * grow + 1), np.uint8)) > 0) & (inside == 0)
    patch = np.ascontiguousarray(pixels[by0:by1, bx0:bx1])
    lab = cv2.cvtColor(patch, cv2.COLOR_RGB2LAB)[ring].astype(float)
    mean = lab.mean(axis=0) / 255.0 if len(lab) else np.zeros(3)
    spread = lab.std(axis=0) / 128.0 if len(lab) > 1 else np.zeros(3)
    features = [
        *mean.tolist(),
        *spread.tolist(),
        float(np.log(max(obj.area, 1) / (height * width))),
        float(np.log((x1 - x0) / max(y1 - y0, 1))),
        (x0 + x1) / (2 * width),
        (y0 + y1) / (2 * height),
    ]
    return np.asarray(features, dtype=np.float32)


SURROUNDINGS_DIM = 10
