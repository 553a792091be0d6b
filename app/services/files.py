"""The project's files by kind, in the storage the settings name (the data folder or a bucket).

Rows name files by key (``masks/ab/cd/<sha>.png``, ``models/<project>/<file>.pt``); these are
the few functions that turn a key into bytes or a local file, so that no caller needs to know
where the files live.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from app.config import Settings
from app.storage import FileStore, decode_mask_png, open_storage


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
