"""Files under the data folder: validated images in a content-addressed store, and masks.

Every file is written to a temporary name in its final folder, flushed, then renamed, so a
reader or a crash never sees half a file. A file already present under its hash is not written
again: an image is stored once however many times it is imported.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

SUPPORTED_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp"}


class BadImageError(ValueError):
    """An input file is not an image Tessera accepts; the message says why."""


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int
    max_side: int
    min_side: int


@dataclass(frozen=True)
class ImageInfo:
    sha256: str
    format: str  # PIL's name: JPEG, PNG, ...
    width: int
    height: int
    size_bytes: int

    @property
    def extension(self) -> str:
        return SUPPORTED_FORMATS[self.format]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
        raise


def _check_header(data: bytes, limits: ImageLimits) -> tuple[str, int, int]:
    """Read format and size from the header only: nothing is decoded yet."""
    try:
        with PILImage.open(io.BytesIO(data)) as img:
            fmt, (width, height) = str(img.format), img.size
    except PILImage.DecompressionBombError as exc:
        raise BadImageError(f"refused as a decompression bomb ({exc})") from exc
    except Exception as exc:
        raise BadImageError("not an image Pillow can read") from exc
    if fmt not in SUPPORTED_FORMATS:
        names = ", ".join(sorted(SUPPORTED_FORMATS))
        raise BadImageError(f"format {fmt} is not supported (use one of {names})")
    if width * height > limits.max_pixels:
        raise BadImageError(
            f"{width}x{height} has {width * height:,} pixels, over the limit of "
            f"{limits.max_pixels:,} (TESSERA_MAX_IMAGE_PIXELS); refused as a possible "
            "decompression bomb"
        )
    if max(width, height) > limits.max_side or min(width, height) < limits.min_side:
        raise BadImageError(
            f"{width}x{height} is outside the allowed sides {limits.min_side}..{limits.max_side} px"
        )
    return fmt, width, height


def _check_decodes(data: bytes) -> None:
    """verify() checks structure and checksums; load() catches truncated pixel data."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PILImage.DecompressionBombWarning)
            with PILImage.open(io.BytesIO(data)) as img:
                img.verify()
            with PILImage.open(io.BytesIO(data)) as img:
                img.load()
    except Exception as exc:
        raise BadImageError(f"damaged or truncated image data ({exc})") from exc


def inspect_image(data: bytes, limits: ImageLimits) -> ImageInfo:
    """Validate image bytes and describe them, or raise ``BadImageError``."""
    if not data:
        raise BadImageError("the file is empty")
    if len(data) > limits.max_bytes:
        raise BadImageError(
            f"{len(data):,} bytes is over the limit of {limits.max_bytes:,} "
            "(TESSERA_MAX_IMAGE_BYTES)"
        )
    fmt, width, height = _check_header(data, limits)
    _check_decodes(data)
    return ImageInfo(
        sha256=hashlib.sha256(data).hexdigest(),
        format=fmt,
        width=width,
        height=height,
        size_bytes=len(data),
    )


class FileStore:
    """A folder of files named by their content hash, fanned out by the first hex digits."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def relative_path(self, sha256: str, extension: str) -> Path:
        return Path(sha256[:2]) / sha256[2:4] / f"{sha256}.{extension}"

    def path(self, sha256: str, extension: str) -> Path:
        return self.root / self.relative_path(sha256, extension)

    def put(self, data: bytes, extension: str, sha256: str | None = None) -> tuple[Path, bool]:
        """Store ``data`` under its hash. Returns the path and whether it was new."""
        path = self.path(sha256 or hashlib.sha256(data).hexdigest(), extension)
        if path.exists():
            # Freshly in use again: `tessera doctor --repair` spares files younger than its
            # grace period, and this one may be an orphan that a new import is about to claim.
            os.utime(path)
            return path, False
        atomic_write_bytes(path, data)
        return path, True


def encode_mask_png(mask: np.ndarray) -> bytes:
    """Encode a mask as PNG: bool -> 1-bit, float in [0, 1] -> 8-bit probability.

    Args:
        mask: (H, W) bool or float array.
    """
    if mask.dtype == bool:
        img = PILImage.fromarray(mask.astype(np.uint8) * 255).convert("1")
    else:
        img = PILImage.fromarray(np.clip(np.rint(mask * 255), 0, 255).astype(np.uint8), mode="L")
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def decode_mask_png(path: Path) -> np.ndarray:
    """Read a mask PNG back: 1-bit -> (H, W) bool, 8-bit -> (H, W) float32 in [0, 1]."""
    with PILImage.open(path) as img:
        if img.mode == "1":
            return np.asarray(img, dtype=bool)
        return np.asarray(img.convert("L"), dtype=np.float32) / 255.0
