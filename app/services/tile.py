"""Tile images: server-side crops of one cell, resized for display, lightly varied per task.

The crop is the whole cell (``grid.cell_view``): a square in a project with square cells, the
part past the image's edge filled with ``PAD`` (a cell the edge cuts shows where the image
ends), else the cell's own aspect (cells follow the image's); the long side is scaled to
``TILE_SIDE`` pixels. The cell is cut once, with a margin, into a cache under ``data/tiles``
(by image hash and cell address). Each task then gets its own rendering of it: the window
shifted by a few percent of the cell, brightness, contrast and saturation changed by a few
percent, a little noise (a seeded window of one fixed noise field), and a random JPEG quality.
A known tile therefore never comes twice as the same bytes or the same pixels, so it cannot be
memorised or matched by a hash, while it shows what the cell shows. The rendering is a function
of the task's secret nonce and the tile's position: the same task's tile is the same on every
fetch.

A window finer than the whole image also has *context* pictures (``render_context``): the whole
image, small, the window's area outlined and the rest dimmed, and for a deeper window the area
around it, so that a volunteer shown nine zoomed patches sees where they are and what is around
them (reCAPTCHA always shows the scene).
"""

from __future__ import annotations

import hashlib
import io
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw

from app.config import Settings
from app.models import Cell, Image
from app.services.image import image_path
from app.storage import atomic_write_bytes
from ml.aggregation import grid

TILE_SIDE = 192
CONTEXT_SIDE = 320  # the context picture's long side, in pixels
CONTEXT_DIM = 0.45  # how bright the image outside the window stays in the context picture
CONTEXT_OUTLINE = (255, 176, 32)  # the window's outline: amber, as the focused tile's ring
BASE_QUALITY = 95  # the cached cut, re-encoded once per task
PAD = (128, 128, 128)  # what a square cell shows past the image's edge: neutral grey


@dataclass(frozen=True)
class Augmentation:
    """How much one task's rendering of a tile may differ from the cell's plain crop."""

    shift: float = 0.03  # of the cell's width/height, each way
    colour: float = 0.06  # brightness, contrast and saturation factors within 1 +- this
    noise: float = 2.0  # Gaussian sigma, in 8-bit levels
    quality: tuple[int, int] = (80, 92)  # JPEG quality, inclusive range


DEFAULT_AUGMENTATION = Augmentation()
PLAIN = Augmentation(shift=0.0, colour=0.0, noise=0.0, quality=(88, 88))


@dataclass(frozen=True)
class _Geometry:
    cell: grid.PixelRect
    outer: grid.PixelRect  # the cell plus the margin the shift may use, inside the frame
    scale: float  # tile pixels per image pixel


def _geometry(image: Image, cell: Cell, side: int, shift: float, square: bool) -> _Geometry:
    address = grid.Cell(cell.level, cell.row, cell.col)
    rect = grid.cell_view(address, image.height, image.width, square=square)
    frame = grid.cell_view(grid.ROOT, image.height, image.width, square=square)
    mx, my = math.ceil(rect.width * shift), math.ceil(rect.height * shift)
    outer = grid.PixelRect(
        max(frame.top, rect.top - my),
        max(frame.left, rect.left - mx),
        min(frame.bottom, rect.bottom + my),
        min(frame.right, rect.right + mx),
    )
    return _Geometry(rect, outer, side / max(rect.width, rect.height, 1))


def source_size(image: Image, cell: Cell, *, square: bool) -> tuple[int, int]:
    """(width, height) in source pixels of the area a cell's tile shows (in the square frame the
    whole square, of which the image's edge may cut a part)."""
    view = grid.cell_view(
        grid.Cell(cell.level, cell.row, cell.col), image.height, image.width, square=square
    )
    return view.width, view.height


def tile_size(image: Image, cell: Cell, *, square: bool, side: int = TILE_SIDE) -> tuple[int, int]:
    """(width, height) of the cell's tile: its aspect (square in the square frame), the long
    side ``side``."""
    if square:  # the frame's integer edges may make a square one source pixel off: still square
        return side, side
    g = _geometry(image, cell, side, 0.0, square)
    return max(1, round(g.cell.width * g.scale)), max(1, round(g.cell.height * g.scale))


def _base_path(
    settings: Settings, image: Image, cell: Cell, side: int, shift: float, square: bool
) -> Path:
    frame = "s" if square else "i"  # the same image may be in projects of both frames
    name = f"{frame}{cell.level}-{cell.row}-{cell.col}-{side}-m{round(shift * 1000)}.jpg"
    return settings.data_dir / "tiles" / image.sha256[:2] / image.sha256 / name


def _cut(img: PILImage.Image, box: grid.PixelRect) -> PILImage.Image:
    """``box`` of the image, the part past its edges filled with ``PAD``."""
    rgb = img.convert("RGB")
    if box.top >= 0 and box.left >= 0 and box.bottom <= rgb.height and box.right <= rgb.width:
        return rgb.crop((box.left, box.top, box.right, box.bottom))
    canvas = PILImage.new("RGB", (max(1, box.width), max(1, box.height)), PAD)
    left, top = max(0, box.left), max(0, box.top)
    right, bottom = min(rgb.width, box.right), min(rgb.height, box.bottom)
    if right > left and bottom > top:
        canvas.paste(rgb.crop((left, top, right, bottom)), (left - box.left, top - box.top))
    return canvas


DECODED_CUTS = 256  # about 200 KB each
_decoded: OrderedDict[Path, PILImage.Image] = OrderedDict()
_decoded_lock = threading.Lock()


def _base(
    settings: Settings,
    image: Image,
    cell: Cell,
    g: _Geometry,
    side: int,
    shift: float,
    square: bool,
) -> PILImage.Image:
    """The cached cut of the cell and its margin at tile scale, written on first use; the
    cuts read last are kept decoded in memory too (a window's nine tiles come together)."""
    path = _base_path(settings, image, cell, side, shift, square)
    with _decoded_lock:
        hit = _decoded.get(path)
        if hit is not None:
            _decoded.move_to_end(path)
            return hit
    if not path.exists():
        o = g.outer
        with PILImage.open(image_path(settings, image)) as img:
            crop = _cut(img, o)
        size = (max(1, round(o.width * g.scale)), max(1, round(o.height * g.scale)))
        buf = io.BytesIO()
        crop.resize(size, PILImage.Resampling.LANCZOS).save(
            buf, format="JPEG", quality=BASE_QUALITY
        )
        atomic_write_bytes(path, buf.getvalue())
    with PILImage.open(path) as cached:
        decoded = cached.convert("RGB")
    with _decoded_lock:
        _decoded[path] = decoded
        while len(_decoded) > DECODED_CUTS:
            _decoded.popitem(last=False)
    return decoded


LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, as Pillow's "L"
NOISE_BANK_SIDE = 512


@lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    """Unit Gaussian noise (side x side x 3, float32) that every process draws the same: a
    tile's noise is a window of it at a seeded offset and orientation. Drawing fresh noise per
    tile took a third of a tile's rendering; averaging renderings defeats either kind alike."""
    rng = np.random.default_rng(0x7E55E7A)
    return rng.standard_normal((NOISE_BANK_SIDE, NOISE_BANK_SIDE, 3), dtype=np.float32)


def _vary(
    pixels: np.ndarray, factors: np.ndarray, noise: float, rng: np.random.Generator
) -> np.ndarray:
    """Brightness, contrast and saturation scaled by ``factors`` (as Pillow's ImageEnhance, in
    that order), plus Gaussian noise of sigma ``noise``, on (H, W, 3) uint8 pixels."""
    brightness, contrast, saturation = (float(f) for f in factors)
    out = pixels.astype(np.float32) * brightness
    grey = out @ LUMA  # (H, W)
    mean = float(grey.mean())
    out = mean + contrast * (out - mean)  # contrast about the mean grey level
    grey = mean + contrast * (grey - mean)
    out = grey[..., None] + saturation * (out - grey[..., None])  # saturation about the grey
    h, w = out.shape[:2]
    if noise > 0 and max(h, w) > NOISE_BANK_SIDE:  # larger than any tile the tasks show
        out += noise * rng.standard_normal(out.shape, dtype=np.float32)
    elif noise > 0:
        bank = _noise_bank()
        flips = int(rng.integers(4))
        if flips & 1:
            bank = bank[::-1]
        if flips & 2:
            bank = bank[:, ::-1]
        top = int(rng.integers(NOISE_BANK_SIDE - h + 1))
        left = int(rng.integers(NOISE_BANK_SIDE - w + 1))
        out += noise * bank[top : top + h, left : left + w]
    np.clip(out, 0, 255, out=out)
    return np.rint(out).astype(np.uint8)


def tile_seed(nonce: str, position: int, key: bytes) -> int:
    """The rendering's seed: private to the task (its nonce), stable across fetches, and keyed
    with a server secret (``Signer.tile_key``): the nonce travels in the task's token, which
    a volunteer can read, and an unkeyed seed let them work out each tile's variation."""
    message = f"{nonce}:{position}".encode()
    return int.from_bytes(hashlib.blake2b(message, digest_size=8, key=key).digest())


class PictureCache:
    """Rendered pictures of tasks (tiles, context pictures) by key, the ``max_items`` used last:
    a picture fetched again (a reload, a browser that lost its cache) is not rendered again.
    Rendering takes the CPU (a tile about 25 ms); a tile's picture never changes."""

    def __init__(self, max_items: int = 1024) -> None:
        self.max_items = max_items
        self._items: OrderedDict[tuple[object, ...], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def peek(self, key: tuple[object, ...]) -> bytes | None:
        """The picture if rendered already (counted as used), else None."""
        with self._lock:
            picture = self._items.get(key)
            if picture is not None:
                self._items.move_to_end(key)
            return picture

    def get(self, key: tuple[object, ...], render: Callable[[], bytes]) -> bytes:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        picture = render()  # outside the lock: two requests may render one picture twice
        with self._lock:
            self._items[key] = picture
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
        return picture


def render_tile(
    settings: Settings,
    image: Image,
    cell: Cell,
    *,
    seed: int,
    square: bool,
    augmentation: Augmentation = DEFAULT_AUGMENTATION,
    side: int = TILE_SIDE,
) -> bytes:
    """The JPEG of one cell as one task shows it (``PLAIN``: the cell exactly, unvaried)."""
    rng = np.random.default_rng(seed)
    a = augmentation
    g = _geometry(image, cell, side, a.shift, square)
    base = _base(settings, image, cell, g, side, a.shift, square)
    # The cell's box in the cut, shifted by up to `shift` of the cell and kept inside the cut.
    sx, sy = base.width / g.outer.width, base.height / g.outer.height
    left, top = (g.cell.left - g.outer.left) * sx, (g.cell.top - g.outer.top) * sy
    width, height = g.cell.width * sx, g.cell.height * sy
    dx = float(np.clip(rng.uniform(-a.shift, a.shift) * width, -left, base.width - left - width))
    dy = float(np.clip(rng.uniform(-a.shift, a.shift) * height, -top, base.height - top - height))
    # Clamped: the scale's rounding (a 273 px cell to 192.00000000000003 px) may put an edge a
    # hair outside the cut, which Pillow refuses.
    x0, y0 = max(0.0, left + dx), max(0.0, top + dy)
    box = (x0, y0, min(float(base.width), x0 + width), min(float(base.height), y0 + height))
    size = tile_size(image, cell, square=square, side=side)
    tile = base.resize(size, PILImage.Resampling.BICUBIC, box=box)
    factors = 1.0 + rng.uniform(-a.colour, a.colour, size=3)  # brightness, contrast, saturation
    if a.colour > 0 or a.noise > 0:
        tile = PILImage.fromarray(_vary(np.asarray(tile), factors, a.noise, rng))
    buf = io.BytesIO()
    tile.save(buf, format="JPEG", quality=int(rng.integers(a.quality[0], a.quality[1] + 1)))
    return buf.getvalue()


def render_context(
    settings: Settings,
    image: Image,
    area: grid.PixelRect,
    *,
    around: bool = False,
    side: int = CONTEXT_SIDE,
) -> bytes:
    """The JPEG of the whole image (or, ``around``, of the area and as much again on every
    side: what the nine squares sit in) with ``area`` (what a grid task's nine squares show:
    ``grid.cells_rect``) outlined and everything else dimmed to ``CONTEXT_DIM``."""
    rect = area
    view = grid.PixelRect(0, 0, image.height, image.width)
    if around:
        view = grid.PixelRect(
            max(0, rect.top - rect.height),
            max(0, rect.left - rect.width),
            min(image.height, rect.bottom + rect.height),
            min(image.width, rect.right + rect.width),
        )
    scale = side / max(view.width, view.height, 1)
    size = (max(1, round(view.width * scale)), max(1, round(view.height * scale)))
    with PILImage.open(image_path(settings, image)) as img:
        crop = img.convert("RGB").crop((view.left, view.top, view.right, view.bottom))
        picture = crop.resize(size, PILImage.Resampling.LANCZOS)
    # The window's box at this scale, at least 3 px wide so that a deep window still shows.
    left, right = (
        math.floor((rect.left - view.left) * scale),
        math.ceil((rect.right - view.left) * scale),
    )
    top, bottom = (
        math.floor((rect.top - view.top) * scale),
        math.ceil((rect.bottom - view.top) * scale),
    )
    right, bottom = max(right, left + 3), max(bottom, top + 3)
    pixels = np.asarray(picture, dtype=np.float32)  # (H, W, 3)
    inside = np.zeros(pixels.shape[:2], dtype=bool)
    inside[top:bottom, left:right] = True
    pixels[~inside] *= CONTEXT_DIM
    out = PILImage.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    box = (
        max(0, left - 2),
        max(0, top - 2),
        min(size[0], right + 2) - 1,
        min(size[1], bottom + 2) - 1,
    )
    ImageDraw.Draw(out).rectangle(box, outline=CONTEXT_OUTLINE, width=2)
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=85)
    return buf.getvalue()
