"""Check that the database and the data folder agree, and clear what a crash left behind.

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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from app.config import Settings
from app.models import Image, MaskVersion, ModelVersion
from app.services.image import image_path

TEMPORARY_SUFFIXES = (".tmp", ".partial")
DEFAULT_GRACE_S = 3600.0


@dataclass
class Checkup:
    """What the check found; ``repaired`` lists what ``repair`` removed."""

    temporary: list[Path] = field(default_factory=list)
    orphans: list[Path] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # rows whose file is gone
    database: list[str] = field(default_factory=list)  # the engine's own integrity check
    young: int = 0  # debris newer than the grace period, left for its writer
    repaired: list[Path] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        """Nothing left that a repair could not fix or has not fixed."""
        debris = {*self.temporary, *self.orphans} - set(self.repaired)
        return not (debris or self.missing or self.database)


def _files(root: Path) -> Iterator[Path]:
    if root.is_dir():
        yield from (p for p in root.rglob("*") if p.is_file())


def _is_temporary(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(TEMPORARY_SUFFIXES)


def referenced_files(session: Session, settings: Settings) -> dict[Path, str]:
    """Every file a row names (resolved), with the row that names it."""
    named: dict[Path, str] = {}
    for image in session.scalars(select(Image)):
        named[image_path(settings, image).resolve()] = f"image {image.id} ({image.file_name})"
    for version in session.scalars(select(MaskVersion)):
        for path in (version.hard_path, version.soft_path):
            if path:
                named[(settings.data_dir / path).resolve()] = f"mask version {version.id}"
    for model in session.scalars(select(ModelVersion)):
        named[Path(model.path).resolve()] = f"{model.kind} model version {model.version}"
    return named


def _database_check(session: Session) -> list[str]:
    if session.get_bind().dialect.name != "sqlite":
        return []  # PostgreSQL checks its pages itself (checksums, WAL replay)
    rows = [r[0] for r in session.execute(text("PRAGMA quick_check"))]
    return [] if rows == ["ok"] else [f"sqlite: {r}" for r in rows]


def check(session: Session, *, settings: Settings) -> Checkup:
    """Compare the data folder with the rows; change nothing."""
    result = Checkup(database=_database_check(session))
    named = referenced_files(session, settings)
    result.missing = [
        f"{row}: {path} is missing" for path, row in named.items() if not path.is_file()
    ]
    stores = (settings.images_dir, settings.masks_dir, settings.data_dir / "models")
    for root in stores:
        for path in _files(root):
            if _is_temporary(path):
                result.temporary.append(path)
            elif path.resolve() not in named:
                result.orphans.append(path)
    scratch = settings.scratch_dir
    result.temporary += sorted(scratch.iterdir()) if scratch.is_dir() else []
    return result


def repair(result: Checkup, *, grace_s: float = DEFAULT_GRACE_S) -> Checkup:
    """Remove the debris older than ``grace_s`` seconds; the rest is counted as young."""
    cutoff = time.time() - grace_s
    for path in _debris(result):
        try:
            if path.lstat().st_mtime > cutoff:
                result.young += 1
                continue
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        except FileNotFoundError:
            pass  # its writer finished or cleaned up meanwhile
        result.repaired.append(path)
    return result


def _debris(result: Checkup) -> Iterable[Path]:
    return [*result.temporary, *result.orphans]
