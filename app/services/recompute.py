"""The periodic full EM pass: re-estimate every posterior and every credibility of a project.

Between passes, posteriors are updated online with the credibility of the moment and
credibility moves only on gold (``ml.aggregation.credibility``). This pass runs the batch
two-coin Dawid-Skene over every counted vote of the project (banned volunteers' votes are left
out, nothing is deleted), writes back posteriors and credibility, updates the labels of cells
retired on confidence, and settles the targets again. It also learns again how far to trust the
tagger's guesses of each tag from the crowd's verdicts on them (``_learn_guesses``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.models import (
    VOTED_REASONS,
    Cell,
    CellStatus,
    Consensus,
    Gold,
    Project,
    RetireReason,
    Tag,
    Target,
    TargetState,
    Volunteer,
    Vote,
    Window,
    WindowState,
)
from app.services.crowd.consensus import COUNT_COLUMNS, write_consensus
from app.services.crowd.retirement import follow_evidence, following
from app.services.crowd.settle import lock_targets, revalue_windows, settle_targets
from app.services.target import learn_guess_corrections
from app.services.volunteer import credibility_of
from ml.aggregation.credibility import WorkerCounts, budget_shares, supporting_votes
from ml.aggregation.dawid_skene import dawid_skene, gold_counts
from ml.aggregation.votes import Votes, make_votes

# A tag's guess correction (log-odds) that moved less than this leaves its windows' values.
GUESS_EPSILON = 0.05
# A cell whose posterior moved less than this cannot have crossed a retirement threshold that
# the online update had not already tested.
SETTLE_EPSILON = 1e-3


@dataclass(frozen=True)
class RecomputeReport:
    votes: int
    cells: int
    volunteers: int
    iterations: int
    labels_changed: int


def _counted_votes(session: Session, project: Project) -> list[tuple[int, int, bool]]:
    rows = session.execute(
        select(Vote.cell_id, Vote.volunteer_id, Vote.label)
        .join(Cell, Cell.id == Vote.cell_id)
        .join(Target, Target.id == Cell.target_id)
        .join(Volunteer, Volunteer.id == Vote.volunteer_id)
        .where(Target.project_id == project.id, Volunteer.banned.is_(False))
    )
    return [(c, v, bool(y)) for c, v, y in rows]


def _reset_uncounted(session: Session, project: Project, counted: set[int]) -> set[int]:
    """Cells whose every vote stopped counting fall back to their prior."""
    stale = session.execute(
        select(Consensus.cell_id, Cell.prior_logodds)
        .join(Cell, Cell.id == Consensus.cell_id)
        .join(Target, Target.id == Cell.target_id)
        .where(Target.project_id == project.id, Consensus.n_votes > 0)
    ).all()
    reset = [(cell_id, prior) for cell_id, prior in stale if cell_id not in counted]
    priors = np.array([prior for _, prior in reset], dtype=np.float64)
    write_consensus(
        session,
        cell_ids=[cell_id for cell_id, _ in reset],
        logodds=priors,
        posterior=1 / (1 + np.exp(-priors)),
        n_votes=np.zeros(len(reset), dtype=np.int64),
        n_yes=np.zeros(len(reset), dtype=np.int64),
        method="em",
    )
    return {cell_id for cell_id, _ in reset}


def recompute_project(session: Session, *, settings: Settings, project: Project) -> RecomputeReport:
    """Run the batch EM over the project's counted votes and write everything back.

    The project's targets are held first (as every submission holds its own), so that no vote
    lands between the read and the write-back and is then overwritten by this older count.
    """
    lock_targets(
        session,
        target_ids=session.scalars(select(Target.id).where(Target.project_id == project.id)),
    )
    rows = _counted_votes(session, project)
    cell_ids = sorted({c for c, _, _ in rows})
    volunteer_ids = sorted({v for _, v, _ in rows})
    reset = _reset_uncounted(session, project, set(cell_ids))
    reset |= _follow_reset(session, project, reset)
    if not rows:
        _settle_cells(session, settings, project, reset)
        _learn_guesses(session, project)
        return RecomputeReport(0, 0, 0, 0, 0)
    item = {c: i for i, c in enumerate(cell_ids)}
    worker = {v: i for i, v in enumerate(volunteer_ids)}
    votes = make_votes(
        [worker[v] for _, v, _ in rows],
        [item[c] for c, _, _ in rows],
        [int(y) for _, _, y in rows],
        n_workers=len(volunteer_ids),
        n_items=len(cell_ids),
    )
    gold = np.full(len(cell_ids), -1, dtype=np.int8)
    for cell_id, label in session.execute(
        select(Gold.cell_id, Gold.label).where(Gold.cell_id.in_(cell_ids), Gold.frozen.is_(False))
    ):
        gold[item[cell_id]] = int(label)
    cells = {c.id: c for c in session.scalars(select(Cell).where(Cell.id.in_(cell_ids)))}
    prior = np.array([cells[c].prior_logodds for c in cell_ids])
    result = dawid_skene(votes, gold=gold, prior_logodds=prior)
    before = dict(
        session.execute(
            select(Consensus.cell_id, Consensus.posterior).where(Consensus.cell_id.in_(cell_ids))
        ).all()
    )
    # The order submissions lock in: (targets,) credibility, consensus.
    counts = _write_credibility(session, volunteer_ids, votes, result.posterior, gold)
    _write_posteriors(session, cell_ids, votes, result.posterior, result.logodds)
    credible = np.bincount(
        votes.item, weights=budget_shares(counts)[votes.worker], minlength=len(cell_ids)
    )
    supported = supporting_votes(
        votes.item, votes.worker, votes.label, counts, n_cells=len(cell_ids)
    )
    relabeled = _follow_votes(
        session, project, cells, cell_ids, result.posterior, credible, supported
    )
    moved = {
        c for i, c in enumerate(cell_ids) if abs(result.posterior[i] - before[c]) > SETTLE_EPSILON
    }
    _settle_cells(session, settings, project, moved | relabeled | reset)
    _learn_guesses(session, project)
    return RecomputeReport(
        votes=len(rows),
        cells=len(cell_ids),
        volunteers=len(volunteer_ids),
        iterations=result.iterations,
        labels_changed=len(relabeled),
    )


def _settle_cells(
    session: Session, settings: Settings, project: Project, cell_ids: set[int]
) -> None:
    """Settle the collecting targets of these cells (the ones whose posterior moved): settling
    every target took two thirds of a pass, under the write lock."""
    session.flush()
    collecting = session.scalars(
        select(Target.id)
        .join(Cell, Cell.target_id == Target.id)
        .where(Cell.id.in_(cell_ids), Target.state == TargetState.COLLECTING)
        .distinct()
    )
    settle_targets(session, settings=settings, project=project, target_ids=list(collecting))


def _learn_guesses(session: Session, project: Project) -> None:
    """Learn again how far to trust the tagger's guesses of each tag from the crowd's verdicts
    (``learn_guess_corrections``), and value the open windows of the tags whose correction
    moved: a wrong tagger's guesses leave the queue between the loop's rounds, which are hours
    apart (measured on a demo campaign: 140 of its 1,204 grids went to wrong guesses between its
    second and third rounds)."""
    tags = select(Tag.id, Tag.guess_logodds).where(Tag.project_id == project.id)
    before = {tag_id: logodds for tag_id, logodds in session.execute(tags)}
    learn_guess_corrections(session, project_id=project.id)
    moved = [
        tag_id
        for tag_id, logodds in session.execute(tags)
        if abs(logodds - before.get(tag_id, 0.0)) > GUESS_EPSILON
    ]
    if moved:
        revalue_windows(
            session,
            window_ids=set(
                session.scalars(
                    select(Window.id).where(
                        Window.tag_id.in_(moved), Window.state == WindowState.OPEN
                    )
                )
            ),
        )


def _write_posteriors(
    session: Session, cell_ids: list[int], votes: Votes, posterior: np.ndarray, logodds: np.ndarray
) -> None:
    # One executemany: a statement per cell, with the ORM's session synchronisation, took
    # 12 ms a cell (135 s for 11k cells) while holding the write lock.
    write_consensus(
        session,
        cell_ids=cell_ids,
        logodds=logodds,
        posterior=posterior,
        n_votes=np.bincount(votes.item, minlength=len(cell_ids)),
        n_yes=np.bincount(votes.item, weights=votes.label, minlength=len(cell_ids)),
        method="em",
    )


def _write_credibility(
    session: Session,
    volunteer_ids: list[int],
    votes: Votes,
    posterior: np.ndarray,
    gold: np.ndarray,
) -> WorkerCounts:
    """Write the new credibility counts; returns them (rows in ``volunteer_ids`` order)."""
    q = posterior[votes.item]
    y = votes.label.astype(np.float64)
    n = len(volunteer_ids)
    soft = [
        np.bincount(votes.worker, weights=w, minlength=n)
        for w in (q * y, q * (1 - y), (1 - q) * (1 - y), (1 - q) * y)
    ]
    exact = [np.asarray(e, dtype=np.float64) for e in gold_counts(votes, gold)]
    for i, volunteer_id in enumerate(volunteer_ids):
        row = credibility_of(session, volunteer_id=volunteer_id)
        for name, value in zip(COUNT_COLUMNS, [*soft, *exact], strict=True):
            setattr(
                row, name, float(value[i]) if name.startswith(("pos", "neg")) else int(value[i])
            )
    return WorkerCounts.from_rows(np.column_stack([*soft, *exact]))


def _follow_votes(
    session: Session,
    project: Project,
    cells: dict[int, Cell],
    cell_ids: list[int],
    posterior: np.ndarray,
    credible: np.ndarray,
    supported: np.ndarray,
) -> set[int]:
    """Cells retired on their votes follow the new posteriors: those ``following`` picks are
    decided again (``follow_evidence``: relabelled, uncertain, or opened again); in targets a
    curator finished only their labels follow. Returns the cells changed."""
    again = following(session, [cells[c] for c in cell_ids])
    changed, followed_at = set(), set(again)
    for i, cell_id in enumerate(cell_ids):
        cell = cells[cell_id]
        if i in followed_at:
            continue
        if cell.status == CellStatus.RETIRED and cell.retire_reason in VOTED_REASONS:
            split = cell.retire_reason == RetireReason.SPLIT
            label = split or bool(posterior[i] >= 0.5)
            if cell.label != label:
                cell.label = label
                changed.add(cell_id)
    followed = follow_evidence(
        session,
        project,
        [cells[cell_ids[i]] for i in again],
        posterior[again],
        credible[again],
        supported[again],
    )
    return changed | {c.id for c in followed}


def _follow_reset(session: Session, project: Project, reset: set[int]) -> set[int]:
    """Cells left without a counted vote (their voters banned) that had retired on those votes
    open again. Returns them."""
    candidates = list(session.scalars(select(Cell).where(Cell.id.in_(reset))))
    cells = [candidates[i] for i in following(session, candidates)]
    prior = np.array([c.prior_logodds for c in cells])
    nothing = np.zeros(len(cells))
    followed = follow_evidence(session, project, cells, 1 / (1 + np.exp(-prior)), nothing, nothing)
    return {c.id for c in followed}
