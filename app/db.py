"""Engine, sessions and the declarative base.

SQLite is opened in WAL mode with foreign keys on and a busy timeout, so that readers never
block the single writer and a concurrent writer waits instead of failing. PostgreSQL gets a
plain pooled engine. Route handlers and job steps commit once; services only flush.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

try:  # POSIX: the writers of several processes queue on a file lock
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

from sqlalchemy import DateTime, Engine, MetaData, create_engine, event
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from app.config import Settings

# Stable constraint names, so that Alembic migrations are the same on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

SQLITE_BUSY_TIMEOUT_MS = 30_000
WRITE_OPTION = "tessera_writer"


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """SQLite hands datetimes back without their zone; every stored time is UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: DateTime(timezone=True)}


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin (see _sqlite_begin):
    # the module's own guesswork breaks SAVEPOINTs.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.close()


class _WriterGate:
    """Writers of one SQLite database take turns: in this process in arrival order, and with
    other processes (the fuser's, more server workers, the CLI) through an exclusive lock on a
    file next to the database (``<database>-writer``).

    SQLite's busy handler makes a waiting writer sleep and poll, which under load starves some
    writers for seconds; a waiter here sleeps in the lock and wakes when it is released. An
    in-memory database, or a platform without ``fcntl``, has the in-process lock alone (other
    processes then meet at SQLite's own lock: BEGIN IMMEDIATE and the busy timeout).
    """

    KEY = "tessera_writer_gate"

    def __init__(self, lock_path: str | None = None) -> None:
        self.lock = threading.Lock()
        self.fd: int | None = None
        if lock_path is not None and fcntl is not None:
            self.fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            weakref.finalize(self, os.close, self.fd)  # with the engine that holds the gate

    def begin(self, conn: Any) -> None:
        # A writer takes the write lock up front (BEGIN IMMEDIATE); a deferred transaction that
        # read first could not upgrade to writing once another writer had committed
        # (SQLITE_BUSY_SNAPSHOT, which no timeout retries).
        dbapi = conn.connection.dbapi_connection
        if not conn.get_execution_options().get(WRITE_OPTION, False):
            dbapi.execute("BEGIN")
            return
        # The timeout keeps a thread that nests two writers from waiting forever.
        if self.lock.acquire(timeout=SQLITE_BUSY_TIMEOUT_MS / 1000):
            conn.info[self.KEY] = self.lock
            if self.fd is not None and fcntl is not None:
                fcntl.flock(self.fd, fcntl.LOCK_EX)  # the other processes' writers
        try:
            dbapi.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.end(conn)
            raise

    def commit(self, conn: Any) -> None:
        """Commit, then let the next writer in. SQLAlchemy's ``commit`` event comes before the
        database's COMMIT: released there, the next writer's BEGIN IMMEDIATE would meet SQLite's
        lock and sleep in its busy handler. SQLAlchemy's own commit then finds nothing open. A
        failed COMMIT keeps the gate until the rollback that follows it."""
        if self.KEY in conn.info:
            conn.connection.dbapi_connection.commit()
        self.end(conn)

    def end(self, conn: Any) -> None:
        lock = conn.info.pop(self.KEY, None)
        if lock is not None:
            if self.fd is not None and fcntl is not None:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            lock.release()


def _no_autocheckpoint(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA wal_autocheckpoint=0")
    cursor.close()


class Checkpointer:
    """Copies SQLite's write-ahead log into the database in a thread of its own, every
    ``interval_s``, so that no request pays for it: left to SQLite, the commit that takes the
    log past 1,000 pages checkpoints it, holding the writers' turn meanwhile. PASSIVE: it waits
    for no reader or writer (what a reader still uses is copied next time). The engine's own
    connections then never checkpoint (``make_engine(..., background_checkpoints=True)``);
    other processes' keep SQLite's default."""

    def __init__(self, engine: Engine, interval_s: float = 1.0) -> None:
        self.engine, self.interval_s = engine, interval_s
        self.frames = 0  # frames copied into the database so far
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="checkpointer", daemon=True)

    def checkpoint(self) -> tuple[int, int]:
        """One passive checkpoint: (frames in the log, frames copied into the database)."""
        with self.engine.connect() as conn:
            dbapi = conn.connection.dbapi_connection
            assert dbapi is not None
            _busy, log, copied = dbapi.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        self.frames += max(0, copied)
        return log, copied

    def _loop(self) -> None:
        while not self.stop.wait(self.interval_s):
            try:
                self.checkpoint()
            except Exception:  # the next round tries again
                logging.getLogger(__name__).exception("checkpointing the SQLite log failed")

    def close(self) -> None:
        self.stop.set()
        if self.thread.ident is not None:
            self.thread.join(timeout=30)
        self.checkpoint()


def _private_file(path: Path) -> None:
    """Create the database file readable by its owner only (0600; the umask made it 0644,
    while the secret beside it is 0600). SQLite gives its -wal and -shm files the database
    file's permissions. An existing file keeps its own."""
    if path.exists() or not path.parent.is_dir():
        return
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def make_engine(url: str, *, background_checkpoints: bool = False) -> Engine:
    """An engine for ``url``. SQLite: WAL, the writer gate; with ``background_checkpoints``,
    its connections leave checkpoints to a ``Checkpointer``."""
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        )
        database = engine.url.database
        on_disk = database not in (None, "", ":memory:") and not database.startswith("file:")
        if on_disk and database is not None:
            _private_file(Path(database))
        gate = _WriterGate(f"{database}-writer" if on_disk else None)
        event.listen(engine, "connect", _sqlite_pragmas)
        if background_checkpoints and on_disk:
            event.listen(engine, "connect", _no_autocheckpoint)
        event.listen(engine, "begin", gate.begin)
        event.listen(engine, "commit", gate.commit)
        event.listen(engine, "rollback", gate.end)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def engine_for(settings: Settings, *, background_checkpoints: bool = False) -> Engine:
    if settings.is_sqlite:
        settings.ensure_dirs()
    return make_engine(
        settings.resolved_database_url, background_checkpoints=background_checkpoints
    )


def make_session_factory(engine: Engine, *, writer: bool = False) -> sessionmaker[Session]:
    """Sessions on ``engine``; ``writer`` sessions serialise their transactions on SQLite.

    Use writer sessions for read-modify-write units such as leasing a task or taking a
    submission; PostgreSQL gets row locks for those instead and ignores the option.
    """
    bind = engine.execution_options(**{WRITE_OPTION: True}) if writer else engine
    return sessionmaker(bind=bind, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def lock_key(name: str) -> int:
    """``name``'s key in PostgreSQL's one 64-bit space of advisory locks."""
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)
