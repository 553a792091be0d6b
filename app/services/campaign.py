"""Opening targets for the crowd: windows, their nine cells, priors and gold.

A seeded target opens its level-0 window (the whole image as nine level-1 cells) with a flat
prior until CAM or a model gives a better one. A target with ground truth is either a *control*
target (a deterministic share of them), whose unambiguous cells become gold served as known
tiles, or an *evaluation* target, whose truth is frozen: never shown, only used to measure the
crowd and the model. A control target's pyramid is opened along its true border at once, so
that known tiles exist at every level the crowd will see.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.models import (
    Cell,
    CellStatus,
    Consensus,
    Gold,
    GoldSource,
    Image,
    MaskSource,
    MaskVersion,
    Project,
    RetireReason,
    Target,
    TargetState,
    Window,
)
from app.storage import decode_mask_png
from ml.aggregation import grid
from ml.aggregation.rules import RefinementConfig, choose_refinements

# Gold must be unambiguous: clearly inside, or not touched at all.
GOLD_TRUE_COVERAGE = 0.25
GOLD_FALSE_COVERAGE = 0.0


def refinement_config(project: Project) -> RefinementConfig:
    return RefinementConfig(
        min_cell_px=int(project.setting("min_cell_px")), max_level=int(project.setting("max_level"))
    )


def is_control(target_id: int, share: float) -> bool:
    """A deterministic, well-spread choice of control targets (Knuth's multiplicative hash)."""
    return ((target_id * 2654435761) % 2**32) / 2**32 < share


def uncertainty(posteriors: Sequence[float]) -> float:
    """Mean closeness to 0.5 of the open cells' posteriors: 1 = unknown, 0 = settled."""
    if not posteriors:
        return 0.0
    q = np.asarray(posteriors, dtype=np.float64)
    return float(np.mean(1.0 - np.abs(2.0 * q - 1.0)))


@dataclass
class Truth:
    """A target's ground truth, and whether it is served (control) or held out (frozen)."""

    mask: np.ndarray  # (H, W) bool
    frozen: bool


def load_truth(session: Session, settings: Settings, target: Target) -> np.ndarray | None:
    version = session.scalar(
        select(MaskVersion)
        .where(MaskVersion.target_id == target.id, MaskVersion.source == MaskSource.GROUND_TRUTH)
        .order_by(MaskVersion.version.desc())
        .limit(1)
    )
    if version is None:
        return None
    mask = decode_mask_png(settings.data_dir / version.hard_path)
    return np.asarray(mask > 0.5) if mask.dtype != bool else mask


def _gold_label(coverage: float) -> bool | None:
    if coverage >= GOLD_TRUE_COVERAGE:
        return True
    if coverage <= GOLD_FALSE_COVERAGE:
        return False
    return None


def open_window(
    session: Session,
    *,
    target: Target,
    parent: grid.Cell,
    truth: Truth | None,
    prior_logodds: Sequence[float] | None = None,
) -> Window:
    """Open the window showing ``parent``'s nine children, with their cells and consensus."""
    children = grid.children(parent)
    priors = np.asarray(prior_logodds if prior_logodds is not None else [0.0] * 9, dtype=float)
    posteriors = 1.0 / (1.0 + np.exp(-priors))
    window = Window(
        project_id=target.project_id,
        tag_id=target.tag_id,
        target_id=target.id,
        level=parent.level,
        row=parent.row,
        col=parent.col,
        value=target.priority * uncertainty(list(posteriors)),
    )
    session.add(window)
    session.flush()
    cells = [
        Cell(
            target_id=target.id,
            level=child.level,
            row=child.row,
            col=child.col,
            prior_logodds=float(prior),
            window_id=window.id,
            status=CellStatus.OPEN,
        )
        for child, prior in zip(children, priors, strict=True)
    ]
    session.add_all(cells)
    session.flush()
    session.add_all(
        Consensus(cell_id=c.id, logodds=c.prior_logodds, posterior=float(q))
        for c, q in zip(cells, posteriors, strict=True)
    )
    if truth is not None:
        window.known = _add_gold(session, target, cells, children, truth) == 9
    return window


def _add_gold(
    session: Session,
    target: Target,
    cells: list[Cell],
    addresses: Sequence[grid.Cell],
    truth: Truth,
) -> int:
    """Gold for the unambiguous cells; served ones retire at once. Returns how many are served."""
    served = 0
    coverage = grid.cell_coverage(truth.mask, addresses)
    for cell, cov in zip(cells, coverage, strict=True):
        label = _gold_label(float(cov))
        if label is None:
            continue
        session.add(
            Gold(
                cell_id=cell.id,
                label=label,
                coverage=float(cov),
                source=GoldSource.GROUND_TRUTH,
                frozen=truth.frozen,
                tag_id=target.tag_id,
                project_id=target.project_id,
            )
        )
        if not truth.frozen:
            cell.status, cell.retire_reason, cell.label = (
                CellStatus.RETIRED,
                RetireReason.GOLD,
                label,
            )
            served += 1
    return served


def _open_control_pyramid(
    session: Session, *, target: Target, image: Image, truth: Truth, config: RefinementConfig
) -> None:
    """Open a control target's windows along its true border, level by level."""
    cells = list(grid.children(grid.ROOT))
    opened = {grid.ROOT}
    while True:
        labels = (grid.cell_coverage(truth.mask, cells) > 0).astype(np.int8)
        deeper = choose_refinements(
            cells, labels, image.height, image.width, opened=opened, config=config
        )
        if not deeper:
            return
        for cell in deeper:
            open_window(session, target=target, parent=cell, truth=truth)
            opened.add(cell)
            cells += grid.children(cell)


def open_target(
    session: Session, *, settings: Settings, project: Project, target: Target, image: Image
) -> None:
    """Move a seeded target to collecting: its level-0 window opens (and more for controls)."""
    mask = load_truth(session, settings, target)
    truth = None
    if mask is not None:
        control = is_control(target.id, float(project.setting("control_share")))
        truth = Truth(mask=mask, frozen=not control)
    open_window(session, target=target, parent=grid.ROOT, truth=truth)
    if truth is not None and not truth.frozen:
        _open_control_pyramid(
            session, target=target, image=image, truth=truth, config=refinement_config(project)
        )
    target.state = TargetState.COLLECTING
    target.control = truth is not None and not truth.frozen


def open_seeded_targets(session: Session, *, settings: Settings, project: Project) -> int:
    """Open every seeded target of the project. Returns how many were opened."""
    rows = session.execute(
        select(Target, Image)
        .join(Image, Image.id == Target.image_id)
        .where(Target.project_id == project.id, Target.state == TargetState.SEEDED)
        .order_by(Target.id)
    ).all()
    for target, image in rows:
        open_target(session, settings=settings, project=project, target=target, image=image)
    session.flush()
    return len(rows)
