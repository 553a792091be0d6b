"""Exact boolean masks of the demo shapes on the pixel grid.

A pixel (row y, column x) belongs to a shape when its centre ``(x + 0.5, y + 0.5)`` lies inside
the shape. There is no antialiasing: the generator paints pixels through these masks, so the
image and the ground-truth masks agree pixel for pixel. Polygons use the even-odd crossing rule,
which also handles the non-convex star.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

STAR_INNER_RATIO = 0.45  # inner / outer radius of the five-pointed star


@dataclass(frozen=True)
class Placement:
    """Where a shape goes: centre in pixels (x, y), circumscribed radius, rotation in radians."""

    cx: float
    cy: float
    radius: float
    angle: float


def pixel_centres(
    height: int, width: int, dtype: type[np.floating] = np.float64
) -> tuple[np.ndarray, np.ndarray]:
    """Return the x and y coordinates of every pixel centre.

    Args:
        height: image height in pixels.
        width: image width in pixels.
        dtype: float type of the output (float32 is enough for smooth backgrounds).

    Shape:
        both outputs (H, W).

    Returns:
        (xs, ys) with ``xs[y, x] == x + 0.5`` and ``ys[y, x] == y + 0.5``.
    """
    ys, xs = np.mgrid[0:height, 0:width].astype(dtype) + dtype(0.5)  # each (H, W)
    return xs, ys


def disc_mask(height: int, width: int, place: Placement) -> np.ndarray:
    """Return the pixels whose centre lies in the disc of ``place``.

    Shape:
        output (H, W) bool.
    """
    xs, ys = pixel_centres(height, width)
    return (xs - place.cx) ** 2 + (ys - place.cy) ** 2 <= place.radius**2


def polygon_mask(height: int, width: int, vertices: np.ndarray) -> np.ndarray:
    """Return the pixels whose centre lies inside a closed polygon (even-odd rule).

    Args:
        height: image height in pixels.
        width: image width in pixels.
        vertices: polygon corners in order, as (x, y) pixel coordinates.

    Shape:
        vertices (N, 2) float; output (H, W) bool.

    Returns:
        The inside of the polygon.
    """
    xs, ys = pixel_centres(height, width)
    inside = np.zeros((height, width), dtype=bool)
    for (x0, y0), (x1, y1) in zip(vertices, np.roll(vertices, -1, axis=0), strict=True):
        if y0 == y1:  # a horizontal edge never crosses a horizontal ray
            continue
        crosses = (y0 > ys) != (y1 > ys)  # (H, W)
        x_at = x0 + (ys - y0) * (x1 - x0) / (y1 - y0)  # (H, W) edge abscissa at each row
        inside ^= crosses & (xs < x_at)
    return inside


def regular_vertices(place: Placement, n_corners: int) -> np.ndarray:
    """Return the corners of a regular polygon inscribed in the circle of ``place``.

    Shape:
        output (n_corners, 2) float64, (x, y) per corner.
    """
    theta = place.angle + 2 * np.pi * np.arange(n_corners) / n_corners  # (N,)
    xs = place.cx + place.radius * np.cos(theta)
    ys = place.cy + place.radius * np.sin(theta)
    return np.stack([xs, ys], axis=1)


def star_vertices(place: Placement, points: int = 5) -> np.ndarray:
    """Return the outline of a star: outer tips alternating with inner corners.

    Shape:
        output (2 * points, 2) float64, (x, y) per corner.
    """
    theta = place.angle + np.pi * np.arange(2 * points) / points  # (2P,)
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, STAR_INNER_RATIO) * place.radius
    return np.stack([place.cx + radii * np.cos(theta), place.cy + radii * np.sin(theta)], axis=1)


def _square(height: int, width: int, place: Placement) -> np.ndarray:
    return polygon_mask(height, width, regular_vertices(place, 4))


def _triangle(height: int, width: int, place: Placement) -> np.ndarray:
    return polygon_mask(height, width, regular_vertices(place, 3))


def _star(height: int, width: int, place: Placement) -> np.ndarray:
    return polygon_mask(height, width, star_vertices(place))


SHAPES: dict[str, Callable[[int, int, Placement], np.ndarray]] = {
    "circle": disc_mask,
    "square": _square,
    "triangle": _triangle,
    "star": _star,
}


def shape_mask(shape: str, height: int, width: int, place: Placement) -> np.ndarray:
    """Return the exact mask of one shape, clipped to the image.

    Args:
        shape: one of ``SHAPES``.
        height: image height in pixels.
        width: image width in pixels.
        place: centre, circumscribed radius and rotation.

    Shape:
        output (H, W) bool.
    """
    try:
        draw = SHAPES[shape]
    except KeyError:
        raise KeyError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}") from None
    return draw(height, width, place)
