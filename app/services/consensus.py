"""Consensus on the database: cell posteriors, retirement, refinement, completion and full EM.

The numbers come from ``ml.aggregation``; this module loads what they need and writes back what
they decide. A cell's posterior is recomputed from all its votes whenever it gets a new one
(``refresh_cells``); ``settle_target`` then retires confident cells, opens deeper windows on the
object's border, closes answered windows, and completes the target (or sends it to triage)
when nothing is left open. Retirement counts credible votes (``budget_shares``), so that random
clickers cannot spend a cell's vote budget before people who look have answered it.
``recompute_project`` runs the batch two-coin EM over every vote of a project and reconciles
credibility and posteriors, leaving banned volunteers out.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import utcnow
from app.models import (
    Cell,
    CellStatus,
    Consensus,
    Credibility,
    Gold,
    Image,
    MaskSource,
    MaskVersion,
    Project,
    RetireReason,
    Target,
    TargetState,
    Volunteer,
    Vote,
    Window,
    WindowState,
)
from app.services.campaign import (
    Truth,
    load_truth,
    open_windows,
    refinement_config,
    window_value,
)
from app.services.target import add_mask_version
from app.storage import FileStore
from ml.aggregation import grid
from ml.aggregation.credibility import (
    COUNT_FIELDS,
    WorkerCounts,
    budget_shares,
    cells_logodds,
    sensitivity_specificity,
)
from ml.aggregation.rules import (
    INHERIT_CLIP,
    INHERIT_SHRINK,
    Retirement,
    RetirementConfig,
    choose_refinements,
    confirmation_votes,
    inherited_prior,
    leaf_cells,
    retire,
)

COUNT_COLUMNS = COUNT_FIELDS  # Credibility's columns are WorkerCounts' fields


def retirement_config(project: Project) -> RetirementConfig:
    return RetirementConfig(
        confidence=float(project.setting("retire_confidence")),
        min_votes=int(project.setting("min_votes")),
        max_votes=int(project.setting("vote_budget")),
    )


def worker_counts(session: Session, volunteer_ids: list[int]) -> WorkerCounts:
    """The stored credibility counts of these volunteers, in their order (zeros if none)."""
    rows = {
        c.volunteer_id: [getattr(c, k) for k in COUNT_COLUMNS]
        for c in session.scalars(
            select(Credibility).where(
                Credibility.volunteer_id.in_(volunteer_ids), Credibility.category == ""
            )
        )
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
    """New posteriors, vote counts and credible votes (``budget_shares``: what retirement
    counts) of refreshed cells. Shape: each ``(n_cells,)``."""

    posterior: np.ndarray
    n_votes: np.ndarray
    credible: np.ndarray


@dataclass(frozen=True)
class CellVotes:
    """The counted votes (not banned volunteers') of some cells. Shape: the vote arrays
    ``(n_votes,)``; ``counts`` one row per distinct voter."""

    cell: npt.NDArray[np.intp]  # index into the cells asked for
    worker: npt.NDArray[np.intp]  # index into counts
    label: npt.NDArray[np.int8]
    counts: WorkerCounts

    def credible(self, n_cells: int) -> np.ndarray:
        """Credible votes per cell: each vote weighed by its volunteer's budget share."""
        shares = budget_shares(self.counts)[self.worker]
        return np.bincount(self.cell, weights=shares, minlength=n_cells)


def cell_votes(session: Session, *, cell_ids: list[int]) -> CellVotes:
    index = {c: i for i, c in enumerate(cell_ids)}
    votes = session.execute(
        select(Vote.cell_id, Vote.volunteer_id, Vote.label)
        .join(Volunteer, Volunteer.id == Vote.volunteer_id)
        .where(Vote.cell_id.in_(index), Volunteer.banned.is_(False))
    ).all()
    volunteers = sorted({v for _, v, _ in votes})
    worker = {v: i for i, v in enumerate(volunteers)}
    return CellVotes(
        cell=np.array([index[c] for c, _, _ in votes], dtype=np.intp),
        worker=np.array([worker[v] for _, v, _ in votes], dtype=np.intp),
        label=np.array([int(y) for _, _, y in votes], dtype=np.int8),
        counts=worker_counts(session, volunteers),
    )


def refresh_cells(session: Session, *, cells: list[Cell]) -> Fresh:
    """Recompute the posteriors of ``cells`` from all their counted votes."""
    if not cells:
        return Fresh(np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros(0))
    votes = cell_votes(session, cell_ids=[c.id for c in cells])
    logodds = cells_logodds(
        [c.prior_logodds for c in cells], votes.cell, votes.worker, votes.label, votes.counts
    )
    n_votes = np.bincount(votes.cell, minlength=len(cells))
    n_yes = np.bincount(votes.cell, weights=votes.label, minlength=len(cells))
    posterior = 1.0 / (1.0 + np.exp(-logodds))
    now = utcnow()
    session.execute(
        update(Consensus),
        [
            {
                "cell_id": cell.id,
                "logodds": float(logodds[i]),
                "posterior": float(posterior[i]),
                "n_votes": int(n_votes[i]),
                "n_yes": int(n_yes[i]),
                "method": "online",
                "updated_at": now,
            }
            for i, cell in enumerate(cells)
        ],
    )
    return Fresh(posterior, n_votes, votes.credible(len(cells)))


# Cells retired on their votes follow them; gold, curator and model answers stand.
VOTED_REASONS = (RetireReason.CONFIDENT, RetireReason.BUDGET)


def retire_fresh(
    session: Session, project: Project, *, cells: list[Cell], fresh: Fresh
) -> tuple[set[int], int]:
    """Retire the refreshed cells that are now confident or out of budget, and re-decide the
    refreshed cells that had retired on their votes (``follow_evidence``).

    Returns the targets that had a cell retire or change (only those need refining and may
    complete), and how many cells retired.
    """
    open_at = [i for i, c in enumerate(cells) if c.status == CellStatus.OPEN]
    touched, retired = _retire(
        project,
        [cells[i] for i in open_at],
        fresh.posterior[open_at],
        fresh.credible[open_at],
    )
    voted_at = following(session, cells)
    followed = follow_evidence(
        session,
        project,
        [cells[i] for i in voted_at],
        fresh.posterior[voted_at],
        fresh.credible[voted_at],
    )
    return touched | {c.target_id for c in followed}, retired


def following(session: Session, cells: list[Cell]) -> list[int]:
    """Indices of the ``cells`` that follow their votes (``follow_evidence``): retired on their
    votes, in a target still collecting or finished by the consensus (a curator's mask stands).
    """
    voted = [
        i
        for i, c in enumerate(cells)
        if c.status == CellStatus.RETIRED and c.retire_reason in VOTED_REASONS
    ]
    target_ids = {cells[i].target_id for i in voted}
    states = dict(
        session.execute(select(Target.id, Target.state).where(Target.id.in_(target_ids))).all()
    )
    finished = [t for t, s in states.items() if s in (TargetState.COMPLETE, TargetState.TRIAGE)]
    latest: dict[int, MaskSource] = {}
    for target_id, source in session.execute(
        select(MaskVersion.target_id, MaskVersion.source)
        .where(MaskVersion.target_id.in_(finished))
        .order_by(MaskVersion.id)
    ):
        latest[target_id] = source
    open_to_votes = {
        t
        for t, s in states.items()
        if s == TargetState.COLLECTING or latest.get(t) == MaskSource.CONSENSUS
    }
    return [i for i in voted if cells[i].target_id in open_to_votes]


def _min_votes(project: Project, cells: list[Cell]) -> npt.NDArray[np.int64]:
    """Credible votes each cell needs before it may retire on confidence."""
    return confirmation_votes(
        [c.prior_logodds for c in cells],
        retirement_config(project),
        confirm_votes=int(project.setting("model_confirm_votes")),
    )


def _decide(
    project: Project, cells: list[Cell], posterior: npt.ArrayLike, credible: npt.ArrayLike
) -> Retirement:
    return retire(
        posterior,
        credible,
        config=retirement_config(project),
        min_votes=_min_votes(project, cells),
    )


def _retire(
    project: Project, cells: list[Cell], posterior: npt.ArrayLike, credible: npt.ArrayLike
) -> tuple[set[int], int]:
    """Retire the open ``cells`` that are confident (after enough credible votes) or out of
    budget (in credible votes)."""
    if not cells:
        return set(), 0
    decision = _decide(project, cells, posterior, credible)
    now, touched = utcnow(), set()
    for cell, done, unsure, label in zip(
        cells, decision.retired, decision.uncertain, decision.label, strict=True
    ):
        if not done:
            continue
        cell.status, cell.label, cell.uncertain = CellStatus.RETIRED, bool(label), bool(unsure)
        cell.retire_reason = RetireReason.BUDGET if unsure else RetireReason.CONFIDENT
        cell.retired_at = now
        touched.add(cell.target_id)
    return touched, int(decision.retired.sum())


def follow_evidence(
    session: Session,
    project: Project,
    cells: list[Cell],
    posterior: npt.ArrayLike,
    credible: npt.ArrayLike,
) -> list[Cell]:
    """Re-decide cells retired on their votes from the evidence as it is now.

    A cell's posterior moves after it retired: late votes of a window served before, and the
    credibility of its voters (gold answers, the EM pass). A volunteer found out as an adversary
    or a coin must not leave behind what their votes decided, so a retired cell is decided again:

    - confident now (enough credible votes): retired on confidence, its label the posterior's;
    - retired on confidence before, and the evidence still backs its label (the posterior on
      the same side, enough credible votes): unchanged, though it is less sure than the bar;
    - out of budget (in credible votes): retired as uncertain, its label the posterior's;
    - else (the posterior crossed sides unsure, or the credible votes are too few): open again,
      with its window, for more votes.

    ``cells`` are cells that ``following`` picked. A target the consensus had finished collects
    again when one of its cells opens (its mask is composed anew when it finishes again).
    Returns the cells changed.
    """
    if not cells:
        return []
    q = np.asarray(posterior, dtype=np.float64)
    n = np.asarray(credible, dtype=np.float64)
    decision = _decide(project, cells, q, n)
    backed = n >= _min_votes(project, cells)
    changed = []
    for i, cell in enumerate(cells):
        label = bool(decision.label[i])
        still = cell.retire_reason == RetireReason.CONFIDENT and backed[i] and cell.label == label
        if decision.retired[i] and not decision.uncertain[i]:
            reason = RetireReason.CONFIDENT
        elif still:
            continue
        elif decision.retired[i]:
            reason = RetireReason.BUDGET
        else:
            _reopen(session, cell)
            changed.append(cell)
            continue
        if (cell.retire_reason, cell.label) != (reason, label):
            cell.retire_reason, cell.label = reason, label
            cell.uncertain = reason == RetireReason.BUDGET
            changed.append(cell)
    return changed


def _reopen(session: Session, cell: Cell) -> None:
    """Open a cell again, with its window, and its target if the consensus had finished it."""
    cell.status, cell.label, cell.uncertain = CellStatus.OPEN, None, False
    cell.retire_reason, cell.retired_at = None, None
    target = session.get(Target, cell.target_id)
    if target is not None and target.state != TargetState.COLLECTING:
        target.state, target.triage_reason = TargetState.COLLECTING, None
    window = session.get(Window, cell.window_id) if cell.window_id is not None else None
    if window is not None and window.state == WindowState.CLOSED:
        window.state, window.closed_at = WindowState.OPEN, None


def revalue_windows(session: Session, *, window_ids: set[int]) -> None:
    """Update the picker's value of open windows from their open cells' posteriors."""
    if not window_ids:
        return
    rows = session.execute(
        select(Window.id, Target.priority, Target.control, Consensus.posterior)
        .join(Target, Target.id == Window.target_id)
        .join(Cell, Cell.window_id == Window.id)
        .join(Consensus, Consensus.cell_id == Cell.id)
        .where(Window.id.in_(window_ids), Cell.status == CellStatus.OPEN)
    ).all()
    pending: dict[int, list[float]] = defaultdict(list)
    target_of: dict[int, tuple[float, bool]] = {}
    for window_id, prio, control, q in rows:
        pending[window_id].append(q)
        target_of[window_id] = (prio, control)
    values = [
        {"id": w, "value": window_value(target_of[w][0], qs, control=target_of[w][1])}
        for w, qs in pending.items()
    ]
    session.execute(update(Window), values)


@dataclass
class Settled:
    retired: int = 0
    windows_opened: int = 0
    completed: bool = False
    triaged: bool = False


def _target_state(session: Session, target: Target) -> tuple[list[Cell], dict[int, Consensus]]:
    """The target's cells and their consensus as committed now (a concurrent settler's too)."""
    fresh = {"populate_existing": True}
    cells = list(
        session.scalars(select(Cell).where(Cell.target_id == target.id).execution_options(**fresh))
    )
    consensus = {
        c.cell_id: c
        for c in session.scalars(
            select(Consensus)
            .where(Consensus.cell_id.in_([c.id for c in cells]))
            .execution_options(**fresh)
        )
    }
    return cells, consensus


def _retire_open(
    session: Session, project: Project, cells: list[Cell], consensus: dict[int, Consensus]
) -> int:
    open_cells = [c for c in cells if c.status == CellStatus.OPEN]
    voted = [i for i, c in enumerate(open_cells) if consensus[c.id].n_votes > 0]
    credible = np.zeros(len(open_cells))
    if voted:  # a cell nobody answered yet (a new window's) has no credible vote to load
        votes = cell_votes(session, cell_ids=[open_cells[i].id for i in voted])
        credible[voted] = votes.credible(len(voted))
    posterior = [consensus[c.id].posterior for c in open_cells]
    return _retire(project, open_cells, posterior, credible)[1]


def _refine(
    session: Session,
    settings: Settings,
    project: Project,
    target: Target,
    image: Image,
    cells: list[Cell],
) -> int:
    retired = [c for c in cells if c.status == CellStatus.RETIRED]
    windows = session.scalars(select(Window).where(Window.target_id == target.id))
    opened = {grid.Cell(w.level, w.row, w.col) for w in windows}
    deeper = choose_refinements(
        [grid.Cell(c.level, c.row, c.col) for c in retired],
        [int(bool(c.label)) for c in retired],
        image.height,
        image.width,
        prior_logodds=[c.prior_logodds for c in retired],
        uncertain=[c.uncertain for c in retired],
        opened=opened,
        config=refinement_config(project),
    )
    if not deeper:
        return 0
    mask = load_truth(session, settings, target)
    truth = Truth(mask=mask, frozen=True) if mask is not None else None
    by_address = {grid.Cell(c.level, c.row, c.col): c for c in retired}
    logodds = dict(
        session.execute(
            select(Consensus.cell_id, Consensus.logodds).where(
                Consensus.cell_id.in_([by_address[p].id for p in deeper])
            )
        ).all()
    )
    parent_logodds = [
        (INHERIT_CLIP / INHERIT_SHRINK) * (1 if by_address[p].label else -1)
        if by_address[p].retire_reason in (RetireReason.GOLD, RetireReason.CURATOR)
        else logodds.get(by_address[p].id, 0.0)
        for p in deeper
    ]
    priors = [[float(v)] * 9 for v in inherited_prior(parent_logodds)]
    open_windows(session, target=target, parents=deeper, truth=truth, prior_logodds=priors)
    return len(deeper)


def _update_windows(
    session: Session, target: Target, cells: list[Cell], consensus: dict[int, Consensus]
) -> int:
    """Close answered windows, re-value the others. Returns how many stay open."""
    by_window: dict[int, list[Cell]] = defaultdict(list)
    for cell in cells:
        if cell.window_id is not None:
            by_window[cell.window_id].append(cell)
    still_open = 0
    for window in session.scalars(
        select(Window).where(Window.target_id == target.id, Window.state == WindowState.OPEN)
    ):
        pending = [c for c in by_window[window.id] if c.status == CellStatus.OPEN]
        if window.known:
            continue
        if not pending and by_window[window.id]:
            window.state, window.closed_at, window.value = WindowState.CLOSED, utcnow(), 0.0
            continue
        window.value = window_value(
            target.priority, [consensus[c.id].posterior for c in pending], control=target.control
        )
        still_open += 1
    return still_open


def compose_cells(
    session: Session, *, image: Image, cells: list[Cell]
) -> tuple[np.ndarray, np.ndarray]:
    """A target's mask from its finest cells, retired or not: gold and curator answers as 0/1,
    every other cell its posterior.

    Shape: returns soft ``(H, W)`` float and hard ``(H, W)`` bool."""
    addresses = [grid.Cell(c.level, c.row, c.col) for c in cells]
    leaves = [c for c, leaf in zip(cells, leaf_cells(addresses), strict=True) if leaf]
    posteriors = dict(
        session.execute(
            select(Consensus.cell_id, Consensus.posterior).where(
                Consensus.cell_id.in_([c.id for c in leaves])
            )
        ).all()
    )
    probs = [
        float(bool(c.label))
        if c.retire_reason in (RetireReason.GOLD, RetireReason.CURATOR)
        else posteriors[c.id]
        for c in leaves
    ]
    return grid.compose(
        [grid.Cell(c.level, c.row, c.col) for c in leaves], probs, image.height, image.width
    )


def _complete(
    session: Session, settings: Settings, target: Target, image: Image, cells: list[Cell]
) -> bool:
    """Compose the final mask from the finest retired cells. Returns whether it is uncertain."""
    soft, hard = compose_cells(session, image=image, cells=cells)
    add_mask_version(
        session,
        target=target,
        mask=hard,
        soft=soft,
        source=MaskSource.CONSENSUS,
        store=FileStore(settings.masks_dir),
        written=[],
    )
    is_leaf = leaf_cells([grid.Cell(c.level, c.row, c.col) for c in cells])
    return any(c.uncertain for c, leaf in zip(cells, is_leaf, strict=True) if leaf)


def settle_target(
    session: Session, *, settings: Settings, project: Project, target: Target
) -> Settled:
    """Retire, refine, close windows and complete one target after new votes.

    A control target's pyramid was opened from its truth: its ambiguous cells retire like any
    other, but it neither refines nor completes (its mask is its truth).
    """
    result = Settled()
    if target.state != TargetState.COLLECTING:
        return result
    image = session.get(Image, target.image_id)
    assert image is not None
    cells, consensus = _target_state(session, target)
    result.retired = _retire_open(session, project, cells, consensus)
    if not target.control:
        result.windows_opened = _refine(session, settings, project, target, image, cells)
    if result.windows_opened:
        session.flush()
        cells, consensus = _target_state(session, target)
    if _update_windows(session, target, cells, consensus) > 0 or target.control:
        return result
    uncertain = _complete(session, settings, target, image, cells)
    target.state = TargetState.TRIAGE if uncertain else TargetState.COMPLETE
    target.triage_reason = "cells still uncertain after their vote budget" if uncertain else None
    result.completed, result.triaged = not uncertain, uncertain
    return result


def settle_targets(
    session: Session, *, settings: Settings, project: Project, target_ids: Iterable[int]
) -> list[Settled]:
    targets = lock_targets(session, target_ids=target_ids)
    return [settle_target(session, settings=settings, project=project, target=t) for t in targets]


def lock_targets(session: Session, *, target_ids: Iterable[int]) -> list[Target]:
    """Hold these targets' rows until the transaction ends, re-read once the lock is held.

    One writer per target at a time: two submissions on one target would otherwise both count
    their cells' votes without the other's, or both open the same finer window (PostgreSQL;
    SQLite has one writer anyway). Locks are taken in id order, so writers never deadlock.
    """
    return list(
        session.scalars(
            select(Target)
            .where(Target.id.in_(sorted(set(target_ids))))
            .order_by(Target.id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    )


def gold_labels(session: Session, *, cell_ids: Iterable[int]) -> dict[int, bool]:
    """Known answers of the served (non-frozen) gold among ``cell_ids``."""
    rows = session.execute(
        select(Gold.cell_id, Gold.label).where(
            Gold.cell_id.in_(list(cell_ids)), Gold.frozen.is_(False)
        )
    )
    return dict(rows.all())
