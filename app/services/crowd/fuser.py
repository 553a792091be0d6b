"""Folding submitted answers into the consensus: off the request path, in batches.

A submission is acknowledged once its votes are stored (``app.services.crowd.answer``). Fusing
them (credibility from known tiles and from agreement, the cells' posteriors, retirement,
refinement, completion, the windows' values) is done here, for a batch of submitted tasks at a
time: each target is settled once per batch however many of its answers came in, and the
request path holds no lock that fusion waits on. Every task fused is marked (``Task.fused_at``)
in the same transaction, so that the fuser resumes after a crash from the first task not fused,
and no task is fused twice (PostgreSQL: ``SKIP LOCKED`` on the tasks; SQLite: one writer).

``fusion = "inline"`` (``app.config.Settings``) fuses each task as it is taken, in the request's
own transaction: simulated campaigns that must replay the same run, and a single-user project.
A request is held once its answer is stored while the fuser is behind (an answer has waited
longer than ``fusion_max_lag_s``, ``pause_while_behind``): under overload the volunteers slow
down, the consensus does not fall behind.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from sqlalchemy import bindparam, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db import as_utc, lock_key, utcnow
from app.dbapi import Prepared
from app.models import Cell, Project, Task, TaskState, TaskTile, Vote
from app.services.crowd.consensus import (
    COUNT_COLUMNS,
    Fusing,
    agreement_increments,
    base_rates,
    gold_labels,
    refresh_cells,
)
from app.services.crowd.retirement import retire_fresh
from app.services.crowd.settle import lock_targets, revalue_windows, settle_targets
from app.services.volunteer import credibility_rows
from ml.aggregation.credibility import gold_credit

log = logging.getLogger(__name__)

BATCH = 200  # tasks per fusion transaction
GATHER_S = 0.2  # how long a woken fuser waits for more answers (well under a second of lag)
# The fuser's queue (``ix_tasks_waiting``: its rows together, whatever else the table holds).
WAITING = (Task.state == TaskState.SUBMITTED, Task.fused_at.is_(None))
DRAIN_S = 20.0  # at most this long fusing what waits when the server stops


@dataclass
class Fused:
    tasks: int = 0
    retired_cells: int = 0
    windows_opened: int = 0
    completed_targets: int = 0


def known_answers(
    session: Session, tiles: list[tuple[int, int, bool]], selected: set[int]
) -> list[tuple[int, int]]:
    """(answer, truth) of each known tile of a task (``(position, cell_id, known)`` tiles)."""
    known = gold_labels(session, cell_ids=[cell for _, cell, k in tiles if k])
    return answers_on(known, tiles, selected)


def answers_on(
    gold: dict[int, bool], tiles: list[tuple[int, int, bool]], selected: set[int]
) -> list[tuple[int, int]]:
    """(answer, truth) of each tile on a cell of ``gold``."""
    return [
        (int(position in selected), int(gold[cell])) for position, cell, _ in tiles if cell in gold
    ]


def feedback_on(answers: list[tuple[int, int]]) -> str | None:
    """What the volunteer hears about the known tiles: all right, or check again (never which)."""
    if not answers:
        return None
    return "ok" if all(a == t for a, t in answers) else "check_again"


def _gold_increments(answers: list[tuple[int, int]]) -> np.ndarray:
    increments = np.zeros(len(COUNT_COLUMNS))
    for label, truth in answers:
        tp, fn, tn, fp = gold_credit(label, truth)
        increments += (tp, fn, tn, fp, tp, fn, tn, fp)  # pos_yes, pos_no, neg_no, neg_yes, gold
    return increments


def _apply_credits(session: Session, credits: dict[int, np.ndarray]) -> None:
    """Add credibility increments, in volunteer order: concurrent writers that credit the same
    volunteers lock their rows in one order, and so never deadlock."""
    rows = credibility_rows(session, volunteer_ids=credits)
    for volunteer_id in sorted(credits):
        row = rows[volunteer_id]
        for name, value in zip(COUNT_COLUMNS, credits[volunteer_id], strict=True):
            if value:
                old = getattr(row, name)
                setattr(row, name, old + (float(value) if isinstance(old, float) else int(value)))


# A batch's tiles with their votes, the targets of its cells, and the cells themselves (entities:
# the fuser retires them).
TASK_VOTES = Prepared(
    select(TaskTile.task_id, TaskTile.position, TaskTile.cell_id, TaskTile.known, Vote.label)
    .join(Vote, (Vote.task_id == TaskTile.task_id) & (Vote.position == TaskTile.position))
    .where(TaskTile.task_id.in_(bindparam("task_ids", expanding=True)))
)
TARGETS_OF_CELLS = Prepared(
    select(Cell.target_id).where(Cell.id.in_(bindparam("cell_ids", expanding=True)))
)
CELLS = (
    select(Cell)
    .where(Cell.id.in_(bindparam("cell_ids", expanding=True)))
    .execution_options(populate_existing=True)
)


def fuse_tasks(
    session: Session, *, settings: Settings, project: Project, tasks: list[Task]
) -> Fused:
    """Fold the votes of these submitted tasks into the consensus, and mark them fused
    (flushed, not committed)."""
    tasks = [t for t in tasks if t.state == TaskState.SUBMITTED and t.fused_at is None]
    if not tasks:
        return Fused()
    rows = TASK_VOTES.run(session, {"task_ids": [t.id for t in tasks]}).rows
    tiles: dict[int, list[tuple[int, int, bool]]] = defaultdict(list)
    selected: dict[int, set[int]] = defaultdict(set)
    for task_id, position, cell_id, known, label in rows:
        tiles[task_id].append((position, cell_id, known))
        if label:
            selected[task_id].add(position)
    unknown_ids = {
        "cell_ids": sorted({c for ts in tiles.values() for _, c, known in ts if not known})
    }
    # Targets first, then credibility, then consensus: the full EM pass takes them in the same
    # order, so the two never deadlock.
    lock_targets(session, target_ids=TARGETS_OF_CELLS.run(session, unknown_ids).scalars())
    # Read once the targets are held: a concurrent writer's retirements are seen, not undone.
    cells = {c.id: c for c in session.scalars(CELLS, unknown_ids)}
    credits: dict[int, np.ndarray] = defaultdict(lambda: np.zeros(len(COUNT_COLUMNS)))
    # In task order: the agreement of each counts the votes fused before it.
    fusing = [
        Fusing(t.id, t.volunteer_id, [c for _, c, known in tiles[t.id] if not known and c in cells])
        for t in tasks
    ]
    rates = base_rates(session, project=project)
    base = {c.id: rates.get(c.level, 0.0) for c in cells.values()}
    for volunteer_id, inc in agreement_increments(session, tasks=fusing, base=base).items():
        credits[volunteer_id] += inc
    gold = gold_labels(session, cell_ids=[c for ts in tiles.values() for _, c, k in ts if k])
    for task in tasks:
        credits[task.volunteer_id] += _gold_increments(
            answers_on(gold, tiles[task.id], selected[task.id])
        )
    _apply_credits(session, {v: c for v, c in credits.items() if c.any()})
    session.flush()
    fresh_cells = list(cells.values())
    fresh = refresh_cells(session, cells=fresh_cells)
    changed, retired = retire_fresh(session, project, cells=fresh_cells, fresh=fresh)
    session.flush()
    # Targets where a cell retired may refine or complete; elsewhere only window values move.
    settled = settle_targets(session, settings=settings, project=project, target_ids=changed)
    revalue_windows(
        session,
        window_ids={c.window_id for c in fresh_cells if c.window_id and c.target_id not in changed},
    )
    now = utcnow()
    for task in tasks:
        task.fused_at = now
    session.flush()
    return Fused(
        tasks=len(tasks),
        retired_cells=retired + sum(s.retired for s in settled),
        windows_opened=sum(s.windows_opened for s in settled),
        completed_targets=sum(s.completed for s in settled),
    )


OLDEST_WAITING = Prepared(select(func.min(Task.submitted_at)).where(*WAITING))


def lag_s(session: Session) -> float:
    """How long the oldest answer still waiting for a fuser has waited (0 if none)."""
    oldest = OLDEST_WAITING.run(session).scalar()
    return 0.0 if oldest is None else (utcnow() - as_utc(oldest)).total_seconds()


PAUSE_STEP_S, PAUSE_MAX_S = 0.05, 2.0


class LagProbe:
    """The fusers' lag (``lag_s``) as this process last read it: read at most once per
    ``PAUSE_STEP_S`` however many requests are being held, by whichever asks first once it is
    stale (one query where each held request used to ask every step)."""

    def __init__(self, factory: sessionmaker[Session], every_s: float = PAUSE_STEP_S) -> None:
        self.factory, self.every_s = factory, every_s
        self._lock = threading.Lock()
        self._lag, self._at = 0.0, -float("inf")

    def fresh(self) -> float | None:
        """The lag last read, if it is recent enough; None when it needs reading again."""
        return self._lag if time.monotonic() - self._at < self.every_s else None

    def read(self) -> float:
        """The lag, read from the database unless another caller has just read it."""
        with self._lock:
            if (lag := self.fresh()) is not None:
                return lag
            with self.factory() as session:
                self._lag = lag_s(session)
            self._at = time.monotonic()
            return self._lag


async def pause_while_behind(probe: LagProbe, settings: Settings) -> float:
    """Backpressure: hold a request whose answer is stored (committed) while the fuser is more
    than ``settings.fusion_max_lag_s`` behind, up to ``PAUSE_MAX_S``. An overloaded server then
    slows its volunteers down instead of letting the consensus fall behind; nothing is locked
    meanwhile. The request waits on the event loop (it holds no worker thread) and reads the
    lag in a thread only when the probe's reading is stale. Returns the seconds paused."""
    paused = 0.0
    while paused < PAUSE_MAX_S:
        lag = probe.fresh()
        if lag is None:
            lag = await asyncio.to_thread(probe.read)
        if lag <= settings.fusion_max_lag_s:
            break
        await asyncio.sleep(PAUSE_STEP_S)
        paused += PAUSE_STEP_S
    return paused


def pending(session: Session, *, project_id: int, limit: int = BATCH) -> list[Task]:
    """A project's submitted tasks not fused yet, oldest first, locked against another fuser."""
    return list(
        session.scalars(
            select(Task)
            .where(*WAITING, Task.project_id == project_id)
            .order_by(Task.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
            .execution_options(populate_existing=True)
        )
    )


def fusing_key(project_id: int) -> int:
    """A project's fuser lock in PostgreSQL's one 64-bit space of advisory locks."""
    return lock_key(f"tessera fuser {project_id}")


def _take_turn(session: Session, project_id: int) -> bool:
    """Whether this transaction may fuse the project now: on PostgreSQL, one fuser per project
    at a time (an advisory lock to the end of the transaction; another fuser takes another
    project, or waits for its next wake). Two fusers on one project split its answers between
    their batches, settle its targets twice as often and wait on each other's target locks
    (measured, 2 workers: each waited on the other about half the time). SQLite has one writer
    anyway."""
    if session.get_bind().dialect.name != "postgresql":
        return True
    key = fusing_key(project_id)
    return bool(session.scalar(text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": key}))


def fuse_pending(factory: sessionmaker[Session], settings: Settings, *, limit: int = BATCH) -> int:
    """Fuse one batch of waiting tasks, of the project whose answer has waited longest and no
    other fuser is fusing (``_take_turn``), in one transaction (one project at a time: each
    batch locks its targets in id order, so two fusers never deadlock). Returns how many tasks
    were fused (0: nothing waits, or other fusers have every project that waits)."""
    with factory() as session:
        waiting = session.scalars(
            select(Task.project_id)
            .where(*WAITING)
            .group_by(Task.project_id)
            .order_by(func.min(Task.id))
        ).all()
        project_id = next((p for p in waiting if _take_turn(session, p)), None)
        if project_id is None:
            return 0
        tasks = pending(session, project_id=project_id, limit=limit)
        project = session.get(Project, project_id)
        assert project is not None
        fuse_tasks(session, settings=settings, project=project, tasks=tasks)
        session.commit()
    return len(tasks)


class Fuser:
    """Fuses waiting answers in a background thread: of the server, woken by each submission
    (``wake``) and every ``settings.fusion_interval_s`` anyway (answers left by a crash, or by
    another worker process); or of `tessera fuse`, polling every ``poll_s``."""

    def __init__(
        self,
        settings: Settings,
        factory: sessionmaker[Session],
        poll_s: float | None = None,
        reader: sessionmaker[Session] | None = None,
    ) -> None:
        self.settings, self.factory = settings, factory
        # The lag is read through its own sessions (no writer's turn on SQLite).
        self.probe = LagProbe(reader or factory)
        self.poll_s = settings.fusion_interval_s if poll_s is None else poll_s
        self.fused = 0
        self.stop, self.event = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._loop, name="fuser", daemon=True)

    def wake(self) -> None:
        self.event.set()

    async def answered(self) -> None:
        """After a request's answer is committed: wake this process's fuser (if it fuses here)
        and hold the request while the fusers are behind (``pause_while_behind``)."""
        if self.settings.fusion == "inline":
            return
        self.wake()
        await pause_while_behind(self.probe, self.settings)

    def _loop(self) -> None:
        while not self.stop.is_set():
            if self.event.wait(self.poll_s):
                # Let answers gather for a moment: a batch settles each target once however
                # many of its answers it holds, and each transaction has a fixed cost.
                self.stop.wait(GATHER_S)
            self.event.clear()
            try:
                while not self.stop.is_set() and (n := fuse_pending(self.factory, self.settings)):
                    self.fused += n
            except Exception:  # keep serving; the next round tries again
                log.exception("fusing answers failed")

    def close(self, *, drain: bool = False) -> None:
        """Stop after the batch under way; with ``drain``, fuse what still waits first (a server
        stopped gracefully leaves no answer waiting; `kill -9` leaves them to the next fuser)."""
        self.stop.set()
        self.event.set()
        if self.thread.ident is not None:  # started
            self.thread.join(timeout=30)
        deadline = time.monotonic() + DRAIN_S
        while drain and time.monotonic() < deadline:
            try:
                if not fuse_pending(self.factory, self.settings):
                    break
            except Exception:  # the next fuser takes them
                log.exception("fusing the waiting answers at shutdown failed")
                break
