"""Colours, object textures and backgrounds of the demo scenes.

Colour tags stay well defined because the two palettes never meet: objects use four saturated
colours (chroma, max(rgb) - min(rgb), of at least about 80 even in their dark shade), while every
background colour is a muted near-grey (chroma below about 30, plus a little channel noise).
A textured object is painted in its colour and a darker shade of it (``SHADE_FACTOR``); a plain
object only in its colour. Objects get a faint luminance noise that changes no hue.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ml.demo.geometry import Placement, Window, bounding_window, pixel_centres, window_centres

OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 38, 38),
    "green": (34, 168, 64),
    "blue": (40, 84, 224),
    "yellow": (242, 200, 24),
}
SHADE_FACTOR = 0.5  # the pattern ink is the object colour times this
OBJECT_NOISE = 3.0  # std of the luminance noise on objects, in grey levels
BACKGROUND_TINT = 14.0  # max per-channel offset of a background colour from grey
BACKGROUND_CHANNEL_NOISE = 1.5  # std of the per-channel (chroma) noise on the background


def shade(colour: str) -> np.ndarray:
    """Return the dark ink of an object colour.

    Shape:
        output (3,) float64.
    """
    return np.asarray(OBJECT_COLOURS[colour], dtype=np.float64) * SHADE_FACTOR


def _local_coords(window: Window, place: Placement, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Return a window's pixel centres in a frame centred on the object, rotated by ``angle``."""
    xs, ys = window_centres(window)
    dx, dy = xs - place.cx, ys - place.cy  # (h, w)
    c, s = np.cos(angle), np.sin(angle)
    return c * dx + s * dy, -s * dx + c * dy


def _stripes(u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
    return np.floor(u / (period / 2)) % 2 == 1


def _dots(u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
    du = np.mod(u, period) - period / 2
    dv = np.mod(v, period) - period / 2
    return du**2 + dv**2 <= (0.32 * period) ** 2


def _checks(u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
    return (np.floor(u / (period / 2)) + np.floor(v / (period / 2))) % 2 == 1


TEXTURES: dict[str, Callable[[np.ndarray, np.ndarray, float], np.ndarray]] = {
    "striped": _stripes,
    "dotted": _dots,
    "checkered": _checks,
}


def texture_ink(
    texture: str, height: int, width: int, place: Placement, period: float, angle: float
) -> np.ndarray:
    """Return where a texture puts its dark ink, on the object's bounding window.

    Only the pixels that the object can cover (``geometry.bounding_window``) get ink; the rest of
    the image stays False, which is all an object mask ever reads of it.

    Args:
        texture: one of ``TEXTURES``.
        height: image height in pixels.
        width: image width in pixels.
        place: the object's placement; the pattern is anchored at its centre.
        period: pattern period in pixels (stripe pair, dot spacing, two checks).
        angle: pattern rotation in radians.

    Shape:
        output (H, W) bool.
    """
    window = bounding_window(height, width, place)
    u, v = _local_coords(window, place, angle)  # (h, w) each
    ink = np.zeros((height, width), dtype=bool)
    ink[window] = TEXTURES[texture](u, v, period)
    return ink


def paint_object(
    rng: np.random.Generator,
    canvas: np.ndarray,
    mask: np.ndarray,
    colour: str,
    ink: np.ndarray | None,
) -> None:
    """Paint one object onto ``canvas`` in place, touching exactly the pixels of ``mask``.

    Args:
        rng: random source of the luminance noise.
        canvas: the float RGB image being composed.
        mask: the object's full shape.
        colour: one of ``OBJECT_COLOURS``.
        ink: where the texture's dark ink goes, or None for a plain object.

    Shape:
        canvas (H, W, 3) float; mask and ink (H, W) bool.
    """
    base = np.asarray(OBJECT_COLOURS[colour], dtype=np.float64)  # (3,)
    pixels = np.broadcast_to(base, (int(mask.sum()), 3)).copy()  # (K, 3)
    if ink is not None:
        pixels[ink[mask]] = shade(colour)
    noise = rng.normal(0.0, OBJECT_NOISE, size=(pixels.shape[0], 1))  # (K, 1) luminance only
    canvas[mask] = pixels + noise


def muted_colour(rng: np.random.Generator) -> np.ndarray:
    """Return a random near-grey background colour.

    Shape:
        output (3,) float32.
    """
    level = rng.uniform(95.0, 210.0)
    return (level + rng.uniform(-BACKGROUND_TINT, BACKGROUND_TINT, size=3)).astype(np.float32)


def _centres(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    return pixel_centres(height, width, np.float32)  # backgrounds need no float64


def _gradient(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Return a linear gradient between two muted colours at a random angle; (H, W, 3)."""
    xs, ys = _centres(height, width)
    angle = rng.uniform(0.0, 2 * np.pi)
    proj = np.float32(np.cos(angle)) * xs + np.float32(np.sin(angle)) * ys  # (H, W)
    t = (proj - proj.min()) / max(float(np.ptp(proj)), 1e-6)
    start, end = muted_colour(rng), muted_colour(rng)
    return start + t[..., None] * (end - start)  # (H, W, 3) float32


def _blend(canvas: np.ndarray, colour: np.ndarray, weight: np.ndarray) -> None:
    """Blend ``colour`` into ``canvas`` in place with a per-pixel weight in [0, 1]; (H, W)."""
    canvas += weight[..., None] * (colour - canvas)


def _add_stripes(rng: np.random.Generator, canvas: np.ndarray) -> None:
    """Overlay broad, soft stripes of a muted colour."""
    height, width, _ = canvas.shape
    xs, ys = _centres(height, width)
    angle = rng.uniform(0.0, np.pi)
    period = rng.uniform(18.0, 70.0)
    phase = np.float32(np.cos(angle)) * xs + np.float32(np.sin(angle)) * ys  # (H, W)
    wave = 0.5 + 0.5 * np.sin(phase * np.float32(2 * np.pi / period))
    _blend(canvas, muted_colour(rng), np.float32(rng.uniform(0.3, 0.7)) * wave)


def _add_blobs(rng: np.random.Generator, canvas: np.ndarray) -> None:
    """Overlay a few soft-edged elliptic blobs of muted colours."""
    height, width, _ = canvas.shape
    xs, ys = _centres(height, width)
    short = min(height, width)
    for _ in range(int(rng.integers(2, 7))):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        rx, ry = rng.uniform(0.1, 0.4, size=2) * short
        dist = ((xs - np.float32(cx)) / np.float32(rx)) ** 2
        dist += ((ys - np.float32(cy)) / np.float32(ry)) ** 2  # (H, W)
        _blend(canvas, muted_colour(rng), np.float32(rng.uniform(0.4, 0.8)) * np.exp(-dist))


def smooth_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """Return standard normal noise on a coarse lattice, bilinearly interpolated.

    Args:
        rng: random source.
        height: image height in pixels.
        width: image width in pixels.
        cell: lattice spacing in pixels.

    Shape:
        output (H, W) float32.
    """
    lattice = rng.normal(size=(height // cell + 2, width // cell + 2)).astype(np.float32)
    y = (np.arange(height, dtype=np.float32) + 0.5) / cell
    x = (np.arange(width, dtype=np.float32) + 0.5) / cell
    y0, x0 = y.astype(np.int64), x.astype(np.int64)
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]
    rows = lattice[y0] * (1 - fy) + lattice[y0 + 1] * fy  # (H, GW)
    return rows[:, x0] * (1 - fx) + rows[:, x0 + 1] * fx  # (H, W)


def _add_noise(rng: np.random.Generator, canvas: np.ndarray) -> None:
    """Add smooth and fine luminance noise and a faint channel noise."""
    height, width, _ = canvas.shape
    coarse = smooth_noise(rng, height, width, int(rng.integers(12, 48)))
    fine = rng.standard_normal(size=(height, width), dtype=np.float32)
    luminance = np.float32(rng.uniform(4.0, 9.0)) * coarse
    luminance += np.float32(rng.uniform(3.0, 10.0)) * fine
    canvas += luminance[..., None]
    canvas += np.float32(BACKGROUND_CHANNEL_NOISE) * rng.standard_normal(
        size=canvas.shape, dtype=np.float32
    )


def background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Return a textured, noisy background in muted colours.

    A gradient, then stripes, blobs or both, then noise. No background colour is close to an
    object colour, so a colour tag never matches the background.

    Args:
        rng: random source.
        height: image height in pixels.
        width: image width in pixels.

    Shape:
        output (H, W, 3) float32, roughly in [50, 255].
    """
    canvas = _gradient(rng, height, width)
    layers = int(rng.integers(1, 4))  # 1: stripes, 2: blobs, 3: both
    if layers & 1:
        _add_stripes(rng, canvas)
    if layers & 2:
        _add_blobs(rng, canvas)
    _add_noise(rng, canvas)
    return canvas


def to_uint8(canvas: np.ndarray) -> np.ndarray:
    """Round and clip a float image to 8 bits.

    Shape:
        (H, W, 3) float -> (H, W, 3) uint8.
    """
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
