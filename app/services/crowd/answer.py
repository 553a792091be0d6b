"""Taking a volunteer's answers to a task: checked, stored once, fused.

A submission carries the task's signed token. The token is checked (signature, expiry, owner,
tile range) before anything is stored; the votes are then appended, one per tile, the task's
lease is released and the volunteer hears how the known tiles went. The result is stored on the
task, so that the same token submitted again stores nothing more and returns the same result.
Folding the votes into the consensus (credibility, posteriors, retirement, refinement,
completion) is the fuser's (``app.services.crowd.fuser``): in the background, or in this same
transaction with ``fusion = "inline"``.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from app.config import Settings
from app.db import as_utc, utcnow
from app.dbapi import Copies, Prepared
from app.models import Project, Task, TaskState, TaskTile, Volunteer, Vote, Window
from app.security import Signer, TaskClaims
from app.services.crowd.fuser import Fused, feedback_on, fuse_tasks, known_answers
from app.services.errors import ConflictError, ForbiddenError, InvalidInputError, NotFoundError

TOKEN_GRACE_S = 30


class GoneError(LookupError):
    """The task is no longer open (expired or skipped)."""


@dataclass(frozen=True)
class SubmissionResult:
    task_id: int
    votes: int
    feedback: str | None  # "ok" or "check_again" when known tiles were answered; never which
    # What fusing the answers did, when it was done in the request (``fusion = "inline"``).
    retired_cells: int | None
    windows_opened: int | None
    completed_targets: int | None


# The task a token names, read as a copy (``app.dbapi``): the answer path writes with statements.
TASK = Copies(Task).where(Task.id == bindparam("task_id"))
TASK_FOR_UPDATE = Copies(Task, TASK.prepared.statement.with_for_update())


def claims_for(
    session: Session, *, signer: Signer, project: Project, volunteer: Volunteer, token: str
) -> tuple[Task, TaskClaims]:
    """The task a token names (a read-only copy, locked on PostgreSQL against a concurrent
    replay), checked against its signature, its owner and its state."""
    max_age = int(project.setting("lease_seconds")) + TOKEN_GRACE_S
    claims = signer.read_task_token(token, max_age_s=max_age)
    task = TASK_FOR_UPDATE.first(session, {"task_id": claims.task_id})
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


# The answer path's statements, built once and run on the DBAPI cursor (``app.dbapi``: the
# framework around a statement cost more than SQLite's running it); values are bound per call.
TILES = Prepared(
    select(TaskTile.position, TaskTile.cell_id, TaskTile.known).where(
        TaskTile.task_id == bindparam("task_id")
    )
)
VOTE_COLUMNS = [
    "task_id",
    "volunteer_id",
    "cell_id",
    "position",
    "label",
    "elapsed_ms",
    "created_at",
]
INSERT_VOTES = Prepared(insert(Vote.metadata.tables[Vote.__tablename__]), columns=VOTE_COLUMNS)
RELEASE = Prepared(
    update(Window)
    .where(Window.id == bindparam("window_id"), Window.leased_by == bindparam("volunteer_id"))
    .values(leased_until=None, leased_by=None)
)
MARK_SUBMITTED = Prepared(
    update(Task)
    .where(Task.id == bindparam("task_id"))
    .values(state=TaskState.SUBMITTED, submitted_at=bindparam("at"), result=bindparam("result"))
)
MARK_SKIPPED = Prepared(
    update(Task)
    .where(Task.id == bindparam("task_id"), Task.state == TaskState.LEASED)
    .values(state=TaskState.SKIPPED)
)


def _store_votes(
    session: Session, task: Task, volunteer: Volunteer, selected: set[int], elapsed_ms: int
) -> list[tuple[int, int, bool]]:
    """Append one vote per tile; returns the tiles as ``(position, cell_id, known)``."""
    tiles = [(p, c, bool(k)) for p, c, k in TILES.run(session, {"task_id": task.id}).rows]
    now = utcnow()
    # The (task, position) key refuses a second copy of any vote.
    INSERT_VOTES.run(
        session,
        [
            {
                "task_id": task.id,
                "volunteer_id": volunteer.id,
                "cell_id": cell_id,
                "position": position,
                "label": position in selected,
                "elapsed_ms": elapsed_ms,
                "created_at": now,
            }
            for position, cell_id, _ in tiles
        ],
    )
    return tiles


def _release(session: Session, task: Task, volunteer: Volunteer) -> None:
    """Give the task's window lease back, if the volunteer still holds it (one statement)."""
    if task.window_id is not None:
        RELEASE.run(session, {"window_id": task.window_id, "volunteer_id": volunteer.id})


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
    """Store one task's answers (fused at once with ``fusion = "inline"``, else by the fuser).
    Returns the result (the stored one on a replay)."""
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
    answers = known_answers(session, tiles, picked)
    _release(session, task, volunteer)
    submitted_at = utcnow()
    fused = None
    if settings.fusion == "inline":
        fused = _fuse_now(session, settings, project, task.id, submitted_at)
    result = SubmissionResult(
        task_id=task.id,
        votes=len(tiles),
        feedback=feedback_on(answers),
        retired_cells=fused.retired_cells if fused else None,
        windows_opened=fused.windows_opened if fused else None,
        completed_targets=fused.completed_targets if fused else None,
    )
    stored = asdict(result)
    MARK_SUBMITTED.run(session, {"task_id": task.id, "at": submitted_at, "result": stored})
    return dict(stored)


def _fuse_now(
    session: Session, settings: Settings, project: Project, task_id: int, submitted_at: datetime
) -> Fused:
    """Fuse one task in the request's transaction (``fusion = "inline"``): the fuser takes the
    session's entity, told it is submitted (it is marked so with its result, after fusing)."""
    task = session.get(Task, task_id)
    assert task is not None
    set_committed_value(task, "state", TaskState.SUBMITTED)
    set_committed_value(task, "submitted_at", submitted_at)
    return fuse_tasks(session, settings=settings, project=project, tasks=[task])


def skip(
    session: Session, *, signer: Signer, project: Project, volunteer: Volunteer, token: str
) -> None:
    """Give a task back: its cells are free for others at once."""
    task, _ = claims_for(session, signer=signer, project=project, volunteer=volunteer, token=token)
    if task.state == TaskState.SUBMITTED:
        raise ConflictError("this task was already submitted")
    if task.state == TaskState.LEASED:
        MARK_SKIPPED.run(session, {"task_id": task.id})
        _release(session, task, volunteer)
