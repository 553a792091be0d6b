"""Retirement: which cells are done, and cells retired on their votes following them.

A cell retires when it is confident after enough credible votes, when credible volunteers
split on it (then as holding a sliver of the object, for its finer window to settle:
``ml.aggregation.rules``), or when its budget of credible votes is spent (then as uncertain).
Votes are counted by credibility (``budget_shares``), so that random clickers cannot spend a
cell's budget before people who look have answered it. A cell retired on its votes is decided
again whenever its evidence moves (``follow_evidence``): bad actors found out later leave
nothing behind.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from app.db import utcnow
from app.dbapi import Prepared
from app.models import (
    VOTED_REASONS,
    Cell,
    CellStatus,
    MaskSource,
    MaskVersion,
    Project,
    RetireReason,
    Target,
    TargetState,
    Window,
    WindowState,
)
from app.services.crowd.consensus import Fresh
from app.services.target import reopen_unions_above
from ml.aggregation.rules import Retirement, RetirementConfig, confirmation_votes, retire


def retirement_config(project: Project) -> RetirementConfig:
    return RetirementConfig(
        confidence=float(project.setting("retire_confidence")),
        min_votes=int(project.setting("min_votes")),
        max_votes=int(project.setting("vote_budget")),
        split_votes=float(project.setting("split_votes")),
    )


def retire_fresh(
    session: Session, project: Project, *, cells: list[Cell], fresh: Fresh
) -> tuple[set[int], int]:
    """Retire the refreshed cells that are now confident or out of budget, and re-decide the
    refreshed cells that had retired on their votes (``follow_evidence``).

    Returns the targets that had a cell retire or change (only those need refining and may
    complete), and how many cells retired.
    """
    open_at = [i for i, c in enumerate(cells) if c.status == CellStatus.OPEN]
    touched, retired = retire_cells(
        project,
        [cells[i] for i in open_at],
        fresh.posterior[open_at],
        fresh.credible[open_at],
        fresh.supported[open_at],
    )
    voted_at = following(session, cells)
    followed = follow_evidence(
        session,
        project,
        [cells[i] for i in voted_at],
        fresh.posterior[voted_at],
        fresh.credible[voted_at],
        fresh.supported[voted_at],
    )
    return touched | {c.target_id for c in followed}, retired


TARGET_STATES = Prepared(
    select(Target.id, Target.state).where(Target.id.in_(bindparam("target_ids", expanding=True)))
)
MASK_SOURCES = Prepared(
    select(MaskVersion.target_id, MaskVersion.source)
    .where(MaskVersion.target_id.in_(bindparam("target_ids", expanding=True)))
    .order_by(MaskVersion.id)
)


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
    states = dict(TARGET_STATES.run(session, {"target_ids": sorted(target_ids)}).rows)
    finished = [t for t, s in states.items() if s in (TargetState.COMPLETE, TargetState.TRIAGE)]
    latest: dict[int, MaskSource] = {}
    for target_id, source in MASK_SOURCES.run(session, {"target_ids": finished}).rows:
        latest[target_id] = source
    open_to_votes = {
        t
        for t, s in states.items()
        if s == TargetState.COLLECTING or latest.get(t) == MaskSource.CONSENSUS
    }
    return [i for i in voted if cells[i].target_id in open_to_votes]


def _min_votes(
    project: Project, cells: list[Cell], posterior: npt.ArrayLike
) -> npt.NDArray[np.int64]:
    """Credible votes each cell needs before it may retire on confidence (fewer where the votes
    confirm a sure prior: ``confirmation_votes``)."""
    return confirmation_votes(
        [c.prior_logodds for c in cells],
        retirement_config(project),
        confirm_votes=int(project.setting("model_confirm_votes")),
        posterior=posterior,
    )


def _decide(
    project: Project,
    cells: list[Cell],
    posterior: npt.ArrayLike,
    credible: npt.ArrayLike,
    supported: npt.ArrayLike,
) -> Retirement:
    return retire(
        posterior,
        credible,
        config=retirement_config(project),
        min_votes=_min_votes(project, cells, posterior),
        supported=supported,
    )


def _reason(decision: Retirement, i: int) -> RetireReason:
    if decision.uncertain[i]:
        return RetireReason.BUDGET
    return RetireReason.SPLIT if decision.split[i] else RetireReason.CONFIDENT


def retire_cells(
    project: Project,
    cells: list[Cell],
    posterior: npt.ArrayLike,
    credible: npt.ArrayLike,
    supported: npt.ArrayLike,
) -> tuple[set[int], int]:
    """Retire the open ``cells`` that are confident (after enough credible votes), split
    (``supported``: their credible votes for the object) or out of budget (in credible votes).
    """
    if not cells:
        return set(), 0
    decision = _decide(project, cells, posterior, credible, supported)
    now, touched = utcnow(), set()
    for i, cell in enumerate(cells):
        if not decision.retired[i]:
            continue
        cell.status, cell.label = CellStatus.RETIRED, bool(decision.label[i])
        cell.uncertain = bool(decision.uncertain[i])
        cell.retire_reason = _reason(decision, i)
        cell.retired_at = now
        touched.add(cell.target_id)
    return touched, int(decision.retired.sum())


def follow_evidence(
    session: Session,
    project: Project,
    cells: list[Cell],
    posterior: npt.ArrayLike,
    credible: npt.ArrayLike,
    supported: npt.ArrayLike,
) -> list[Cell]:
    """Re-decide cells retired on their votes from the evidence as it is now.

    A cell's posterior moves after it retired: late votes of a window served before, and the
    credibility of its voters (gold answers, the EM pass). A volunteer found out as an adversary
    or a coin must not leave behind what their votes decided, so a retired cell is decided again:

    - confident now (enough credible votes): retired on confidence, its label the posterior's;
    - split now (``ml.aggregation.rules.retire``): retired split, label 1;
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
    decision = _decide(project, cells, q, n, supported)
    backed = n >= _min_votes(project, cells, q)
    changed = []
    for i, cell in enumerate(cells):
        label = bool(decision.label[i])
        still = cell.retire_reason == RetireReason.CONFIDENT and backed[i] and cell.label == label
        if decision.retired[i] and not decision.uncertain[i]:
            reason = _reason(decision, i)
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
        reopen_unions_above(session, target=target)
    window = session.get(Window, cell.window_id) if cell.window_id is not None else None
    if window is not None and window.state == WindowState.CLOSED:
        window.state, window.closed_at = WindowState.OPEN, None
