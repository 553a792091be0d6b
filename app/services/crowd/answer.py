"""Taking a volunteer's answers to a task: checked, stored once, fused at once.

A submission carries the task's signed token. The token is checked (signature, expiry, owner,
tile range) before anything is stored; the votes are then appended, one per tile; known tiles
update the volunteer's credibility exactly, and votes on cells with enough votes update their
volunteers' credibility from agreement (``agreement_increments``); the cells get new posteriors,
and their targets are settled (retire, refine, complete). The result is stored on the task, so
that the same token submitted again stores nothing more and returns the same result.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import as_utc, utcnow
from app.models import (
    Cell,
    Project,
    Task,
    TaskState,
    TaskTile,
    Volunteer,
    Vote,
    Window,
)
from app.security import Signer, TaskClaims
from app.services.consensus import (
    COUNT_COLUMNS,
    agreement_increments,
    gold_labels,
    refresh_cells,
)
from app.services.crowd.retirement import retire_fresh
from app.services.crowd.settle import lock_targets, revalue_windows, settle_targets
from app.services.errors import ConflictError, ForbiddenError, InvalidInputError, NotFoundError
from app.services.volunteer import credibility_of
from ml.aggregation.credibility import gold_credit

TOKEN_GRACE_S = 30


class GoneError(LookupError):
    """The task is no longer open (expired or skipped)."""


@dataclass(frozen=True)
class SubmissionResult:
    task_id: int
    votes: int
    feedback: str | None  # "ok" or "check_again" when known tiles were answered; never which
    retired_cells: int
    windows_opened: int
    completed_targets: int


def claims_for(
    session: Session, *, signer: Signer, project: Project, volunteer: Volunteer, token: str
) -> tuple[Task, TaskClaims]:
    """The task a token names, checked against its signature, its owner and its state."""
    max_age = int(project.setting("lease_seconds")) + TOKEN_GRACE_S
    claims = signer.read_task_token(token, max_age_s=max_age)
    task = session.get(Task, claims.task_id, with_for_update=True)
    if task is None or task.nonce != claims.nonce or task.project_id != project.id:
        raise NotFoundError("the token does not name a task of this project")
    if claims.volunteer != volunteer.public_id or task.volunteer_id != volunteer.id:
        raise ForbiddenError("this task was given to another volunteer")
    if volunteer.banned:
        raise ForbiddenError("this volunteer can no longer take part")
    return task, claims


def _check_open(task: Task) -> None:
    if task.state == TaskState.SKIPPED:
        raise GoneError("this task was skipped; fetch a new one")
    if task.state == TaskState.EXPIRED or utcnow() > as_utc(task.expires_at):
        raise GoneError("this task has expired; fetch a new one")


def _store_votes(
    session: Session, task: Task, volunteer: Volunteer, selected: set[int], elapsed_ms: int
) -> list[TaskTile]:
    tiles = list(session.scalars(select(TaskTile).where(TaskTile.task_id == task.id)))
    now = utcnow()
    # One multi-row INSERT; the (task, position) key refuses a second copy of any vote.
    session.execute(
        insert(Vote),
        [
            {
                "task_id": task.id,
                "volunteer_id": volunteer.id,
                "cell_id": tile.cell_id,
                "position": tile.position,
                "label": tile.position in selected,
                "elapsed_ms": elapsed_ms,
                "created_at": now,
            }
            for tile in tiles
        ],
    )
    return tiles


def _credit_known(
    session: Session, tiles: list[TaskTile], selected: set[int]
) -> tuple[str | None, np.ndarray]:
    """Feedback on the known tiles, and the volunteer's credibility increments from them
    (exact gold counts and the same soft counts, ``COUNT_COLUMNS`` order)."""
    increments = np.zeros(len(COUNT_COLUMNS))
    known = gold_labels(session, cell_ids=[t.cell_id for t in tiles if t.known])
    if not known:
        return None, increments
    right = True
    for tile in tiles:
        if tile.cell_id not in known:
            continue
        label, truth = int(tile.position in selected), int(known[tile.cell_id])
        tp, fn, tn, fp = gold_credit(label, truth)
        increments += (tp, fn, tn, fp, tp, fn, tn, fp)  # pos_yes, pos_no, neg_no, neg_yes, gold
        right = right and label == truth
    return ("ok" if right else "check_again"), increments


def _apply_credits(session: Session, credits: dict[int, np.ndarray]) -> None:
    """Add credibility increments, in volunteer order: concurrent submissions that credit the
    same volunteers lock their rows in one order, and so never deadlock."""
    for volunteer_id in sorted(credits):
        row = credibility_of(session, volunteer_id=volunteer_id)
        for name, value in zip(COUNT_COLUMNS, credits[volunteer_id], strict=True):
            if value:
                old = getattr(row, name)
                setattr(row, name, old + (float(value) if isinstance(old, float) else int(value)))


def _release(session: Session, task: Task, volunteer: Volunteer) -> None:
    if task.window_id is None:
        return
    window = session.get(Window, task.window_id)
    if window is not None and window.leased_by == volunteer.id:
        window.leased_until, window.leased_by = None, None


def submit(
    session: Session,
    *,
    settings: Settings,
    signer: Signer,
    project: Project,
    volunteer: Volunteer,
    token: str,
    selected: Collection[int],
    elapsed_ms: int,
) -> dict[str, Any]:
    """Store and fuse one task's answers. Returns the result (the stored one on a replay)."""
    task, claims = claims_for(
        session, signer=signer, project=project, volunteer=volunteer, token=token
    )
    if task.state == TaskState.SUBMITTED:
        return dict(task.result or {})
    _check_open(task)
    picked = set(selected)
    if any(p < 0 or p >= claims.tiles for p in picked):
        raise InvalidInputError(f"tile positions must be between 0 and {claims.tiles - 1}")
    if elapsed_ms < 0:
        raise InvalidInputError("elapsed_ms must not be negative")
    tiles = _store_votes(session, task, volunteer, picked, elapsed_ms)
    unknown_ids = [t.cell_id for t in tiles if not t.known]
    of_cells = select(Cell).where(Cell.id.in_(unknown_ids))
    # Targets first, then credibility, then consensus: the full EM pass takes them in the same
    # order, so the two never deadlock.
    lock_targets(session, target_ids=session.scalars(of_cells.with_only_columns(Cell.target_id)))
    # Read once the targets are held: a concurrent writer's retirements are seen, not undone.
    cells = list(session.scalars(of_cells.execution_options(populate_existing=True)))
    feedback, own = _credit_known(session, tiles, picked)
    credits = agreement_increments(session, cells=cells, volunteer_id=volunteer.id)
    credits[volunteer.id] = credits.get(volunteer.id, 0.0) + own
    _apply_credits(session, credits)
    session.flush()
    fresh = refresh_cells(session, cells=cells)
    changed, retired = retire_fresh(session, project, cells=cells, fresh=fresh)
    session.flush()
    # Targets where a cell retired may refine or complete; elsewhere only window values move.
    settled = settle_targets(session, settings=settings, project=project, target_ids=changed)
    revalue_windows(
        session,
        window_ids={c.window_id for c in cells if c.window_id and c.target_id not in changed},
    )
    _release(session, task, volunteer)
    result = SubmissionResult(
        task_id=task.id,
        votes=len(tiles),
        feedback=feedback,
        retired_cells=retired + sum(s.retired for s in settled),
        windows_opened=sum(s.windows_opened for s in settled),
        completed_targets=sum(s.completed for s in settled),
    )
    task.state, task.submitted_at, task.result = TaskState.SUBMITTED, utcnow(), asdict(result)
    session.flush()
    return asdict(result)


def skip(
    session: Session, *, signer: Signer, project: Project, volunteer: Volunteer, token: str
) -> None:
    """Give a task back: its cells are free for others at once."""
    task, _ = claims_for(session, signer=signer, project=project, volunteer=volunteer, token=token)
    if task.state == TaskState.SUBMITTED:
        raise ConflictError("this task was already submitted")
    if task.state == TaskState.LEASED:
        task.state = TaskState.SKIPPED
        _release(session, task, volunteer)
