"""The project's files by kind, in the storage the settings name (the data folder or a bucket).

Rows name files by key (``masks/ab/cd/<sha>.png``, ``models/<project>/<file>.pt``); these are
the few functions that turn a key into bytes or a local file, so that no caller needs to know
where the files live.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from app.config import Settings
from app.storage import FileStore, S3Storage, decode_mask_png, open_storage

HELD_PREFIX = "held-"


def mask_store(settings: Settings) -> FileStore:
    return FileStore(open_storage(settings), "masks")


def mask_file(settings: Settings, key: str) -> Path:
    """A local file of a stored mask PNG (from object storage: a cached copy)."""
    return open_storage(settings).local_path(key)


def read_mask(settings: Settings, key: str) -> np.ndarray:
    """A stored mask PNG decoded (``decode_mask_png``)."""
    return decode_mask_png(mask_file(settings, key))


def read_file(settings: Settings, key: str) -> bytes:
    return open_storage(settings).read_bytes(key)


def models_key(project_slug: str, file_name: str) -> str:
    return f"models/{project_slug}/{file_name}"


def store_checkpoint(settings: Settings, project_slug: str, path: Path) -> str:
    """Put a checkpoint a job wrote (complete, renamed into place) in the storage; its key, for
    the model row. In the data folder it already is where its key says (nothing moves)."""
    key = models_key(project_slug, path.name)
    open_storage(settings).adopt(key, path)
    return key


def model_file(settings: Settings, path: str) -> Path:
    """A local file of the checkpoint a model row names: its key in the storage, or an absolute
    path (rows written before keys, checkpoints registered from outside the data folder)."""
    storage = open_storage(settings)
    key = storage.key_for(path)
    return Path(path) if key is None else storage.local_path(key)


def remove_files(settings: Settings, keys: list[str]) -> None:
    """Undo a step's new files (used after a rollback): nobody else refers to them."""
    storage = open_storage(settings)
    for key in keys:
        storage.delete(key)


@contextmanager
def held_files(settings: Settings) -> Iterator[None]:
    """For a long job (training, a backup): the local files it is given stay whole until the
    block ends, whatever the object cache evicts meanwhile (hard links in a private scratch
    folder, removed afterwards). With the data folder the files are the stored ones."""
    storage = open_storage(settings)
    if not isinstance(storage, S3Storage):
        yield
        return
    settings.scratch_dir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=HELD_PREFIX, dir=settings.scratch_dir))
    try:
        with storage.holding(folder):
            yield
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def key_of_local(settings: Settings, path: Path) -> str | None:
    """The key of a local file ``local_path`` gave on this or another node (a cached copy, or
    a job's held link); None for a file of the data folder or elsewhere."""
    cache, scratch = settings.storage_cache_dir, settings.scratch_dir
    if path.is_relative_to(cache):
        return path.relative_to(cache).as_posix()
    if path.is_relative_to(scratch):
        parts = path.relative_to(scratch).parts
        if len(parts) > 1 and parts[0].startswith(HELD_PREFIX):
            return "/".join(parts[1:])
    return None
