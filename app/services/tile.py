"""Tile images: server-side crops of one cell, resized for display, cached on disk.

The crop keeps the cell's aspect ratio (cells follow the image's); the long side is scaled to
``TILE_SIDE`` pixels. Tiles are cached under ``data/tiles`` by image hash and cell address, so
the same tile is cut once whatever task shows it.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image as PILImage

from app.config import Settings
from app.models import Cell, Image
from app.services.image import image_path
from app.storage import atomic_write_bytes
from ml.aggregation import grid

TILE_SIDE = 192
JPEG_QUALITY = 88


def tile_path(settings: Settings, image: Image, cell: Cell, side: int = TILE_SIDE) -> Path:
    name = f"{cell.level}-{cell.row}-{cell.col}-{side}.jpg"
    return settings.data_dir / "tiles" / image.sha256[:2] / image.sha256 / name


def render_tile(settings: Settings, image: Image, cell: Cell, side: int = TILE_SIDE) -> Path:
    """The cached JPEG of one cell, cut and written (atomically) on first use."""
    path = tile_path(settings, image, cell, side)
    if path.exists():
        return path
    rect = grid.cell_rect(grid.Cell(cell.level, cell.row, cell.col), image.height, image.width)
    with PILImage.open(image_path(settings, image)) as img:
        crop = img.convert("RGB").crop((rect.left, rect.top, rect.right, rect.bottom))
    scale = side / max(crop.width, crop.height, 1)
    size = (max(1, round(crop.width * scale)), max(1, round(crop.height * scale)))
    crop = crop.resize(size, PILImage.Resampling.LANCZOS)
    buf = io.BytesIO()
    crop.save(buf, format="JPEG", quality=JPEG_QUALITY)
    atomic_write_bytes(path, buf.getvalue())
    return path
