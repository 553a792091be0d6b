"""Model versions: a checkpoint of the tagger or the segmenter, its metrics, and which is active.

Promotion flips the active version in one transaction (a partial unique index allows one active
version per project and kind), so readers see the old model or the new one, never none or two.
Old versions stay; rollback re-activates the previous one.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.db import utcnow
from app.models import ModelKind, ModelVersion, Project
from app.services.errors import NotFoundError


def active_model(session: Session, *, project: Project, kind: ModelKind) -> ModelVersion | None:
    return session.scalar(
        select(ModelVersion).where(
            ModelVersion.project_id == project.id,
            ModelVersion.kind == kind,
            ModelVersion.active.is_(True),
        )
    )


def list_model_versions(
    session: Session, *, project: Project, kind: ModelKind | None = None
) -> list[ModelVersion]:
    query = select(ModelVersion).where(ModelVersion.project_id == project.id)
    if kind is not None:
        query = query.where(ModelVersion.kind == kind)
    return list(session.scalars(query.order_by(ModelVersion.kind, ModelVersion.version)))


def register_model_version(
    session: Session,
    *,
    project: Project,
    kind: ModelKind,
    path: str,
    config: dict[str, Any],
    data_snapshot: dict[str, Any],
    metrics: dict[str, Any],
) -> ModelVersion:
    """Record a checkpoint written (and renamed into place) by a job; inactive until promoted.

    ``path`` is its key in the storage (``models/<project>/<file>``), or an absolute path for
    a checkpoint kept outside it."""
    latest = session.scalar(
        select(func.max(ModelVersion.version)).where(
            ModelVersion.project_id == project.id, ModelVersion.kind == kind
        )
    )
    version = ModelVersion(
        project_id=project.id,
        kind=kind,
        version=(latest or 0) + 1,
        path=path,
        config=config,
        data_snapshot=data_snapshot,
        metrics=metrics,
        active=False,
    )
    session.add(version)
    session.flush()
    return version


def promote(session: Session, *, version: ModelVersion) -> None:
    """Make ``version`` the active one of its kind, in the caller's transaction."""
    session.execute(
        update(ModelVersion)
        .where(
            ModelVersion.project_id == version.project_id,
            ModelVersion.kind == version.kind,
            ModelVersion.active.is_(True),
            ModelVersion.id != version.id,
        )
        .values(active=False)
        .execution_options(synchronize_session="fetch")
    )
    session.flush()
    version.active, version.promoted_at = True, utcnow()
    session.flush()


def rollback_model(session: Session, *, project: Project, kind: ModelKind) -> ModelVersion:
    """Re-activate the version promoted before the active one."""
    current = active_model(session, project=project, kind=kind)
    if current is None:
        raise NotFoundError(f"no active {kind.value} in project {project.slug!r}")
    previous = session.scalar(
        select(ModelVersion)
        .where(
            ModelVersion.project_id == project.id,
            ModelVersion.kind == kind,
            ModelVersion.promoted_at.is_not(None),
            ModelVersion.version < current.version,
        )
        .order_by(ModelVersion.version.desc())
        .limit(1)
    )
    if previous is None:
        raise NotFoundError(f"no earlier promoted {kind.value} to roll back to")
    promote(session, version=previous)
    return previous
