"""Check that the database and the stored files agree, and clear what a crash left behind.

The files are those of the storage the settings name: the data folder, or the bucket of
``TESSERA_STORAGE_URL`` (where an object is only visible once whole, so only orphans occur).
Files are written before the rows that name them are committed (then renamed into place), so a
crash or ``kill -9`` can leave two kinds of debris, never a half-written file under a real name:
temporary files (``.NAME.*.tmp``, ``.NAME.*.partial``, scratch folders) and whole files that no
committed row names (an import killed before its commit). Both are harmless to readers, and
``--repair`` removes them once older than a grace period, so that a job still running (its
files not yet committed) is never robbed. A row whose file is missing is damage: it is reported
and needs a restore from backup. Derived caches (tiles) are not checked: they are rebuilt.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from app.config import Settings
from app.models import Image, MaskVersion, ModelVersion
from app.services.image import image_key
from app.storage import open_storage, temporary_name

DEFAULT_GRACE_S = 3600.0
STORED_FOLDERS = ("images/", "masks/", "models/")


@dataclass(frozen=True)
class Debris:
    """A file a crash may have left: a key in the storage, or a local scratch folder."""

    name: str
    mtime: float
    scratch: bool = False

    def __str__(self) -> str:
        return self.name


@dataclass
class Checkup:
    """What the check found; ``repaired`` lists what ``repair`` removed."""

    temporary: list[Debris] = field(default_factory=list)
    orphans: list[Debris] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # rows whose file is gone
    database: list[str] = field(default_factory=list)  # the engine's own integrity check
    young: int = 0  # debris newer than the grace period, left for its writer
    repaired: list[Debris] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        """Nothing left that a repair could not fix or has not fixed."""
        debris = {*self.temporary, *self.orphans} - set(self.repaired)
        return not (debris or self.missing or self.database)


def referenced_files(session: Session, settings: Settings) -> dict[str, str]:
    """Every file a row names, with the row that names it: by its key in the storage, or by
    its absolute path for a checkpoint registered from outside it."""
    storage = open_storage(settings)
    named: dict[str, str] = {}
    for image in session.scalars(select(Image)):
        named[image_key(image)] = f"image {image.id} ({image.file_name})"
    for version in session.scalars(select(MaskVersion)):
        for key in (version.hard_path, version.soft_path):
            if key:
                named[key] = f"mask version {version.id}"
    for model in session.scalars(select(ModelVersion)):
        key = storage.key_for(model.path)
        named[key or str(Path(model.path).resolve())] = (
            f"{model.kind} model version {model.version}"
        )
    return named


def is_stored(name: str, present: set[str]) -> bool:
    """Whether a name ``referenced_files`` gave has its file (``present``: the listed keys)."""
    return Path(name).is_file() if Path(name).is_absolute() else name in present


def _database_check(session: Session) -> list[str]:
    if session.get_bind().dialect.name != "sqlite":
        return []  # PostgreSQL checks its pages itself (checksums, WAL replay)
    rows = [r[0] for r in session.execute(text("PRAGMA quick_check"))]
    return [] if rows == ["ok"] else [f"sqlite: {r}" for r in rows]


def check(session: Session, *, settings: Settings) -> Checkup:
    """Compare the stored files with the rows; change nothing."""
    storage = open_storage(settings)
    result = Checkup(database=_database_check(session))
    named = referenced_files(session, settings)
    stored = [f for folder in STORED_FOLDERS for f in storage.files(folder)]
    present = {f.key for f in stored}
    result.missing = [
        f"{row}: {name} is missing" for name, row in named.items() if not is_stored(name, present)
    ]
    for f in stored:
        if temporary_name(f.key):
            result.temporary.append(Debris(f.key, f.mtime))
        elif f.key not in named:
            result.orphans.append(Debris(f.key, f.mtime))
    scratch = settings.scratch_dir
    for path in sorted(scratch.iterdir()) if scratch.is_dir() else []:
        result.temporary.append(Debris(str(path), path.lstat().st_mtime, scratch=True))
    return result


def repair(result: Checkup, *, settings: Settings, grace_s: float = DEFAULT_GRACE_S) -> Checkup:
    """Remove the debris older than ``grace_s`` seconds; the rest is counted as young."""
    storage = open_storage(settings)
    cutoff = time.time() - grace_s
    for debris in [*result.temporary, *result.orphans]:
        # Read again just before removing: an import may have claimed (touched) it meanwhile.
        mtime = debris.mtime if debris.scratch else storage.mtime(debris.name)
        if mtime is not None and mtime > cutoff:
            result.young += 1
            continue
        if debris.scratch:
            path = Path(debris.name)
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(
                missing_ok=True
            )
        else:
            storage.delete(debris.name)  # gone meanwhile (its writer finished) is no error
        result.repaired.append(debris)
    return result
