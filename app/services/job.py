"""Jobs: a retraining, prediction or re-tagging run with status, progress and log.

A job row is committed at each step by its runner (a job is the one place that commits more
than once: each step is its own unit of work), so that a crash leaves the job marked with how
far it got; ``fail_job`` records the error.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy.orm import Session

from app.db import utcnow
from app.models import Job, JobStatus, Project

MAX_LOG_CHARS = 200_000


def start_job(
    session: Session, *, project: Project | None, kind: str, params: dict[str, Any]
) -> Job:
    job = Job(
        project_id=project.id if project else None,
        kind=kind,
        status=JobStatus.RUNNING,
        params=params,
        result={},
        log="",
        progress=0.0,
        pid=os.getpid(),
        started_at=utcnow(),
    )
    session.add(job)
    session.flush()
    return job


def log_job(job: Job, message: str, *, progress: float | None = None) -> None:
    stamp = utcnow().strftime("%H:%M:%S")
    job.log = (job.log + f"{stamp} {message}\n")[-MAX_LOG_CHARS:]
    if progress is not None:
        job.progress = max(0.0, min(1.0, progress))


def finish_job(job: Job, *, result: dict[str, Any]) -> None:
    job.status, job.result, job.progress, job.finished_at = (
        JobStatus.SUCCEEDED,
        result,
        1.0,
        utcnow(),
    )


def fail_job(job: Job, *, error: str) -> None:
    log_job(job, f"failed: {error}")
    job.status, job.finished_at = JobStatus.FAILED, utcnow()


@contextmanager
def job_run(
    session: Session, *, project: Project | None, kind: str, params: dict[str, Any]
) -> Iterator[Job]:
    """Start a job, commit it and yield it; the body finishes it (``finish_job``) and commits.

    If the body raises (a ``KeyboardInterrupt`` too), its uncommitted work is rolled back and the
    job is marked failed with the error, committed, and the exception goes on.
    """
    job = start_job(session, project=project, kind=kind, params=params)
    session.commit()
    try:
        yield job
    except BaseException as exc:
        session.rollback()
        fail_job(job, error=str(exc) or type(exc).__name__)
        session.commit()
        raise
