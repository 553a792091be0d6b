"""SQLite's writers in one process take turns (``app.db._WriterGate``)."""

from __future__ import annotations

import linecache
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import event, text

from app.config import Settings
from app.db import make_engine, make_session_factory
from app.main import create_app
from app.migrate import upgrade_to_head


def test_the_next_writer_goes_in_only_once_the_last_one_has_committed(tmp_path: Path) -> None:
    path = tmp_path / "gate.db"
    engine = make_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (x INTEGER)"))
    factory = make_session_factory(engine, writer=True)
    seen: list[str] = []

    def next_writer(_conn: Any) -> None:
        """Runs after the gate's own listener: a writer let in now must find the database free
        (else it sleeps in SQLite's busy handler, which under load starved writers)."""
        other = sqlite3.connect(path, timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
            seen.append("free")
        except sqlite3.OperationalError as exc:
            seen.append(str(exc))
        finally:
            other.close()

    event.listen(engine, "commit", next_writer)
    with factory() as session:
        session.execute(text("INSERT INTO t VALUES (1)"))
        session.commit()
    assert seen == ["free"]
    with engine.connect() as conn:  # and the write is there
        assert conn.execute(text("SELECT count(*) FROM t")).scalar_one() == 1
    engine.dispose()


def test_writers_of_other_processes_wait_in_the_gate_not_in_sqlites_busy_loop(
    tmp_path: Path,
) -> None:
    """Two engines on one file (as the server and `tessera fuse` are): while one writes, the
    other's writer sleeps in the gate's file lock (woken when it is released), not in SQLite's
    busy handler, which sleeps and polls and under load starved the fuser's process."""
    path = tmp_path / "gate.db"
    first, second = make_engine(f"sqlite:///{path}"), make_engine(f"sqlite:///{path}")
    with first.begin() as conn:
        conn.execute(text("CREATE TABLE t (x INTEGER)"))
    holder = make_session_factory(first, writer=True)()
    holder.execute(text("INSERT INTO t VALUES (1)"))  # the write lock is held from here

    def write() -> None:
        with make_session_factory(second, writer=True)() as session:
            session.execute(text("INSERT INTO t VALUES (2)"))
            session.commit()

    waiter = threading.Thread(target=write)
    waiter.start()
    try:
        deadline = time.monotonic() + 10
        line = ""
        while time.monotonic() < deadline and waiter.is_alive():
            frame = sys._current_frames().get(waiter.ident or 0)
            while frame is not None and frame.f_code.co_name != "begin":
                frame = frame.f_back
            if frame is not None:
                line = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
                if "flock" in line or "BEGIN IMMEDIATE" in line:
                    break
            time.sleep(0.01)
        assert "flock" in line, line
    finally:
        holder.commit()
        holder.close()
    waiter.join(timeout=30)
    with first.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM t")).scalar_one() == 2
    first.dispose()
    second.dispose()


def test_the_server_checkpoints_the_log_in_the_background_not_in_its_requests(
    tmp_path: Path,
) -> None:
    """A request's commit never copies the write-ahead log into the database (SQLite's default
    does it in the commit that takes the log past 1,000 pages, holding every writer meanwhile);
    the server's checkpointer thread does."""
    settings = Settings(
        environment="test",
        data_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path / 'app.db'}",
        secret_key="test-secret-key-that-is-long-enough-for-anything",
        consensus_interval_s=0,
    )
    upgrade_to_head(make_engine(settings.database_url))
    app = create_app(settings)
    with TestClient(app):
        with app.state.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar_one() == 0
        factory = make_session_factory(app.state.engine, writer=True)
        with factory() as session:
            session.execute(text("CREATE TABLE filler (x BLOB)"))
            for _ in range(50):
                session.execute(text("INSERT INTO filler VALUES (zeroblob(8000))"))
            session.commit()
        checkpointer = app.state.checkpointer
        deadline = time.monotonic() + 10
        while checkpointer.frames == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert checkpointer.frames > 0
    app.state.engine.dispose()
