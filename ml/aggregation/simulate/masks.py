"""Simulated annotators drawing polygons around objects, with the mistakes real crowds make.

A real crowd's masks of one object differ from an expert's in ways that are *spatial*, not
independent per pixel (what a per-pixel model of noise assumes):

* **polygons with few vertices**: people click corners, not pixels, so a curved border becomes
  chords (``cv2.approxPolyDP`` with a tolerance that grows with the object);
* **borders drawn a little out or in**: each person clicks a few pixels off the border, with a
  bias of their own (most draw slightly outside) and jitter per click;
* **a part left out** (a leg, the far side of an occluded object) or **a part added** (the
  shadow, the thing it holds);
* **the wrong object**: the neighbour with the same tag, or whatever caught the eye.

Styles mix careful, typical and hasty annotators and a few confused ones; the default mix gives
a single annotator's IoU against the truth of about 0.82 mean and 0.87 median, the figures
published for crowd polygon work (``bench/aggregation.py`` prints the simulated crowd's own).

The scenes are photograph-like rather than flat: several objects of random blob shapes with
limbs and notches, shaded and textured, on a cluttered background with a lighting gradient,
blurred and noisy, and some objects with little contrast against what is behind them. Everything
is driven by the caller's ``numpy.random.Generator``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from ml.aggregation.dense import mask_iou

BoolMask = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class AnnotatorStyle:
    """How one kind of annotator draws.

    Attributes:
        tolerance: polygon simplification as a share of the object's size (square root of its
            area), drawn uniformly from this range per annotator; larger means fewer vertices.
        jitter_px: standard deviation of each click's distance from where it was meant.
        offset_px: mean and spread (per annotator) of the outward bias of the border.
        p_omit, p_add: chance to leave a part of the object out, or to add a part.
        p_wrong: chance to outline another object instead.
    """

    name: str
    tolerance: tuple[float, float]
    jitter_px: float
    offset_px: tuple[float, float]
    p_omit: float
    p_add: float
    p_wrong: float


ANNOTATOR_STYLES: dict[str, AnnotatorStyle] = {
    "careful": AnnotatorStyle("careful", (0.01, 0.025), 1.2, (0.5, 1.0), 0.05, 0.03, 0.0),
    "typical": AnnotatorStyle("typical", (0.025, 0.06), 2.5, (1.0, 1.8), 0.15, 0.08, 0.02),
    "hasty": AnnotatorStyle("hasty", (0.05, 0.1), 3.5, (2.0, 2.5), 0.3, 0.15, 0.05),
    "confused": AnnotatorStyle("confused", (0.02, 0.06), 2.0, (1.0, 1.5), 0.15, 0.08, 0.6),
}
ANNOTATOR_MIX: dict[str, float] = {"careful": 0.3, "typical": 0.42, "hasty": 0.22, "confused": 0.06}


@dataclass(frozen=True, eq=False)
class DenseScene:
    """A photograph-like image, the object to outline and the other objects in it.

    Shape:
        image: ``(H, W, 3)`` uint8 RGB; truth and each of others: ``(H, W)`` bool (visible parts).
    """

    image: npt.NDArray[np.uint8]
    truth: BoolMask
    others: tuple[BoolMask, ...]


@dataclass(frozen=True, eq=False)
class DenseCrowd:
    """Several annotators' masks of one scene's object.

    Shape:
        masks: ``(k, H, W)`` bool; iou: ``(k,)`` each mask's IoU against the truth.
    """

    masks: BoolMask
    styles: tuple[str, ...]
    iou: npt.NDArray[np.float64]


# -- scenes -----------------------------------------------------------------------------------
def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int, ch: int) -> np.ndarray:
    """Noise varying over about ``cells`` blobs across the image, in [-1, 1] per channel."""
    small = rng.uniform(
        -1.0, 1.0, (max(2, cells * h // max(h, w)), max(2, cells * w // max(h, w)), ch)
    )
    out = cv2.resize(small.astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    return out.reshape(h, w, ch)


def _ellipse(h: int, w: int, cy: float, cx: float, ry: float, rx: float, angle: float) -> BoolMask:
    m = np.zeros((h, w), np.uint8)
    cv2.ellipse(
        m,
        (round(cx * 16), round(cy * 16)),
        (max(1, round(rx * 16)), max(1, round(ry * 16))),
        np.degrees(angle),
        0,
        360,
        1,
        -1,
        cv2.LINE_8,
        4,
    )
    return m.astype(bool)


def _blob(rng: np.random.Generator, h: int, w: int, area: float) -> BoolMask:
    """A body with limbs and maybe a notch, about ``area`` pixels, somewhere in the image."""
    r = float(np.sqrt(area / np.pi))
    cy, cx = rng.uniform(0.15 * h, 0.85 * h), rng.uniform(0.15 * w, 0.85 * w)
    aspect = rng.uniform(0.5, 1.0)
    angle = rng.uniform(0, np.pi)
    m = _ellipse(h, w, cy, cx, r * aspect, r / max(aspect, 0.5) * 0.9, angle)
    canvas = m.astype(np.uint8)
    for _ in range(int(rng.integers(0, 5))):
        a = rng.uniform(0, 2 * np.pi)
        length = r * rng.uniform(0.6, 1.6)
        thick = max(2, round(r * rng.uniform(0.12, 0.4)))
        p0 = (round(cx + 0.5 * r * np.cos(a)), round(cy + 0.5 * r * np.sin(a)))
        p1 = (round(cx + length * np.cos(a)), round(cy + length * np.sin(a)))
        cv2.line(canvas, p0, p1, 1, thick, cv2.LINE_8)
    if rng.random() < 0.4:
        a = rng.uniform(0, 2 * np.pi)
        notch = _ellipse(
            h, w, cy + r * np.sin(a), cx + r * np.cos(a), r * 0.4, r * 0.3, rng.uniform(0, np.pi)
        )
        canvas[notch] = 0
    return canvas.astype(bool)


def photo_like_scene(
    rng: np.random.Generator,
    height: int = 480,
    width: int = 640,
    n_objects: tuple[int, int] = (2, 5),
) -> DenseScene:
    """Draw a cluttered, shaded, blurred scene; one of its objects is the one to outline.

    Objects cover from 0.5% to 20% of the image (log-uniform); their colour differs from the
    background by anything from a hint to a lot, so some borders are hard to see.
    """
    h, w = height, width
    base = rng.uniform(60, 200, 3)
    img = base + 45 * _smooth_noise(rng, h, w, 4, 3) + 15 * _smooth_noise(rng, h, w, 24, 3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0, 2 * np.pi)
    img += (rng.uniform(10, 50) * ((np.cos(a) * xx / w + np.sin(a) * yy / h) - 0.5))[..., None]
    for _ in range(int(rng.integers(2, 6))):  # clutter: regions of other colours behind it all
        region = _blob(rng, h, w, h * w * rng.uniform(0.02, 0.15))
        img[region] += rng.uniform(-50, 50, 3)
    masks: list[BoolMask] = []
    for _ in range(int(rng.integers(n_objects[0], n_objects[1] + 1))):
        area = h * w * float(np.exp(rng.uniform(np.log(0.005), np.log(0.2))))
        m = _blob(rng, h, w, area)
        if m.sum() < 60:
            continue
        behind = img[m].mean(axis=0)
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction) + 1e-9
        colour = behind + direction * float(np.exp(rng.uniform(np.log(18), np.log(120))))
        shade = _smooth_noise(rng, h, w, 8, 1)[..., 0][m]
        texture = rng.normal(0, rng.uniform(2, 12), (int(m.sum()), 3))
        img[m] = colour + 25 * shade[:, None] + texture
        for k in range(len(masks)):
            masks[k] = masks[k] & ~m
        masks.append(m)
    if not masks:  # every object too small: try again with the same generator
        return photo_like_scene(rng, height, width, n_objects)
    img = cv2.GaussianBlur(img.astype(np.float32), (0, 0), rng.uniform(0.6, 1.5))
    img += rng.normal(0, rng.uniform(1.5, 6), img.shape).astype(np.float32)
    image = np.clip(img, 0, 255).astype(np.uint8)
    visible = [m for m in masks if m.sum() >= 60]
    if not visible:
        return photo_like_scene(rng, height, width, n_objects)
    t = int(rng.integers(len(visible)))
    return DenseScene(image, visible[t], tuple(m for k, m in enumerate(visible) if k != t))


# -- annotators -------------------------------------------------------------------------------
def _outward(poly: np.ndarray) -> np.ndarray:
    """Unit outward normals at a closed polygon's vertices (bisector of the two edges)."""
    prev, nxt = np.roll(poly, 1, axis=0), np.roll(poly, -1, axis=0)
    tangent = nxt - prev
    normal = np.stack([tangent[:, 1], -tangent[:, 0]], axis=1)
    normal /= np.linalg.norm(normal, axis=1, keepdims=True) + 1e-9
    x, y = poly[:, 0], poly[:, 1]
    signed_area = 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))
    return normal if signed_area > 0 else -normal


def _edit(rng: np.random.Generator, m: BoolMask, style: AnnotatorStyle) -> BoolMask:
    """Leave a part out or add one, at a random point of the border."""
    h, w = m.shape
    size = float(np.sqrt(m.sum()))
    edge = m & ~cv2.erode(m.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    ys, xs = np.nonzero(edge)
    if size < 6 or ys.size == 0:
        return m
    out = m.copy()
    if rng.random() < style.p_omit:
        k = int(rng.integers(ys.size))
        r = size * rng.uniform(0.15, 0.4)
        cut = _ellipse(h, w, ys[k], xs[k], r, r * rng.uniform(0.5, 1), rng.uniform(0, np.pi))
        if (out & ~cut).sum() >= 0.5 * out.sum():
            out &= ~cut
    if rng.random() < style.p_add:
        k = int(rng.integers(ys.size))
        r = size * rng.uniform(0.08, 0.25)
        out |= _ellipse(h, w, ys[k], xs[k], r, r * rng.uniform(0.4, 1), rng.uniform(0, np.pi))
    return out


def draw_mask(
    rng: np.random.Generator,
    scene: DenseScene,
    style: AnnotatorStyle,
) -> BoolMask:
    """One annotator's mask of the scene's object: a filled polygon per visible part."""
    h, w = scene.truth.shape
    target = scene.truth
    if scene.others and rng.random() < style.p_wrong:
        target = scene.others[int(rng.integers(len(scene.others)))]
    m = _edit(rng, target, style)
    size = float(np.sqrt(max(1, int(m.sum()))))
    tol = size * rng.uniform(*style.tolerance)
    offset = rng.normal(*style.offset_px)
    contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    biggest = max((cv2.contourArea(c) for c in contours), default=0.0)
    polys = []
    for c in contours:
        if cv2.contourArea(c) < 0.05 * biggest or len(c) < 3:
            continue  # a speck of the object: nobody outlines it
        poly = cv2.approxPolyDP(c, max(0.7, tol), True).reshape(-1, 2).astype(np.float64)
        if len(poly) < 3:
            continue
        shift = offset + rng.normal(0, style.jitter_px, len(poly))
        poly = (
            poly + _outward(poly) * shift[:, None] + rng.normal(0, style.jitter_px / 2, poly.shape)
        )
        polys.append(np.round(poly * 16).astype(np.int32))
    out = np.zeros((h, w), np.uint8)
    if polys:
        cv2.fillPoly(out, polys, 1, cv2.LINE_8, 4)
    return out.astype(bool)


def simulate_annotators(
    rng: np.random.Generator,
    scene: DenseScene,
    k: int = 5,
    mix: Mapping[str, float] | None = None,
    styles: Sequence[str] | None = None,
) -> DenseCrowd:
    """``k`` annotators drawn from ``mix`` (or the given ``styles``) outline the scene's object."""
    if styles is None:
        share = dict(ANNOTATOR_MIX if mix is None else mix)
        names = sorted(share)
        p = np.array([share[n] for n in names], dtype=np.float64)
        styles = [names[i] for i in rng.choice(len(names), size=k, p=p / p.sum())]
    masks = np.stack([draw_mask(rng, scene, ANNOTATOR_STYLES[s]) for s in styles])
    ious = np.array([mask_iou(m, scene.truth) for m in masks])
    return DenseCrowd(masks, tuple(styles), ious)
