"""One model job per project at a time, and the clean-up after a job that was killed.

``project_lock`` takes an exclusive ``flock`` on ``<data>/locks/<slug>.lock``: a second process
gets ``JobBusyError`` at once instead of training over the first. The kernel drops the lock when
its process dies, however it dies, so a kill never leaves the project locked. The lock is
re-entrant within a process (a retrain runs the training jobs under the lock it holds).

Holding the lock proves that no other model job of the project is alive, so taking it is the
moment to clean up after a killed one: its job rows still say *running* (they become *failed*,
with a line in their log), and a checkpoint it was writing may have left a ``.partial`` file (it
is removed; the active model was never touched, since promotion is a single transaction after
the file is complete). The data folder is per machine, so on PostgreSQL the lock is also a
session advisory lock held on a connection of its own: jobs on several machines sharing the
database (a Kubernetes CronJob, a retrain started by hand) exclude each other too, and the
server drops it when the holder's connection dies.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import lock_key
from app.models import Job, JobStatus, Project
from app.services.job import fail_job

MODEL_JOB_KINDS = ("retrain", "train-tagger", "train-segmenter", "seed", "predict")
_held: dict[str, int] = {}


class JobBusyError(RuntimeError):
    """Another model job of the project is running."""


def models_dir(settings: Settings, project: Project) -> Path:
    return settings.data_dir / "models" / project.slug


def work_dir(settings: Settings, project: Project) -> Path:
    """Files a model job writes for itself and removes when it ends (a killed job's are
    removed by the next one, ``project_lock``)."""
    return settings.data_dir / "work" / project.slug


@contextmanager
def project_lock(session: Session, settings: Settings, project: Project) -> Iterator[None]:
    """Hold the project's model-job lock; clean up after killed jobs when first taken.

    The clean-up is committed in ``session`` (the caller's, so that SQLite sees one writer).
    """
    if project.slug in _held:
        _held[project.slug] += 1
        try:
            yield
        finally:
            _held[project.slug] -= 1
        return
    folder = settings.data_dir / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / f"{project.slug}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise JobBusyError(
                f"a model job of project {project.slug!r} is already running; try again later"
            ) from None
        _held[project.slug] = 1
        try:
            with _database_lock(session, project):
                _clean_up(session, settings, project)
                yield
        finally:
            del _held[project.slug]
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def advisory_key(project: Project) -> int:
    """The project's model-job lock in PostgreSQL's one 64-bit space of advisory locks."""
    return lock_key(f"tessera model job {project.slug}")


@contextmanager
def _database_lock(session: Session, project: Project) -> Iterator[None]:
    bind = session.get_bind()
    engine = bind if isinstance(bind, Engine) else bind.engine
    if engine.dialect.name != "postgresql":
        yield  # one machine: the file lock is the lock
        return
    key = advisory_key(project)
    with engine.connect() as conn:  # its own: the session's connection goes back to the pool
        taken = conn.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar()
        conn.commit()  # a session-level lock outlives the transaction; idle, not in one
        if not taken:
            raise JobBusyError(
                f"a model job of project {project.slug!r} is already running on another "
                "machine; try again later"
            )
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
            conn.commit()


def _clean_up(session: Session, settings: Settings, project: Project) -> None:
    orphans = session.scalars(
        select(Job).where(
            Job.project_id == project.id,
            Job.status == JobStatus.RUNNING,
            Job.kind.in_(MODEL_JOB_KINDS),
        )
    ).all()
    for job in orphans:
        fail_job(job, error=f"its process ({job.pid}) ended without finishing it (killed?)")
    session.commit()
    for partial in models_dir(settings, project).glob(".*.partial"):
        partial.unlink(missing_ok=True)
    for leftover in work_dir(settings, project).glob("*"):  # a killed job's
        shutil.rmtree(leftover, ignore_errors=True)
