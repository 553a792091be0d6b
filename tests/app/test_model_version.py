"""Model versions: one active per kind, promotion flips it, rollback goes back."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session

from app.models import JobStatus, ModelKind
from app.services.errors import NotFoundError
from app.services.job import fail_job, finish_job, log_job, start_job
from app.services.model_version import (
    active_model,
    list_model_versions,
    promote,
    register_model_version,
    rollback_model,
)
from app.services.project import create_project


def test_promotion_keeps_one_active_version_and_rollback_restores_the_previous(
    session: Session,
) -> None:
    project = create_project(session, slug="models")
    versions = [
        register_model_version(
            session,
            project=project,
            kind=ModelKind.SEGMENTER,
            path=f"models/models/v{i}.pt",
            config={"arch": "unet"},
            data_snapshot={"targets": 10 * i},
            metrics={"miou": 0.5 + i / 10},
        )
        for i in (1, 2)
    ]
    assert [v.version for v in versions] == [1, 2]
    assert active_model(session, project=project, kind=ModelKind.SEGMENTER) is None
    promote(session, version=versions[0])
    promote(session, version=versions[1])
    assert active_model(session, project=project, kind=ModelKind.SEGMENTER) is versions[1]
    assert [v.active for v in list_model_versions(session, project=project)] == [False, True]
    assert active_model(session, project=project, kind=ModelKind.TAGGER) is None

    assert rollback_model(session, project=project, kind=ModelKind.SEGMENTER) is versions[0]
    assert active_model(session, project=project, kind=ModelKind.SEGMENTER) is versions[0]
    with pytest.raises(NotFoundError, match="no earlier promoted"):
        rollback_model(session, project=project, kind=ModelKind.SEGMENTER)


def test_job_records_progress_log_and_outcome(session: Session) -> None:
    project = create_project(session, slug="jobs")
    job = start_job(session, project=project, kind="train-tagger", params={"epochs": 1})
    assert job.status == JobStatus.RUNNING and job.pid
    log_job(job, "epoch 1/2", progress=0.5)
    finish_job(job, result={"map": 0.9})
    assert job.status == JobStatus.SUCCEEDED and job.progress == 1.0 and "epoch 1/2" in job.log
    other = start_job(session, project=project, kind="seed", params={})
    fail_job(other, error="out of memory")
    assert other.status == JobStatus.FAILED and "out of memory" in other.log
