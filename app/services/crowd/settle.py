"""Settling targets after new evidence: retire, refine the border, close answered windows and
complete the target (or send it to triage) when nothing is left open.

One writer per target: callers hold the targets' rows (``lock_targets``) while they settle.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import utcnow
from app.models import (
    Cell,
    CellStatus,
    Consensus,
    Image,
    Project,
    RetireReason,
    Target,
    TargetState,
    Window,
    WindowState,
)
from app.services.consensus import base_rates, cell_votes
from app.services.crowd.opening import (
    Truth,
    load_truth,
    open_windows,
    outside_image,
    refinement_config,
    window_value,
)
from app.services.crowd.retirement import VOTED_REASONS, retire_cells
from app.services.masks.composition import (
    cell_probability,
    has_evidence,
    record_consensus_mask,
)
from app.services.masks.union import finish_unions
from app.services.project import square_cells
from app.services.target import tag_belief, tag_beliefs, tag_is_known
from ml.aggregation import grid
from ml.aggregation.acquisition import object_area
from ml.aggregation.credibility import SUPPORT_RATIO
from ml.aggregation.rules import (
    CHILD_RATE,
    SEARCH_PRIOR,
    choose_refinements,
    inherited_prior,
    leaf_cells,
    search_small,
)
from ml.aggregation.votes import sigmoid

UNCERTAIN_REASON = "cells still uncertain after their vote budget"  # the triage reason


def _object_area(cells: Sequence[Cell], consensus: Mapping[int, CellConsensus]) -> float:
    """The object's expected area from the target's finest cells (``_area``)."""
    return _area(
        [_address(c) for c in cells],
        [cell_probability(c.label, c.retire_reason, consensus[c.id].posterior) for c in cells],
        [has_evidence(c.level, c.status, consensus[c.id].n_votes, c.retire_reason) for c in cells],
    )


def _area(
    cells: Sequence[grid.Cell], posterior: Sequence[float], evidence: Sequence[bool]
) -> float:
    """The object's expected area (``acquisition.object_area``): the smaller of the areas its
    finest cells give with and without the cells that nobody has answered yet (``has_evidence``).

    Each is the area of the squares expected to show some of the object, which a partly
    covered square counts whole, so each overestimates the object, the less the finer its
    squares. A refined square's unanswered children, at the share of a border square's
    children that show the object, tighten its parent's whole square; the 81 squares of a
    small-object search, each a 5% guess of a sliver, would count 4 squares where nine first
    squares saw none (a search valued at a quarter of its worth, behind every large object's
    border)."""
    return min(_leaf_area(cells, posterior), _leaf_area(*_kept(cells, posterior, evidence)))


def _kept(
    cells: Sequence[grid.Cell], posterior: Sequence[float], evidence: Sequence[bool]
) -> tuple[list[grid.Cell], list[float]]:
    kept = [i for i, e in enumerate(evidence) if e]
    return [cells[i] for i in kept], [posterior[i] for i in kept]


def _leaf_area(cells: Sequence[grid.Cell], posterior: Sequence[float]) -> float:
    leaf = leaf_cells(cells)
    return object_area(
        [c.level for c, f in zip(cells, leaf, strict=True) if f],
        [q for q, f in zip(posterior, leaf, strict=True) if f],
    )


# Every cell's place and posterior, of some targets: plain rows (there may be thousands).
CELL_POSTERIORS = (
    select(
        Cell.target_id,
        Cell.level,
        Cell.row,
        Cell.col,
        Cell.status,
        Cell.label,
        Cell.retire_reason,
        Consensus.n_votes,
        Consensus.posterior,
    )
    .join(Consensus, Consensus.cell_id == Cell.id)
    .where(Cell.target_id.in_(bindparam("target_ids", expanding=True)))
)


def target_areas(session: Session, *, target_ids: set[int]) -> dict[int, float]:
    """Each target's expected object area (fraction of the frame), from its finest cells that
    speak for their pixels in its mask (``_object_area``)."""
    cells: dict[int, list[grid.Cell]] = defaultdict(list)
    posterior: dict[int, list[float]] = defaultdict(list)
    evidence: dict[int, list[bool]] = defaultdict(list)
    for target_id, level, row, col, status, label, reason, n_votes, q in session.execute(
        CELL_POSTERIORS, {"target_ids": sorted(target_ids)}
    ):
        cells[target_id].append(grid.Cell(level, row, col))
        posterior[target_id].append(cell_probability(label, reason, q))
        evidence[target_id].append(has_evidence(level, status, n_votes, reason))
    return {t: _area(cells[t], posterior[t], evidence[t]) for t in cells}


OPEN_CELLS_OF_WINDOWS = (
    select(Window.id, Window.level, Window.target_id, Target.priority, Target.control)
    .add_columns(Consensus.posterior)
    .join(Target, Target.id == Window.target_id)
    .join(Cell, Cell.window_id == Window.id)
    .join(Consensus, Consensus.cell_id == Cell.id)
    .where(Window.id.in_(bindparam("window_ids", expanding=True)), Cell.status == CellStatus.OPEN)
)
_WINDOWS = Window.metadata.tables[Window.__tablename__]
WRITE_VALUES = (
    update(_WINDOWS).where(_WINDOWS.c.id == bindparam("window")).values(value=bindparam("value"))
)


def revalue_windows(session: Session, *, window_ids: set[int]) -> None:
    """Update the picker's value of open windows from their open cells' posteriors and their
    target's expected object area."""
    if not window_ids:
        return
    rows = session.execute(OPEN_CELLS_OF_WINDOWS, {"window_ids": sorted(window_ids)}).all()
    pending: dict[int, list[float]] = defaultdict(list)
    target_of: dict[int, tuple[int, int, float, bool]] = {}
    for window_id, level, target_id, prio, control, q in rows:
        pending[window_id].append(q)
        target_of[window_id] = (level, target_id, prio, control)
    target_ids = {t for _, t, _, _ in target_of.values()}
    areas = target_areas(session, target_ids=target_ids)
    beliefs = tag_beliefs(session, target_ids=target_ids)
    values = [
        {
            "window": w,
            "value": window_value(
                prio,
                qs,
                control=control,
                level=level,
                area=areas.get(target_id, 1.0),
                belief=beliefs.get(target_id, 1.0),
            ),
        }
        for w, qs in pending.items()
        for level, target_id, prio, control in [target_of[w]]
    ]
    if values:  # one executemany through the table
        session.execute(WRITE_VALUES, values)


@dataclass
class Settled:
    retired: int = 0
    windows_opened: int = 0
    completed: bool = False
    triaged: bool = False


class CellConsensus(NamedTuple):
    posterior: float
    n_votes: int


TARGET_STATE = (
    select(Cell, Consensus.posterior, Consensus.n_votes)
    .join(Consensus, Consensus.cell_id == Cell.id)
    .where(Cell.target_id == bindparam("target_id"))
    .execution_options(populate_existing=True)
)


def _target_state(session: Session, target: Target) -> tuple[list[Cell], dict[int, CellConsensus]]:
    """The target's cells and their consensus as committed now (a concurrent settler's too),
    in one statement."""
    rows = session.execute(TARGET_STATE, {"target_id": target.id}).all()
    return [c for c, _, _ in rows], {c.id: CellConsensus(q, n) for c, q, n in rows}


def _retire_open(
    session: Session, project: Project, cells: list[Cell], consensus: dict[int, CellConsensus]
) -> int:
    open_cells = [c for c in cells if c.status == CellStatus.OPEN]
    voted = [i for i, c in enumerate(open_cells) if consensus[c.id].n_votes > 0]
    credible, supported = np.zeros(len(open_cells)), np.zeros(len(open_cells))
    if voted:  # a cell nobody answered yet (a new window's) has no credible vote to load
        votes = cell_votes(session, cell_ids=[open_cells[i].id for i in voted])
        credible[voted] = votes.credible(len(voted))
        supported[voted] = votes.supporting(len(voted))
    posterior = [consensus[c.id].posterior for c in open_cells]
    return retire_cells(project, open_cells, posterior, credible, supported)[1]


def _disputed(session: Session, retired: list[Cell]) -> list[bool]:
    """Which retired cells are negative on their votes although a credible vote said yes
    (``SUPPORT_RATIO``); a gold or a curator's answer is not disputed."""
    voted = [i for i, c in enumerate(retired) if not c.label and c.retire_reason in VOTED_REASONS]
    disputed = [False] * len(retired)
    if voted:
        votes = cell_votes(session, cell_ids=[retired[i].id for i in voted])
        for i, llr in zip(voted, votes.strongest_yes(len(voted)), strict=True):
            disputed[i] = bool(llr >= np.log(SUPPORT_RATIO))
    return disputed


# The log-odds a gold or curator answer stands for: sure.
SURE_LOGODDS = 12.0


def _inherited(session: Session, project: Project, parents: list[Cell]) -> npt.NDArray[np.float64]:
    """The prior of each parent's children (``inherited_prior``): from its posterior, or from a
    gold or curator answer taken as sure, and the share of a border cell's children that show
    the object at the children's level, from the project's control truth (``base_rates``: its
    control pyramids open along the true border) or ``CHILD_RATE`` where it has none."""
    logodds = dict(
        session.execute(
            select(Consensus.cell_id, Consensus.logodds).where(
                Consensus.cell_id.in_([p.id for p in parents])
            )
        ).all()
    )
    rates = base_rates(session, project=project)
    return inherited_prior(
        [
            SURE_LOGODDS * (1 if p.label else -1)
            if p.retire_reason in (RetireReason.GOLD, RetireReason.CURATOR)
            else logodds.get(p.id, 0.0)
            for p in parents
        ],
        [
            float(sigmoid(rates[p.level + 1])) if p.level + 1 in rates else CHILD_RATE
            for p in parents
        ],
    )


def _address(cell: Cell) -> grid.Cell:
    return grid.Cell(cell.level, cell.row, cell.col)


def _refine(
    session: Session,
    settings: Settings,
    project: Project,
    target: Target,
    image: Image,
    cells: list[Cell],
) -> int:
    # A square wholly outside the image is no evidence of a border: the image's edge is not.
    retired = [c for c in cells if c.status == CellStatus.RETIRED and not outside_image(c)]
    windows = session.scalars(select(Window).where(Window.target_id == target.id))
    opened = {grid.Cell(w.level, w.row, w.col) for w in windows}
    deeper = choose_refinements(
        [grid.Cell(c.level, c.row, c.col) for c in retired],
        [int(bool(c.label)) for c in retired],
        image.height,
        image.width,
        prior_logodds=[c.prior_logodds for c in retired],
        uncertain=[c.uncertain for c in retired],
        disputed=_disputed(session, retired),
        opened=opened,
        config=refinement_config(project),
    )
    searching = not deeper and tag_is_known(session, target=target)
    if searching:
        deeper = search_small(
            [grid.Cell(c.level, c.row, c.col) for c in retired],
            [int(bool(c.label)) for c in retired],
            image.height,
            image.width,
            opened=opened,
            config=refinement_config(project),
        )
    if not deeper:
        return 0
    mask = load_truth(session, settings, target)
    truth = Truth(mask=mask, frozen=True) if mask is not None else None
    by_address = {grid.Cell(c.level, c.row, c.col): c for c in retired}
    if searching:
        inherited = [SEARCH_PRIOR] * len(deeper)
    else:
        inherited = list(_inherited(session, project, [by_address[p] for p in deeper]))
    priors = [[float(v)] * 9 for v in inherited]
    open_windows(
        session,
        target=target,
        parents=deeper,
        truth=truth,
        image=image,
        square=square_cells(project),
        prior_logodds=priors,
    )
    return len(deeper)


def _update_windows(
    session: Session, target: Target, cells: list[Cell], consensus: dict[int, CellConsensus]
) -> int:
    """Close answered windows, re-value the others. Returns how many stay open."""
    by_window: dict[int, list[Cell]] = defaultdict(list)
    for cell in cells:
        if cell.window_id is not None:
            by_window[cell.window_id].append(cell)
    still_open = 0
    area = _object_area(cells, consensus)
    belief = tag_belief(session, target=target)
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
            target.priority,
            [consensus[c.id].posterior for c in pending],
            control=target.control,
            level=window.level,
            area=area,
            belief=belief,
        )
        still_open += 1
    return still_open


def _complete(
    session: Session, settings: Settings, target: Target, image: Image, cells: list[Cell]
) -> bool:
    """Compose the final mask from the finest retired cells. Returns whether it is uncertain."""
    record_consensus_mask(session, settings=settings, target=target, image=image, cells=cells)
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
    target.triage_reason = UNCERTAIN_REASON if uncertain else None
    result.completed, result.triaged = not uncertain, uncertain
    finish_unions(session, settings=settings, target=target)
    return result


def settle_targets(
    session: Session, *, settings: Settings, project: Project, target_ids: Iterable[int]
) -> list[Settled]:
    targets = lock_targets(session, target_ids=target_ids)
    return [settle_target(session, settings=settings, project=project, target=t) for t in targets]


def lock_targets(session: Session, *, target_ids: Iterable[int]) -> list[Target]:
    """Hold these targets' rows until the transaction ends, re-read once the lock is held.

    One writer per target at a time: two fusers on one target would otherwise both count
    their cells' votes without the other's, or both open the same finer window (PostgreSQL;
    SQLite has one writer anyway). Locks are taken in id order, so writers never deadlock.
    ``FOR NO KEY UPDATE``, not ``FOR UPDATE``: a request that writes a row pointing at the
    target (a window's lease) takes the key-share lock of its foreign-key check, and must not
    wait for the fuser while the fuser waits for that row (a deadlock, measured under load).
    """
    return list(
        session.scalars(
            select(Target)
            .where(Target.id.in_(sorted(set(target_ids))))
            .order_by(Target.id)
            .with_for_update(key_share=True)
            .execution_options(populate_existing=True)
        )
    )
