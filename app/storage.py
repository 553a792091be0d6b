"""Tessera's files: validated images in a content-addressed store, masks and checkpoints.

They live in a ``Storage``: the data folder (the default) or S3-compatible object storage
(``TESSERA_STORAGE_URL=s3://bucket/prefix``), addressed by keys such as
``images/ab/cd/<sha>.jpg``. Every file is written to a temporary name and renamed (or uploaded
whole), so a reader or a crash never sees half a file. A file already present under its hash is
not written again: an image is stored once however many times it is imported.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
import threading
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import numpy as np
from PIL import Image as PILImage

from app.config import Settings

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


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Create ``path`` whole or not at all: ``write`` fills a temporary file in its folder,
    which is flushed to disk and renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    atomic_write(path, lambda fh: fh.write(data))


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
    # A progressive JPEG is decoded scan by scan, each over the whole image: a 63 kB file that
    # repeats its last scan 2,000 times took 22 s per decode (every tile cut from it). Encoders
    # write about ten; 0xFFDA starts one (entropy-coded data never holds 0xFF unstuffed).
    if fmt == "JPEG" and (scans := data.count(b"\xff\xda")) > MAX_JPEG_SCANS:
        raise BadImageError(
            f"a JPEG of {scans:,} scans, over the limit of {MAX_JPEG_SCANS}; refused as a "
            "possible decoding bomb"
        )
    return fmt, width, height


MAX_JPEG_SCANS = 100


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


@dataclass(frozen=True)
class StoredFile:
    key: str  # its path under the storage root, with "/" (images/ab/cd/<sha>.jpg)
    size: int
    mtime: float  # seconds since the epoch: last written or put in use again


def temporary_name(key: str) -> bool:
    """A name only writers use on the way to a real one (``.NAME.*.tmp`` / ``.partial``)."""
    name = key.rsplit("/", 1)[-1]
    return name.startswith(".") and name.endswith((".tmp", ".partial"))


class Storage(ABC):
    """Where Tessera's files live, named by keys: POSIX paths under one root.

    Every write keeps one promise on every backend: a key names a whole file or nothing (a
    local file is written to a temporary name and renamed; an object is only visible once its
    upload completes). Images and masks are content-addressed and never change under a key;
    checkpoints get a new key per training.
    """

    url: str  # what the settings said, for messages

    @abstractmethod
    def local_path(self, key: str) -> Path:
        """A local file holding the key's bytes (the file itself, or a cached copy)."""

    @abstractmethod
    def read_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``, visible only once whole."""

    @abstractmethod
    def upload(self, key: str, path: Path) -> None:
        """Store the local file ``path`` under ``key`` (a no-op when it already is that file)."""

    def adopt(self, key: str, path: Path) -> None:
        """Store the local file ``path`` under ``key``; the file may move (it becomes the local
        copy, so that reading the key back costs no download)."""
        self.upload(key, path)

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def touch(self, key: str) -> None:
        """Mark the file as in use now (``doctor --repair`` spares young files)."""

    @abstractmethod
    def mtime(self, key: str) -> float | None:
        """When the key's file was last written or touched; None when there is none."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the key's file; a missing one is not an error."""

    @abstractmethod
    def files(self, prefix: str) -> Iterator[StoredFile]:
        """Every file whose key starts with ``prefix`` (a folder: ``"images/"``)."""

    def key_for(self, path: str) -> str | None:
        """The key of a path a row holds (a key already, or an absolute file under the root)."""
        return None if Path(path).is_absolute() else path


class LocalStorage(Storage):
    """Files in a folder (the data folder): the embedded default."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = str(root)

    def file(self, key: str) -> Path:
        """Where the key's file is or would be."""
        return self.root.joinpath(*PurePosixPath(key).parts)

    def local_path(self, key: str) -> Path:
        path = self.file(key)
        if not path.is_file():
            raise FileNotFoundError(f"{self.url}: no file {key}")
        return path

    def read_bytes(self, key: str) -> bytes:
        return self.file(key).read_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        atomic_write_bytes(self.file(key), data)

    def upload(self, key: str, path: Path) -> None:
        target = self.file(key)
        if target.resolve() == path.resolve():
            return
        with path.open("rb") as source:
            atomic_write(target, lambda out: shutil.copyfileobj(source, out, 1024 * 1024))

    def exists(self, key: str) -> bool:
        return self.file(key).is_file()

    def touch(self, key: str) -> None:
        os.utime(self.file(key))

    def mtime(self, key: str) -> float | None:
        try:
            return self.file(key).lstat().st_mtime
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> None:
        self.file(key).unlink(missing_ok=True)

    def files(self, prefix: str) -> Iterator[StoredFile]:
        folder = self.file(prefix.rstrip("/"))
        if not folder.is_dir():
            return
        for path in folder.rglob("*"):
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue  # renamed or removed meanwhile
            if path.is_file():
                key = path.relative_to(self.root).as_posix()
                yield StoredFile(key=key, size=st.st_size, mtime=st.st_mtime)

    def key_for(self, path: str) -> str | None:
        if not Path(path).is_absolute():
            return path
        try:
            return Path(path).resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return None  # a checkpoint registered from outside the data folder


class S3Storage(Storage):
    """Objects in an S3-compatible bucket under a prefix, with a local cache for reads.

    An object is visible only once its upload completes (S3's PUT is atomic), so a row never
    names a partial object. Reads go through ``local_path``: keys never change content, so a
    cached copy is never stale; the cache keeps the most recently used files up to its size.
    """

    def __init__(self, url: str, cache_dir: Path, cache_bytes: int, client: Any = None) -> None:
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        self.url, self.bucket = url, bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.cache = LocalCache(cache_dir, cache_bytes)
        if client is None:
            import boto3  # only object-storage deployments need it

            client = boto3.client("s3")
        self.client = client

    def _name(self, key: str) -> str:
        return self.prefix + key

    def local_path(self, key: str) -> Path:
        path = self.cache.path(key)
        if not self.cache.hit(path):
            try:
                atomic_write(
                    path, lambda fh: self.client.download_fileobj(self.bucket, self._name(key), fh)
                )
            except Exception as exc:
                if _missing(exc):
                    raise FileNotFoundError(f"{self.url}: no object {key}") from exc
                raise
            self.cache.added(path)
        held = _holding.get()
        return path if held is None else _hold(path, held / key)

    @contextmanager
    def holding(self, folder: Path) -> Iterator[None]:
        """While the block runs (in this context), ``local_path`` gives hard links to the cached
        copies in ``folder``: a long job's files stay whole whatever the cache evicts, in this
        process or another sharing the folder. The caller removes ``folder`` afterwards."""
        token = _holding.set(folder)
        try:
            yield
        finally:
            _holding.reset(token)

    def read_bytes(self, key: str) -> bytes:
        return self.local_path(key).read_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._name(key), Body=data)

    def upload(self, key: str, path: Path) -> None:
        self.client.upload_file(str(path), self.bucket, self._name(key))

    def adopt(self, key: str, path: Path) -> None:
        self.upload(key, path)
        copy = self.cache.path(key)
        copy.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, copy)
        self.cache.added(copy)

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._name(key))
        except Exception as exc:
            if _missing(exc):
                return False
            raise
        return True

    def touch(self, key: str) -> None:
        # Copying an object onto itself with new metadata renews its LastModified.
        name = self._name(key)
        try:
            self.client.copy_object(
                Bucket=self.bucket,
                Key=name,
                CopySource={"Bucket": self.bucket, "Key": name},
                Metadata={"touched": str(time.time())},
                MetadataDirective="REPLACE",
            )
        except Exception as exc:
            if _missing(exc):
                raise FileNotFoundError(f"{self.url}: no object {key}") from exc
            raise

    def mtime(self, key: str) -> float | None:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._name(key))
        except Exception as exc:
            if _missing(exc):
                return None
            raise
        return float(head["LastModified"].timestamp())

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._name(key))
        self.cache.path(key).unlink(missing_ok=True)

    def files(self, prefix: str) -> Iterator[StoredFile]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._name(prefix)
        )
        for page in pages:
            for obj in page.get("Contents", []):
                yield StoredFile(
                    key=obj["Key"][len(self.prefix) :],
                    size=int(obj["Size"]),
                    mtime=obj["LastModified"].timestamp(),
                )


_holding: ContextVar[Path | None] = ContextVar("tessera_holding", default=None)


def _hold(path: Path, link: Path) -> Path:
    """``link`` made a hard link of ``path`` (a copy where links cannot be made)."""
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, link)
        except FileExistsError:
            pass
        except OSError:
            shutil.copyfile(path, link)
    return link


def _missing(exc: BaseException) -> bool:
    """An S3 client error that means "no such key" (botocore's ClientError, by its code)."""
    response = getattr(exc, "response", None)
    code = str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""
    return code in {"404", "NoSuchKey", "NotFound"}


class LocalCache:
    """Local copies of objects, the least recently used removed past ``max_bytes``."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root, self.max_bytes = root, max_bytes
        self._lock = threading.Lock()
        self._size: int | None = None  # measured on first use

    def path(self, key: str) -> Path:
        return self.root.joinpath(*PurePosixPath(key).parts)

    def hit(self, path: Path) -> bool:
        try:
            os.utime(path)  # recently used: the last to go
        except FileNotFoundError:
            return False
        return True

    def added(self, path: Path) -> None:
        with self._lock:
            if self._size is None:
                self._size = sum(size for _, size, _ in self._sizes())
            else:
                self._size += path.stat().st_size
            if self._size > self.max_bytes:
                self._evict(keep=path)

    def _sizes(self) -> list[tuple[float, int, Path]]:
        """(last used, bytes, path) of every cached file (one another process removes meanwhile
        is left out)."""
        out = []
        for p in self.root.rglob("*"):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            if not p.name.startswith(".") and p.is_file():
                out.append((st.st_mtime, st.st_size, p))
        return out

    def _evict(self, keep: Path) -> None:
        """Oldest first, never ``keep`` (the file just fetched: its reader is about to open it)."""
        entries = sorted(e for e in self._sizes() if e[2] != keep)
        total = keep.stat().st_size + sum(size for _, size, _ in entries)
        # Down to 90% of the limit, so that one more download does not evict again at once.
        while entries and total > 0.9 * self.max_bytes:
            _, size, p = entries.pop(0)
            p.unlink(missing_ok=True)
            total -= size
        self._size = total


_opened: dict[tuple[str, str], Storage] = {}
_opened_lock = threading.Lock()


def open_storage(settings: Settings) -> Storage:
    """The storage the settings name, made once per process (an S3 client is costly)."""
    url = settings.storage_url
    ident = (url, str(settings.data_dir))  # every file access asks: no syscall, no lock
    storage = _opened.get(ident)
    if storage is not None:
        return storage
    with _opened_lock:
        storage = _opened.get(ident)
        if storage is None:
            if url:
                storage = S3Storage(url, settings.storage_cache_dir, settings.storage_cache_bytes)
            else:
                storage = LocalStorage(settings.data_dir)
            _opened[ident] = storage
    return storage


class FileStore:
    """Files named by their content hash under one folder of a storage, fanned out by the first
    hex digits (``images/ab/cd/<sha>.jpg``)."""

    def __init__(self, storage: Storage, folder: str) -> None:
        self.storage, self.folder = storage, folder

    @staticmethod
    def key_in(folder: str, sha256: str, extension: str) -> str:
        return f"{folder}/{sha256[:2]}/{sha256[2:4]}/{sha256}.{extension}"

    def key(self, sha256: str, extension: str) -> str:
        return self.key_in(self.folder, sha256, extension)

    def path(self, sha256: str, extension: str) -> Path:
        """A local file with the content (downloaded to the cache first from object storage)."""
        return self.storage.local_path(self.key(sha256, extension))

    def put(self, data: bytes, extension: str, sha256: str | None = None) -> tuple[str, bool]:
        """Store ``data`` under its hash. Returns the key and whether it was new."""
        key = self.key(sha256 or hashlib.sha256(data).hexdigest(), extension)
        if self.storage.exists(key):
            # Freshly in use again: `tessera doctor --repair` spares files younger than its
            # grace period, and this one may be an orphan that a new import is about to claim.
            try:
                self.storage.touch(key)
                return key, False
            except FileNotFoundError:
                pass  # removed meanwhile (a repair): written again below
        self.storage.write_bytes(key, data)
        return key, True


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
    # zlib's default level: ``optimize=True`` tried every filter and took 10x as long for 6%
    # smaller files (383 against 39 ms for a model's smooth 1024x768 soft mask).
    img.save(buf, format="PNG")
    return buf.getvalue()


def decode_mask_png(path: Path) -> np.ndarray:
    """Read a mask PNG back: 1-bit -> (H, W) bool, 8-bit -> (H, W) float32 in [0, 1]."""
    with PILImage.open(path) as img:
        if img.mode == "1":
            return np.asarray(img, dtype=bool)
        return np.asarray(img.convert("L"), dtype=np.float32) / 255.0
