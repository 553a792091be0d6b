"""Settling targets after new evidence: retire, refine the border, close answered windows and
complete the target (or send it to triage) when nothing is left open.

One writer per target: callers hold the targets' rows (``lock_targets``) while they settle.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import utcnow
from app.dbapi import Copies, Prepared
from app.models import (
    VOTED_REASONS,
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
from app.services.crowd.consensus import base_rates, cell_votes
from app.services.crowd.opening import (
    Truth,
    load_truth,
    open_windows,
    outside_image,
    refinement_config,
    window_value,
)
from app.services.crowd.retirement import retire_cells
from app.services.masks.composition import (
    cell_probability,
    has_evidence,
    record_consensus_mask,
)
from app.services.masks.union import finish_unions
from app.services.project import square_cells
from app.services.target import known_tags, tag_beliefs
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
CELL_POSTERIORS = Prepared(
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
    for target_id, level, row, col, status, label, reason, n_votes, q in CELL_POSTERIORS.run(
        session, {"target_ids": sorted(target_ids)}
    ).rows:
        cells[target_id].append(grid.Cell(level, row, col))
        posterior[target_id].append(cell_probability(label, reason, q))
        evidence[target_id].append(has_evidence(level, status, n_votes, reason))
    return {t: _area(cells[t], posterior[t], evidence[t]) for t in cells}


OPEN_CELLS_OF_WINDOWS = Prepared(
    select(Window.id, Window.level, Window.target_id, Target.priority, Target.control)
    .add_columns(Consensus.posterior)
    .join(Target, Target.id == Window.target_id)
    .join(Cell, Cell.window_id == Window.id)
    .join(Consensus, Consensus.cell_id == Cell.id)
    .where(Window.id.in_(bindparam("window_ids", expanding=True)), Cell.status == CellStatus.OPEN)
)
_WINDOWS = Window.metadata.tables[Window.__tablename__]
WRITE_VALUES = Prepared(
    update(_WINDOWS).where(_WINDOWS.c.id == bindparam("window")).values(value=bindparam("value"))
)


def revalue_windows(session: Session, *, window_ids: set[int]) -> None:
    """Update the picker's value of open windows from their open cells' posteriors and their
    target's expected object area."""
    if not window_ids:
        return
    rows = OPEN_CELLS_OF_WINDOWS.run(session, {"window_ids": sorted(window_ids)}).rows
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
        WRITE_VALUES.run(session, values)


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
    .where(Cell.target_id.in_(bindparam("target_ids", expanding=True)))
    .order_by(Cell.target_id, Cell.id)
    .execution_options(populate_existing=True)
)


class _State(NamedTuple):
    """A target's cells and their consensus."""

    cells: list[Cell]
    consensus: dict[int, CellConsensus]


def _target_states(session: Session, target_ids: Collection[int]) -> dict[int, _State]:
    """The targets' cells and their consensus as committed now (a concurrent settler's too),
    in one statement, by target id."""
    states = {t: _State([], {}) for t in target_ids}
    if not states:
        return states
    for cell, q, n in session.execute(TARGET_STATE, {"target_ids": sorted(states)}):
        state = states[cell.target_id]
        state.cells.append(cell)
        state.consensus[cell.id] = CellConsensus(q, n)
    return states


def _retire_open(session: Session, project: Project, states: Sequence[_State]) -> list[int]:
    """Retire the open cells of these targets that may retire now. Returns how many retired,
    per target."""
    owned = [(k, c) for k, s in enumerate(states) for c in s.cells if c.status == CellStatus.OPEN]
    open_cells = [c for _, c in owned]
    consensus = {i: q for s in states for i, q in s.consensus.items()}
    voted = [i for i, c in enumerate(open_cells) if consensus[c.id].n_votes > 0]
    credible, supported = np.zeros(len(open_cells)), np.zeros(len(open_cells))
    if voted:  # a cell nobody answered yet (a new window's) has no credible vote to load
        votes = cell_votes(session, cell_ids=[open_cells[i].id for i in voted])
        credible[voted] = votes.credible(len(voted))
        supported[voted] = votes.supporting(len(voted))
    posterior = [consensus[c.id].posterior for c in open_cells]
    retire_cells(project, open_cells, posterior, credible, supported)
    retired = [0] * len(states)
    for k, cell in owned:
        retired[k] += cell.status == CellStatus.RETIRED
    return retired


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


LOGODDS = Prepared(
    select(Consensus.cell_id, Consensus.logodds).where(
        Consensus.cell_id.in_(bindparam("cell_ids", expanding=True))
    )
)


def _inherited(session: Session, project: Project, parents: list[Cell]) -> npt.NDArray[np.float64]:
    """The prior of each parent's children (``inherited_prior``): from its posterior, or from a
    gold or curator answer taken as sure, and the share of a border cell's children that show
    the object at the children's level, from the project's control truth (``base_rates``: its
    control pyramids open along the true border) or ``CHILD_RATE`` where it has none."""
    logodds = dict(LOGODDS.run(session, {"cell_ids": [p.id for p in parents]}).rows)
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


WINDOW_PLACES = Prepared(
    select(Window.target_id, Window.level, Window.row, Window.col).where(
        Window.target_id.in_(bindparam("target_ids", expanding=True))
    )
)


class _Refining(NamedTuple):
    """What refining a target needs: its image, its cells and how sure its tag is."""

    target: Target
    image: Image
    cells: list[Cell]
    belief: float


def _refine(
    session: Session, settings: Settings, project: Project, targets: Sequence[_Refining]
) -> list[int]:
    """Open the finer windows these targets' retired cells call for (``choose_refinements``,
    or a small object's search, ``search_small``). Returns how many opened, per target."""
    # A square wholly outside the image is no evidence of a border: the image's edge is not.
    retired = [
        [c for c in t.cells if c.status == CellStatus.RETIRED and not outside_image(c)]
        for t in targets
    ]
    opened: dict[int, set[grid.Cell]] = defaultdict(set)
    if targets:
        places = {"target_ids": sorted({t.target.id for t in targets})}
        for target_id, level, row, col in WINDOW_PLACES.run(session, places).rows:
            opened[target_id].add(grid.Cell(level, row, col))
    every = [c for cells in retired for c in cells]
    disputed = iter(_disputed(session, every))
    config = refinement_config(project)
    deeper: list[list[grid.Cell]] = []
    for t, cells in zip(targets, retired, strict=True):
        deeper.append(
            choose_refinements(
                [_address(c) for c in cells],
                [int(bool(c.label)) for c in cells],
                t.image.height,
                t.image.width,
                prior_logodds=[c.prior_logodds for c in cells],
                uncertain=[c.uncertain for c in cells],
                disputed=[next(disputed) for _ in cells],
                opened=opened[t.target.id],
                config=config,
            )
        )
    unrefined = [t.target.id for t, d in zip(targets, deeper, strict=True) if not d]
    known = known_tags(session, target_ids=unrefined)
    counts = [0] * len(targets)
    for k, (t, cells) in enumerate(zip(targets, retired, strict=True)):
        searching = not deeper[k] and t.target.id in known
        if searching:
            deeper[k] = search_small(
                [_address(c) for c in cells],
                [int(bool(c.label)) for c in cells],
                t.image.height,
                t.image.width,
                opened=opened[t.target.id],
                config=config,
            )
        if not deeper[k]:
            continue
        mask = load_truth(session, settings, t.target)
        truth = Truth(mask=mask, frozen=True) if mask is not None else None
        if searching:
            inherited = [SEARCH_PRIOR] * len(deeper[k])
        else:
            by_address = {_address(c): c for c in cells}
            inherited = list(_inherited(session, project, [by_address[p] for p in deeper[k]]))
        open_windows(
            session,
            target=t.target,
            parents=deeper[k],
            truth=truth,
            image=t.image,
            square=square_cells(project),
            prior_logodds=[[float(v)] * 9 for v in inherited],
            belief=t.belief,
        )
        counts[k] = len(deeper[k])
    return counts


OPEN_WINDOWS = (
    select(Window)
    .where(
        Window.target_id.in_(bindparam("target_ids", expanding=True)),
        Window.state == WindowState.OPEN,
    )
    .order_by(Window.id)
)


def _update_windows(
    session: Session,
    targets: Sequence[Target],
    states: Mapping[int, _State],
    beliefs: Mapping[int, float],
) -> dict[int, int]:
    """Close answered windows, re-value the others. Returns how many stay open, per target."""
    by_window: dict[int, list[Cell]] = defaultdict(list)
    area: dict[int, float] = {}
    for target in targets:
        cells, consensus = states[target.id]
        for cell in cells:
            if cell.window_id is not None:
                by_window[cell.window_id].append(cell)
        area[target.id] = _object_area(cells, consensus)
    by_id = {t.id: t for t in targets}
    still_open = dict.fromkeys(by_id, 0)
    if not targets:
        return still_open
    for window in session.scalars(OPEN_WINDOWS, {"target_ids": sorted(by_id)}):
        target = by_id[window.target_id]
        consensus = states[target.id].consensus
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
            area=area[target.id],
            belief=beliefs.get(target.id, 1.0),
        )
        still_open[target.id] += 1
    return still_open


def _complete(
    session: Session, settings: Settings, target: Target, image: Image, cells: list[Cell]
) -> bool:
    """Compose the final mask from the finest retired cells. Returns whether it is uncertain."""
    record_consensus_mask(session, settings=settings, target=target, image=image, cells=cells)
    is_leaf = leaf_cells([grid.Cell(c.level, c.row, c.col) for c in cells])
    return any(c.uncertain for c, leaf in zip(cells, is_leaf, strict=True) if leaf)


IMAGES = Copies(Image).where(Image.id.in_(bindparam("image_ids", expanding=True)))


def settle_target(
    session: Session, *, settings: Settings, project: Project, target: Target
) -> Settled:
    """Retire, refine, close windows and complete one target after new votes
    (``settle_many``)."""
    return settle_many(session, settings=settings, project=project, targets=[target])[0]


def settle_many(
    session: Session, *, settings: Settings, project: Project, targets: Sequence[Target]
) -> list[Settled]:
    """Retire, refine, close windows and complete these targets after new votes, each step
    for all of them at once (a few statements a step, not a few a target). Returns what
    happened to each, in their order.

    A control target's pyramid was opened from its truth: its ambiguous cells retire like any
    other, but it neither refines nor completes (its mask is its truth).
    """
    results = [Settled() for _ in targets]
    live = [t for t in targets if t.state == TargetState.COLLECTING]
    if not live:
        return results
    result = {t.id: r for t, r in zip(targets, results, strict=True)}
    images = {
        i.id: i for i in IMAGES.run(session, {"image_ids": sorted({t.image_id for t in live})})
    }
    states = _target_states(session, [t.id for t in live])
    retired = _retire_open(session, project, [states[t.id] for t in live])
    for target, n in zip(live, retired, strict=True):
        result[target.id].retired = n
    beliefs = tag_beliefs(session, target_ids={t.id for t in live})
    refining = [
        _Refining(t, images[t.image_id], states[t.id].cells, beliefs.get(t.id, 1.0))
        for t in live
        if not t.control
    ]
    for r, opened in zip(refining, _refine(session, settings, project, refining), strict=True):
        result[r.target.id].windows_opened = opened
    grown = [r.target.id for r in refining if result[r.target.id].windows_opened]
    if grown:
        session.flush()
        states.update(_target_states(session, grown))
    still_open = _update_windows(session, live, states, beliefs)
    for target in live:
        if still_open[target.id] > 0 or target.control:
            continue
        cells = states[target.id].cells
        uncertain = _complete(session, settings, target, images[target.image_id], cells)
        target.state = TargetState.TRIAGE if uncertain else TargetState.COMPLETE
        target.triage_reason = UNCERTAIN_REASON if uncertain else None
        done = result[target.id]
        done.completed, done.triaged = not uncertain, uncertain
        finish_unions(session, settings=settings, target=target)
    return results


def settle_targets(
    session: Session, *, settings: Settings, project: Project, target_ids: Iterable[int]
) -> list[Settled]:
    targets = lock_targets(session, target_ids=target_ids)
    return settle_many(session, settings=settings, project=project, targets=targets)


def lock_targets(session: Session, *, target_ids: Iterable[int]) -> list[Target]:
    """Hold these targets' rows until the transaction ends, re-read once the lock is held.

    One writer per target at a time: two fusers on one target would otherwise both count
    their cells' votes without the other's, or both open the same finer window (PostgreSQL;
    SQLite has one writer anyway). Locks are taken in id order, so writers never deadlock.
    ``FOR NO KEY UPDATE``, not ``FOR UPDATE``: a request that writes a row pointing at the
    target (a window's lease) takes the key-share lock of its foreign-key check, and must not
    wait for the fuser while the fuser waits for that row (a deadlock, measured under load).
    """
    return list(session.scalars(LOCK_TARGETS, {"target_ids": sorted(set(target_ids))}))


LOCK_TARGETS = (
    select(Target)
    .where(Target.id.in_(bindparam("target_ids", expanding=True)))
    .order_by(Target.id)
    .with_for_update(key_share=True)
    .execution_options(populate_existing=True)
)
