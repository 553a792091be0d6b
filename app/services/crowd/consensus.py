"""Consensus on the database: cell posteriors from the votes and their voters' credibility.

The numbers come from ``ml.aggregation``; this module loads what they need and writes back what
they give. A cell's posterior is recomputed from all its counted votes whenever it gets a new
one (``refresh_cells``); ``app.services.crowd.retirement`` then decides which cells are done, and
``app.services.crowd.settle`` refines, closes windows and completes targets. ``recompute_project``
(``app.services.recompute``) runs the batch two-coin EM over every vote of a project, leaving
banned volunteers out.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from sqlalchemy import bindparam, func, or_, select, update
from sqlalchemy.orm import Session

from app.db import utcnow
from app.dbapi import Prepared
from app.models import (
    Cell,
    Consensus,
    Credibility,
    Gold,
    Project,
    RetireReason,
    Target,
    Task,
    Volunteer,
    Vote,
)
from ml.aggregation.credibility import (
    AGREEMENT_VOTES,
    COUNT_FIELDS,
    WorkerCounts,
    agreement_credit,
    budget_shares,
    cells_logodds,
    sensitivity_specificity,
    supporting_votes,
    vote_evidence,
)

COUNT_COLUMNS = COUNT_FIELDS  # Credibility's columns are WorkerCounts' fields


def worker_counts(session: Session, volunteer_ids: list[int]) -> WorkerCounts:
    """The stored credibility counts of these volunteers, in their order (zeros if none)."""
    rows = {
        volunteer_id: list(counts)
        for volunteer_id, *counts in WORKER_COUNTS.run(
            session, {"volunteer_ids": list(volunteer_ids)}
        ).rows
    }
    return WorkerCounts.from_rows([rows.get(v, [0.0] * len(COUNT_FIELDS)) for v in volunteer_ids])


def credibility_estimates(
    session: Session, volunteer_ids: list[int]
) -> dict[int, tuple[float, float]]:
    """Posterior-mean (sensitivity, specificity) per volunteer, with the model's own priors."""
    sens, spec = sensitivity_specificity(worker_counts(session, volunteer_ids))
    return {v: (float(a), float(b)) for v, a, b in zip(volunteer_ids, sens, spec, strict=True)}


@dataclass(frozen=True)
class Fresh:
    """New posteriors, vote counts, credible votes (``budget_shares``: what retirement counts)
    and the credible votes among them that speak for the object (``CellVotes.supporting``) of
    refreshed cells. Shape: each ``(n_cells,)``."""

    posterior: np.ndarray
    n_votes: np.ndarray
    credible: np.ndarray
    supported: np.ndarray


@dataclass(frozen=True)
class CellVotes:
    """The counted votes (not banned volunteers') of some cells. Shape: the vote arrays
    ``(n_votes,)``; ``counts`` one row per distinct voter."""

    cell: npt.NDArray[np.intp]  # index into the cells asked for
    worker: npt.NDArray[np.intp]  # index into counts
    label: npt.NDArray[np.int8]
    task: npt.NDArray[np.int64]  # the task id each vote answered
    counts: WorkerCounts
    volunteers: list[int]  # volunteer id of each row of counts

    def credible(self, n_cells: int) -> np.ndarray:
        """Credible votes per cell: each vote weighed by its volunteer's budget share."""
        shares = budget_shares(self.counts)[self.worker]
        return np.bincount(self.cell, weights=shares, minlength=n_cells)

    def strongest_yes(self, n_cells: int) -> np.ndarray:
        """Per cell, the log-likelihood ratio of its vote that speaks most for the object (0 if
        none does): a credible volunteer's yes, or a confirmed adversary's no."""
        out = np.zeros(n_cells)
        np.maximum.at(out, self.cell, vote_evidence(self.worker, self.label, self.counts))
        return out

    def supporting(self, n_cells: int) -> np.ndarray:
        """Per cell, its credible votes that speak for the object (``supporting_votes``)."""
        return supporting_votes(self.cell, self.worker, self.label, self.counts, n_cells)


# The fuser's statements, built once; values are bound per call.
# On the DBAPI cursor (``app.dbapi``): some of them hand back hundreds of rows per batch.
_COUNTED_VOTES = (
    select(Vote.cell_id, Vote.volunteer_id, Vote.label, Vote.task_id)
    .join(Volunteer, Volunteer.id == Vote.volunteer_id)
    .where(Vote.cell_id.in_(bindparam("cell_ids", expanding=True)), Volunteer.banned.is_(False))
)
COUNTED_VOTES = Prepared(_COUNTED_VOTES)
FUSED_VOTES = Prepared(
    _COUNTED_VOTES.join(Task, Task.id == Vote.task_id).where(
        or_(Task.fused_at.is_not(None), Task.id.in_(bindparam("task_ids", expanding=True)))
    )
)
WORKER_COUNTS = Prepared(
    select(Credibility.volunteer_id, *(getattr(Credibility, k) for k in COUNT_COLUMNS)).where(
        Credibility.volunteer_id.in_(bindparam("volunteer_ids", expanding=True)),
        Credibility.category == "",
    )
)


def cell_votes(
    session: Session, *, cell_ids: list[int], fused_and: Collection[int] | None = None
) -> CellVotes:
    """The counted votes of ``cell_ids``; with ``fused_and``, only those of tasks already fused
    and of these tasks (the state as of fusing them, for scoring votes once)."""
    index = {c: i for i, c in enumerate(cell_ids)}
    if fused_and is None:
        votes = COUNTED_VOTES.run(session, {"cell_ids": list(index)}).rows
    else:
        votes = FUSED_VOTES.run(
            session, {"cell_ids": list(index), "task_ids": list(fused_and)}
        ).rows
    volunteers = sorted({v for _, v, _, _ in votes})
    worker = {v: i for i, v in enumerate(volunteers)}
    return CellVotes(
        cell=np.array([index[c] for c, _, _, _ in votes], dtype=np.intp),
        worker=np.array([worker[v] for _, v, _, _ in votes], dtype=np.intp),
        label=np.array([int(y) for _, _, y, _ in votes], dtype=np.int8),
        task=np.array([t for _, _, _, t in votes], dtype=np.int64),
        counts=worker_counts(session, volunteers),
        volunteers=volunteers,
    )


def refresh_cells(session: Session, *, cells: list[Cell]) -> Fresh:
    """Recompute the posteriors of ``cells`` from all their counted votes."""
    if not cells:
        return Fresh(np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0))
    votes = cell_votes(session, cell_ids=[c.id for c in cells])
    logodds = cells_logodds(
        [c.prior_logodds for c in cells], votes.cell, votes.worker, votes.label, votes.counts
    )
    n_votes = np.bincount(votes.cell, minlength=len(cells))
    n_yes = np.bincount(votes.cell, weights=votes.label, minlength=len(cells))
    posterior = 1.0 / (1.0 + np.exp(-logodds))
    write_consensus(
        session,
        cell_ids=[c.id for c in cells],
        logodds=logodds,
        posterior=posterior,
        n_votes=n_votes,
        n_yes=n_yes,
        method="online",
    )
    return Fresh(posterior, n_votes, votes.credible(len(cells)), votes.supporting(len(cells)))


_CONSENSUS = Consensus.metadata.tables[Consensus.__tablename__]
WRITE_CONSENSUS = Prepared(
    update(_CONSENSUS)
    .where(_CONSENSUS.c.cell_id == bindparam("cell"))
    .values(
        logodds=bindparam("logodds"),
        posterior=bindparam("posterior"),
        n_votes=bindparam("n_votes"),
        n_yes=bindparam("n_yes"),
        method=bindparam("method"),
        updated_at=bindparam("at"),
    )
)


def write_consensus(
    session: Session,
    *,
    cell_ids: Sequence[int],
    logodds: npt.ArrayLike,
    posterior: npt.ArrayLike,
    n_votes: npt.ArrayLike,
    n_yes: npt.ArrayLike,
    method: str,
) -> None:
    """Store cells' posteriors and vote counts: one executemany through the table (the ORM's
    bulk update by primary key spent more time per row on bookkeeping than the database did).
    Shape: each array ``(len(cell_ids),)``."""
    if not len(cell_ids):
        return
    now = utcnow()
    WRITE_CONSENSUS.run(
        session,
        [
            {
                "cell": cell_id,
                "logodds": float(lo),
                "posterior": float(q),
                "n_votes": int(n),
                "n_yes": int(y),
                "method": method,
                "at": now,
            }
            for cell_id, lo, q, n, y in zip(
                cell_ids,
                np.asarray(logodds, dtype=np.float64),
                np.asarray(posterior, dtype=np.float64),
                np.asarray(n_votes),
                np.asarray(n_yes),
                strict=True,
            )
        ],
    )


@dataclass(frozen=True)
class Fusing:
    """One task as the fuser takes it: its volunteer and the unknown cells it answered."""

    task_id: int
    volunteer_id: int
    cell_ids: list[int]


def agreement_increments(
    session: Session, *, tasks: list[Fusing], base: Mapping[int, float] | None = None
) -> dict[int, np.ndarray]:
    """Credibility increments (soft counts, ``COUNT_COLUMNS`` order) from agreement, for fusing
    ``tasks`` in this order (``ml.aggregation.credibility.agreement_credit``): as each task is
    fused, every vote of a cell that has just reached ``AGREEMENT_VOTES`` votes, and the task's
    own votes on cells past it; each vote is thus scored once. Votes count as of fusing each
    task: those of tasks fused before, of the tasks before it in ``tasks`` and its own, not
    those still waiting for the fuser. Credibility is as stored (a batch adds its increments
    once, after). ``base``: per cell id, the log-odds its votes are scored against before they
    speak (``base_rates``; flat where missing). One query for the whole batch."""
    order = {t.task_id: i for i, t in enumerate(tasks)}
    cell_ids = sorted({c for t in tasks for c in t.cell_ids})
    if not cell_ids:
        return {}
    votes = cell_votes(session, cell_ids=cell_ids, fused_and=order)
    index = {c: i for i, c in enumerate(cell_ids)}
    base_logodds = np.array([(base or {}).get(c, 0.0) for c in cell_ids])
    worker = {v: i for i, v in enumerate(votes.volunteers)}
    rank = np.array([order.get(int(t), -1) for t in votes.task], dtype=np.int64)  # -1: fused
    of_cell: list[list[int]] = [[] for _ in cell_ids]
    for k, c in enumerate(votes.cell):
        of_cell[c].append(k)
    soft = np.zeros((len(votes.volunteers), 4))
    for i, task in enumerate(tasks):
        if task.volunteer_id not in worker:  # banned: their votes are not counted
            continue
        ks = np.array([k for c in task.cell_ids for k in of_cell[index[c]]], dtype=np.intp)
        ks = ks[rank[ks] <= i] if ks.size else ks
        if not ks.size:
            continue
        cell = votes.cell[ks]
        n_votes = np.bincount(cell)[cell]
        mine = votes.worker[ks] == worker[task.volunteer_id]
        credit = (n_votes == AGREEMENT_VOTES) | (mine & (n_votes > AGREEMENT_VOTES))
        if credit.any():
            soft += agreement_credit(
                cell,
                votes.worker[ks],
                votes.label[ks],
                credit,
                votes.counts,
                base_logodds=base_logodds,
            )
    rows = np.hstack([soft, np.zeros((len(votes.volunteers), len(COUNT_COLUMNS) - 4))])
    return {v: rows[i] for i, v in enumerate(votes.volunteers) if rows[i].any()}


BASE_RATE_TTL_S = 60.0  # how long a process keeps a project's base rates before reading again
_base_rates: dict[tuple[str, int, object], tuple[float, dict[int, float]]] = {}
# Per level of the pyramid: the project's control squares inside their images, and those of them
# that gold says are empty.
CONTROL_SQUARES = (
    select(Cell.level, func.count(Cell.id), func.count(Gold.cell_id))
    .join(Target, (Target.id == Cell.target_id) & Target.control)
    .outerjoin(Gold, (Gold.cell_id == Cell.id) & Gold.label.is_(False) & Gold.frozen.is_(False))
    .where(
        Target.project_id == bindparam("project_id"),
        Cell.retire_reason.is_distinct_from(RetireReason.OUTSIDE),
    )
    .group_by(Cell.level)
)


def base_rates(session: Session, *, project: Project) -> dict[int, float]:
    """Per level of the pyramid, the log-odds that a square shows its tag, from the project's
    control truth (outside the crowd's votes): the share of control squares that are not known
    empty, Laplace-smoothed (flat without control targets). Agreement scores votes against it
    (``agreement_credit``). A square that shows any of the object counts: what volunteers are
    asked. Read at most every ``BASE_RATE_TTL_S`` per process (control truth changes rarely)."""
    key = (str(session.get_bind().engine.url), project.id, project.created_at)
    now = time.monotonic()
    cached = _base_rates.get(key)
    if cached is not None and now - cached[0] < BASE_RATE_TTL_S:
        return cached[1]
    rates = {
        int(level): float(np.log((n - empty + 1.0) / (empty + 1.0)))
        for level, n, empty in session.execute(CONTROL_SQUARES, {"project_id": project.id})
    }
    _base_rates[key] = (now, rates)
    return rates


# Statements of the answer path built once (building one and keying it for SQLAlchemy's cache
# cost more than running it): their values are bound per call.
GOLD_LABELS = Prepared(
    select(Gold.cell_id, Gold.label).where(
        Gold.cell_id.in_(bindparam("cell_ids", expanding=True)), Gold.frozen.is_(False)
    )
)


def gold_labels(session: Session, *, cell_ids: Iterable[int]) -> dict[int, bool]:
    """Known answers of the served (non-frozen) gold among ``cell_ids``."""
    ids = list(cell_ids)
    return dict(GOLD_LABELS.run(session, {"cell_ids": ids}).rows) if ids else {}
