"""A project's model jobs exclude each other across machines that share PostgreSQL: the data
folder's file lock is per machine, the advisory lock is the database's."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from app.config import Settings
from app.db import make_engine, make_session_factory
from app.jobs.lock import JobBusyError, advisory_key, project_lock
from app.migrate import upgrade_to_head
from app.services.project import create_project


def test_a_model_job_on_another_machine_holds_the_project(
    fresh_database_url: str, tmp_path: Path
) -> None:
    engine = make_engine(fresh_database_url)
    upgrade_to_head(engine)
    if engine.dialect.name != "postgresql":
        engine.dispose()
        pytest.skip("one machine on SQLite: the data folder's file lock is the lock")
    here = Settings(data_dir=tmp_path / "machine-a", database_url=fresh_database_url)
    with make_session_factory(engine)() as session:
        project = create_project(session, slug="shared")
        session.commit()
        other = make_engine(fresh_database_url)  # another machine's job, its own data folder
        with other.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": advisory_key(project)})
            with (
                pytest.raises(JobBusyError, match="another machine"),
                project_lock(session, here, project),
            ):
                pass
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": advisory_key(project)})
            conn.commit()
        other.dispose()
        # Free again; and held while the job runs: the other machine is refused now.
        with project_lock(session, here, project), other.connect() as conn:
            got = conn.execute(
                text("SELECT pg_try_advisory_lock(:k)"), {"k": advisory_key(project)}
            ).scalar()
            assert got is False
        with other.connect() as conn:  # released when the job ended
            assert conn.execute(
                text("SELECT pg_try_advisory_lock(:k)"), {"k": advisory_key(project)}
            ).scalar()
        other.dispose()
    engine.dispose()
