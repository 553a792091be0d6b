"""SQLite's writers in one process take turns (``app.db._WriterGate``)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import event, text

from app.db import make_engine, make_session_factory


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
