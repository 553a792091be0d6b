"""Exact boolean masks of the demo shapes on the pixel grid.

A pixel (row y, column x) belongs to a shape when its centre ``(x + 0.5, y + 0.5)`` lies inside
the shape. There is no antialiasing: the generator paints pixels through these masks, so the
image and the ground-truth masks agree pixel for pixel. Polygons use the even-odd crossing rule,
which also handles the non-convex star.

A shape is only evaluated on the pixels of its bounding window (the square around its
circumscribed circle, clipped to the image): a small object in a large image costs a few hundred
pixels of arithmetic, not a million. Pixel centres are exact in float64 either way, so the window
changes no pixel of any mask.
"""

from __future__ import annotations

import math
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


Window = tuple[slice, slice]  # rows, columns of an image


def pixel_centres(
    height: int, width: int, dtype: type[np.floating] = np.float64
) -> tuple[np.ndarray, np.ndarray]:
    """Return the x and y coordinates of every pixel centre.

    Args:
        height: image height in pixels.
        width: image width in pixels.
        dtype: float type of the output (float32 is enough for smooth backgrounds).

    Shape:
        both outputs (H, W), read-only broadcast views.

    Returns:
        (xs, ys) with ``xs[y, x] == x + 0.5`` and ``ys[y, x] == y + 0.5``.
    """
    return window_centres((slice(0, height), slice(0, width)), dtype)


def window_centres(
    window: Window, dtype: type[np.floating] = np.float64
) -> tuple[np.ndarray, np.ndarray]:
    """Return the x and y coordinates of the pixel centres of a window, in image coordinates.

    Shape:
        both outputs (h, w), the window's size: read-only broadcast views.
    """
    rows, cols = window
    ys = np.arange(rows.start, rows.stop, dtype=dtype) + dtype(0.5)  # (h,)
    xs = np.arange(cols.start, cols.stop, dtype=dtype) + dtype(0.5)  # (w,)
    size = (ys.size, xs.size)
    return np.broadcast_to(xs[None, :], size), np.broadcast_to(ys[:, None], size)


def bounding_window(height: int, width: int, place: Placement) -> Window:
    """Return the rows and columns that the circumscribed circle of ``place`` can touch."""
    r = place.radius
    rows = slice(max(0, math.floor(place.cy - r)), min(height, math.ceil(place.cy + r) + 1))
    cols = slice(max(0, math.floor(place.cx - r)), min(width, math.ceil(place.cx + r) + 1))
    return rows, cols


def _inside_disc(xs: np.ndarray, ys: np.ndarray, place: Placement) -> np.ndarray:
    return (xs - place.cx) ** 2 + (ys - place.cy) ** 2 <= place.radius**2


def inside_polygon(xs: np.ndarray, ys: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Return which points lie inside a closed polygon (even-odd rule).

    Args:
        xs: point abscissas.
        ys: point ordinates.
        vertices: polygon corners in order, as (x, y) pixel coordinates.

    Shape:
        xs, ys and output (h, w); vertices (N, 2) float.
    """
    inside = np.zeros(xs.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(vertices, np.roll(vertices, -1, axis=0), strict=True):
        if y0 == y1:  # a horizontal edge never crosses a horizontal ray
            continue
        crosses = (y0 > ys) != (y1 > ys)  # (h, w)
        x_at = x0 + (ys - y0) * (x1 - x0) / (y1 - y0)  # (h, w) edge abscissa at each row
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


def _square(place: Placement) -> np.ndarray:
    return regular_vertices(place, 4)


def _triangle(place: Placement) -> np.ndarray:
    return regular_vertices(place, 3)


# Polygon shapes by their corners; the circle is the one shape with a test of its own.
POLYGONS: dict[str, Callable[[Placement], np.ndarray]] = {
    "square": _square,
    "triangle": _triangle,
    "star": star_vertices,
}
SHAPES = ("circle", *POLYGONS)


def _check_shape(shape: str) -> None:
    if shape not in SHAPES:
        raise KeyError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")


def unit_area(shape: str) -> float:
    """Return the area of ``shape`` with a circumscribed radius of 1 (pi for the circle)."""
    _check_shape(shape)
    if shape == "circle":
        return math.pi
    x, y = POLYGONS[shape](Placement(0.0, 0.0, 1.0, 0.0)).T  # (N,) each
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)  # shoelace


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
    _check_shape(shape)
    window = bounding_window(height, width, place)
    xs, ys = window_centres(window)  # (h, w) each
    mask = np.zeros((height, width), dtype=bool)
    if shape == "circle":
        mask[window] = _inside_disc(xs, ys, place)
    else:
        mask[window] = inside_polygon(xs, ys, POLYGONS[shape](place))
    return mask
