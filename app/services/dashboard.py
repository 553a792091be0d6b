"""A project's dashboard: progress, human effort, mask quality on gold, and model versions.

Human-seconds are the time volunteers spent on submitted tasks (the ``elapsed_ms`` their pages
measured, once per task). Mask IoU on gold compares each complete target's latest crowd or curator
mask with its held-out ground truth (the frozen gold set: never served, never trained on), in the
order the targets completed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import as_utc
from app.models import (
    Cell,
    CellStatus,
    MaskSource,
    MaskVersion,
    ModelVersion,
    Project,
    Target,
    TargetState,
    Task,
    TaskState,
    Vote,
)
from app.services.files import read_mask
from ml.aggregation.dense import mask_iou

MAX_IOU_TARGETS = 300


@dataclass(frozen=True)
class ModelRow:
    kind: str
    version: int
    active: bool
    metrics: dict[str, float]
    created_at: datetime


@dataclass
class Dashboard:
    targets_by_state: dict[str, int]
    cells_retired: int
    cells_open: int
    votes: int
    human_seconds: float
    # (seconds since the first task, cumulative human-seconds)
    effort: list[tuple[float, float]] = field(default_factory=list)
    # (completed targets on gold so far, running mean IoU)
    gold_iou: list[tuple[float, float]] = field(default_factory=list)
    models: list[ModelRow] = field(default_factory=list)

    @property
    def mean_gold_iou(self) -> float | None:
        return self.gold_iou[-1][1] if self.gold_iou else None


def _hard(settings: Settings, path: str) -> np.ndarray:
    mask = read_mask(settings, path)
    return mask if mask.dtype == bool else mask > 0.5


def _gold_iou(session: Session, settings: Settings, project: Project) -> list[tuple[float, float]]:
    truth = {
        target_id: path
        for target_id, path in session.execute(
            select(MaskVersion.target_id, MaskVersion.hard_path)
            .join(Target, Target.id == MaskVersion.target_id)
            .where(
                Target.project_id == project.id,
                Target.control.is_(False),
                Target.state == TargetState.COMPLETE,
                MaskVersion.source == MaskSource.GROUND_TRUTH,
            )
        )
    }
    latest = session.execute(
        select(MaskVersion.target_id, MaskVersion.hard_path, MaskVersion.created_at)
        .where(
            MaskVersion.target_id.in_(list(truth)),
            MaskVersion.source.in_([MaskSource.CONSENSUS, MaskSource.CURATOR]),
        )
        .order_by(MaskVersion.target_id, MaskVersion.version)
    ).all()
    final = {target_id: (path, at) for target_id, path, at in latest}  # the last version wins
    ordered = sorted(final.items(), key=lambda kv: as_utc(kv[1][1]))[-MAX_IOU_TARGETS:]
    scores, out = [], []
    for target_id, (path, _at) in ordered:
        scores.append(mask_iou(_hard(settings, path), _hard(settings, truth[target_id])))
        out.append((float(len(scores)), float(np.mean(scores))))
    return out


def _effort(session: Session, project: Project) -> tuple[float, list[tuple[float, float]]]:
    rows = session.execute(
        select(Task.submitted_at, func.max(Vote.elapsed_ms))
        .join(Vote, Vote.task_id == Task.id)
        .where(Task.project_id == project.id, Task.state == TaskState.SUBMITTED)
        .group_by(Task.id, Task.submitted_at)
    ).all()
    times = sorted((as_utc(at), int(ms)) for at, ms in rows if at is not None)
    if not times:
        return 0.0, []
    start, total, points = times[0][0], 0.0, []
    for at, ms in times:
        total += ms / 1000
        points.append(((at - start).total_seconds(), total))
    return total, points


def human_seconds(session: Session, *, project: Project) -> float:
    """The human-seconds volunteers spent on the project's submitted tasks."""
    return _effort(session, project)[0]


def project_dashboard(session: Session, *, settings: Settings, project: Project) -> Dashboard:
    states = dict(
        session.execute(
            select(Target.state, func.count())
            .where(Target.project_id == project.id)
            .group_by(Target.state)
        ).all()
    )
    cells = dict(
        session.execute(
            select(Cell.status, func.count())
            .join(Target, Target.id == Cell.target_id)
            .where(Target.project_id == project.id)
            .group_by(Cell.status)
        ).all()
    )
    votes = session.scalar(
        select(func.count())
        .select_from(Vote)
        .join(Task, Task.id == Vote.task_id)
        .where(Task.project_id == project.id)
    )
    seconds, effort = _effort(session, project)
    models = [
        ModelRow(
            kind=str(m.kind),
            version=m.version,
            active=m.active,
            metrics={k: float(v) for k, v in m.metrics.items() if isinstance(v, int | float)},
            created_at=m.created_at,
        )
        for m in session.scalars(
            select(ModelVersion)
            .where(ModelVersion.project_id == project.id)
            .order_by(ModelVersion.kind, ModelVersion.version)
        )
    ]
    return Dashboard(
        targets_by_state={s.value: int(states.get(s, 0)) for s in TargetState},
        cells_retired=int(cells.get(CellStatus.RETIRED, 0)),
        cells_open=int(cells.get(CellStatus.OPEN, 0)),
        votes=votes or 0,
        human_seconds=seconds,
        effort=effort,
        gold_iou=_gold_iou(session, settings, project),
        models=models,
    )
