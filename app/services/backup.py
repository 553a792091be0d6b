"""Back up a whole Tessera instance (database and files) into one archive, and restore it.

The archive is a tar: ``manifest.json`` (format, schema revision, row and file counts),
``tables/<table>.jsonl`` (every row of every table, parents before children) and ``files/``
(the images, masks and model checkpoints that rows name, by their path under the data
folder). It is backend-neutral: a SQLite backup restores into PostgreSQL and back.

Consistency: the rows are read in one transaction (a snapshot: SQLite's WAL read transaction,
PostgreSQL's REPEATABLE READ), and files are written before the rows that name them commit and
never change afterwards, so every file a snapshot names exists and is whole. The backup can run
while the service serves. It is written to a temporary name and renamed when complete.

A restore goes into an empty database at the same schema revision (``tessera db upgrade``
first): files are put in place first, then all rows in one transaction. On any error the rows
are rolled back and the files it added removed, so a failed restore leaves nothing behind.
The signing key is not in the backup (secret material): give the new instance its own, or the
old ``TESSERA_SECRET_KEY``, for volunteers' cookies to stay valid.
"""

from __future__ import annotations

import base64
import enum
import gzip
import io
import json
import os
import re
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy import Column, LargeBinary, Table, func, insert, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import Base
from app.models import Image, MaskVersion, ModelVersion, Project
from app.services.archive import BoundedTarInfo, safe_member_name
from app.services.doctor import STORED_FOLDERS, is_stored, referenced_files
from app.services.errors import ConflictError, InvalidInputError
from app.services.files import held_files, models_key, remove_files
from app.storage import Storage, open_storage

FORMAT = "tessera-backup/1"
BATCH = 2000


@dataclass(frozen=True)
class BackupReport:
    path: Path
    rows: dict[str, int]
    files: int
    bytes: int


def _tables() -> list[Table]:
    return list(Base.metadata.sorted_tables)  # parents before children


def _python_type(column: Column[Any]) -> type | None:
    try:
        kind: type = column.type.python_type
    except NotImplementedError:
        return None
    return kind


def _encode(value: Any, column: Column[Any]) -> Any:
    if value is None:
        return None
    if isinstance(column.type, LargeBinary):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    return value


def _decode(value: Any, column: Column[Any]) -> Any:
    if value is None:
        return None
    if isinstance(column.type, LargeBinary):
        return base64.b64decode(value)
    if _python_type(column) is datetime:
        return datetime.fromisoformat(value)
    return value


def _revision(session: Session) -> str | None:
    return session.execute(text("SELECT version_num FROM alembic_version")).scalar()


def _snapshot(session: Session) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY"))


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), int(datetime.now().timestamp())
    tar.addfile(info, io.BytesIO(data))


def _model_member(storage: Storage, model: ModelVersion, project_slug: str) -> str:
    """The checkpoint's key (models/<project>/<file>), also for one trained elsewhere."""
    return storage.key_for(model.path) or models_key(project_slug, Path(model.path).name)


def create_backup(session: Session, *, settings: Settings, out: Path) -> BackupReport:
    """Write the backup of everything to OUT (``.tar``, or ``.tar.gz``/``.tgz`` compressed)."""
    with held_files(settings):  # every file stays whole until it is in the archive
        return _create_backup(session, settings=settings, out=out)


def _create_backup(session: Session, *, settings: Settings, out: Path) -> BackupReport:
    _snapshot(session)
    storage = open_storage(settings)
    rows: dict[str, int] = {}
    files: dict[str, Path] = {}  # archive member -> local file
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    mode = "w:gz" if out.name.endswith((".tar.gz", ".tgz")) else "w"
    try:
        with tarfile.open(tmp_name, mode) as tar:  # type: ignore[call-overload]
            for table in _tables():
                lines = []
                for row in session.execute(select(table)).mappings():
                    lines.append(
                        json.dumps({c.name: _encode(row[c.name], c) for c in table.columns})
                    )
                rows[table.name] = len(lines)
                _add_bytes(tar, f"tables/{table.name}.jsonl", "\n".join(lines).encode())
            slugs = dict(session.execute(select(Project.id, Project.slug)).all())
            models, outside = {}, {}
            for m in session.scalars(select(ModelVersion)):
                models[m.id] = _model_member(storage, m, slugs[m.project_id])
                if storage.key_for(m.path) is None:
                    outside[str(Path(m.path).resolve())] = models[m.id]
            present = {f.key for folder in STORED_FOLDERS for f in storage.files(folder)}
            for name in sorted(referenced_files(session, settings)):
                if not is_stored(name, present):
                    raise ConflictError(f"{name} is named by a row but missing: run tessera doctor")
                local = Path(name) if name in outside else storage.local_path(name)
                files[outside.get(name, name)] = local
            for member, path in files.items():
                tar.add(path, arcname=f"files/{member}", recursive=False)
            manifest = {
                "format": FORMAT,
                "revision": _revision(session),
                "created_at": datetime.now().astimezone().isoformat(),
                "rows": rows,
                "files": len(files),
                "models": {str(k): v for k, v in models.items()},
            }
            _add_bytes(tar, "manifest.json", json.dumps(manifest, indent=2).encode())
        with open(tmp_name, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_name, out)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    size = sum(p.stat().st_size for p in files.values())
    return BackupReport(path=out, rows=rows, files=len(files), bytes=size)


def _read_manifest(tar: tarfile.TarFile) -> dict[str, Any]:
    try:
        handle = tar.extractfile("manifest.json")
        assert handle is not None
        manifest: dict[str, Any] = json.loads(handle.read())
    except (KeyError, AssertionError, json.JSONDecodeError) as exc:
        raise InvalidInputError("not a Tessera backup: no readable manifest.json") from exc
    if manifest.get("format") != FORMAT:
        raise InvalidInputError(f"unknown backup format {manifest.get('format')!r}: {FORMAT}")
    return manifest


def _rows(tar: tarfile.TarFile, table: Table) -> Iterator[dict[str, Any]]:
    try:
        handle = tar.extractfile(f"tables/{table.name}.jsonl")
    except KeyError:
        handle = None
    if handle is None:
        raise InvalidInputError(f"the backup has no rows for {table.name}")
    columns = {c.name: c for c in table.columns}
    for line in handle.read().decode().splitlines():
        raw = json.loads(line)
        yield {name: _decode(raw.get(name), column) for name, column in columns.items()}


def _restore_files(tar: tarfile.TarFile, settings: Settings, added: list[str]) -> int:
    storage = open_storage(settings)
    settings.scratch_dir.mkdir(parents=True, exist_ok=True)
    count = 0
    for info in tar.getmembers():
        if not info.name.startswith("files/"):
            continue
        if not info.isfile():
            raise InvalidInputError(f"backup member {info.name!r} is not a plain file")
        key = str(PurePosixPath(safe_member_name(info.name.removeprefix("files/"))))
        if not key.startswith(STORED_FOLDERS):  # e.g. the signing key, a cached tile
            raise InvalidInputError(
                f"backup member {info.name!r} is not a stored file (images, masks, models)"
            )
        count += 1
        if storage.exists(key):
            continue  # content-addressed or versioned: the same file
        source = tar.extractfile(info)
        assert source is not None
        fd, tmp_name = tempfile.mkstemp(prefix=".restore.", suffix=".tmp", dir=settings.scratch_dir)
        try:
            with source, os.fdopen(fd, "wb") as fh:
                while chunk := source.read(1024 * 1024):
                    fh.write(chunk)
            storage.upload(key, Path(tmp_name))
        finally:
            Path(tmp_name).unlink(missing_ok=True)
        added.append(key)
    return count


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _check_keys(table: str, row: dict[str, Any]) -> None:
    """Values that become paths in the data folder are what a backup writes: an image's content
    hash, a mask's key under ``masks/``, a model's under ``models/`` (or an absolute checkpoint
    the old instance was given, which is only ever read). A ``../`` there would send later
    reads, tile writes and deletions out of the data folder."""
    keys: list[tuple[str, Any]] = []
    if table == Image.__tablename__:
        if not isinstance(row.get("sha256"), str) or not _SHA256.fullmatch(row["sha256"]):
            raise InvalidInputError(
                f"an image row has a content hash that is not one: {row.get('id')!r}"
            )
    elif table == MaskVersion.__tablename__:
        keys = [("masks/", row.get("hard_path"))]
        if row.get("soft_path") is not None:
            keys.append(("masks/", row["soft_path"]))
    elif table == ModelVersion.__tablename__ and not Path(str(row.get("path"))).is_absolute():
        keys = [("models/", row.get("path"))]
    for folder, key in keys:
        parts = PurePosixPath(key).parts if isinstance(key, str) else ()
        if not isinstance(key, str) or not key.startswith(folder) or ".." in parts or "\0" in key:
            raise InvalidInputError(f"a {table} row names a file outside {folder}: {key!r}")


def _reset_sequences(session: Session) -> None:
    if session.get_bind().dialect.name != "postgresql":
        return  # SQLite's rowid continues from the largest id by itself
    for table in _tables():
        if "id" in table.columns and table.columns["id"].autoincrement in (True, "auto"):
            session.execute(
                text(
                    f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), "
                    f"COALESCE(MAX(id), 1), MAX(id) IS NOT NULL) FROM {table.name}"
                )
            )


def restore_backup(session: Session, *, settings: Settings, archive: Path) -> dict[str, int]:
    """Restore ARCHIVE into this empty database and data folder; commits. Returns row counts."""
    if session.scalar(select(func.count()).select_from(Project)):
        raise ConflictError("the database is not empty: restore into a fresh one")
    added: list[str] = []
    try:
        try:
            with tarfile.open(archive, tarinfo=BoundedTarInfo) as tar:
                counts = _restore(session, settings, tar, added)
        except (InvalidInputError, ConflictError):
            raise
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise InvalidInputError(f"{archive.name}: not a readable backup ({exc})") from exc
        except (
            SQLAlchemyError,
            ValueError,
            TypeError,
            KeyError,
            AttributeError,
            RecursionError,
        ) as exc:
            # A manifest or a row that is not what a backup writes (a duplicate id, a broken
            # date, a list for a row), or rows that meet ones already here (an account made
            # before the restore): said in one line, not as a traceback.
            raise InvalidInputError(
                f"{archive.name}: damaged or not restorable here ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200] if str(exc) else ''})"
            ) from exc
        session.commit()
    except BaseException:
        session.rollback()
        remove_files(settings, added)
        raise
    return counts


def _restore(
    session: Session, settings: Settings, tar: tarfile.TarFile, added: list[str]
) -> dict[str, int]:
    manifest = _read_manifest(tar)
    if manifest["revision"] != _revision(session):
        raise InvalidInputError(
            f"the backup is at schema revision {manifest['revision']!r}, this database "
            f"at {_revision(session)!r}: restore with the Tessera version that wrote it"
        )
    _restore_files(tar, settings, added)
    models = {int(k): v for k, v in manifest.get("models", {}).items()}
    counts: dict[str, int] = {}
    for table in _tables():
        batch: list[dict[str, Any]] = []
        counts[table.name] = 0
        for row in _rows(tar, table):
            if table.name == ModelVersion.__tablename__ and row["id"] in models:
                row["path"] = models[row["id"]]  # its key in this instance's storage
            _check_keys(table.name, row)
            batch.append(row)
            if len(batch) >= BATCH:
                session.execute(insert(table), batch)
                counts[table.name] += len(batch)
                batch = []
        if batch:
            session.execute(insert(table), batch)
            counts[table.name] += len(batch)
    if counts != manifest["rows"]:
        raise InvalidInputError("the backup's rows do not match its manifest: damaged")
    _reset_sequences(session)
    return counts
