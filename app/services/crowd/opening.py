"""Opening targets for the crowd: windows, their nine cells, priors and gold.

A seeded target opens its level-0 window (the whole image as nine level-1 cells) with a flat
prior until CAM or a model gives a better one. A target with ground truth is either a *control*
target (those of a deterministic share of the images), whose unambiguous cells become gold
served as known tiles, or an *evaluation* target, whose truth is frozen: never shown, never
trained on, only used to measure the crowd and the model. Whole images are control or
evaluation, so that no model is trained on an image whose other tags are frozen. A control
target's pyramid is opened along its true border at once, so that known tiles exist at every
level the crowd will see.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import utcnow
from app.dbapi import Prepared
from app.models import (
    Cell,
    CellStatus,
    Consensus,
    Gold,
    GoldSource,
    Image,
    MaskSource,
    Project,
    RetireReason,
    Target,
    TargetState,
    Window,
    WindowState,
)
from app.services.files import read_mask
from app.services.masks.composition import load_pixels
from app.services.project import square_cells
from app.services.target import can_be_union, find_latest_mask, tag_belief
from ml.aggregation import grid
from ml.aggregation.acquisition import object_area, window_gain
from ml.aggregation.acquisition import uncertainty as cell_uncertainty
from ml.aggregation.rules import RefinementConfig, choose_refinements

# Gold must be unambiguous: clearly inside, or not touched at all.
GOLD_TRUE_COVERAGE = 0.25
GOLD_FALSE_COVERAGE = 0.0
# ... and judgeable: a tile whose pixels hardly vary (the inside of a flat object, a blank wall)
# shows nothing a person can recognise, so volunteers are never scored on one. The largest
# channel's standard deviation, in 8-bit levels: the demo's flat fills are 3 (sensor noise),
# its textured background 4-16 and object edges 8-54.
GOLD_MIN_CONTRAST = 4.0


def refinement_config(project: Project) -> RefinementConfig:
    return RefinementConfig(
        min_cell_px=int(project.setting("min_cell_px")),
        max_level=int(project.setting("max_level")),
        square=square_cells(project),
    )


# A cell wholly outside the image (the square frame's margin) holds no pixel of any object: it
# opens retired "no" (``RetireReason.OUTSIDE``) at this log-odds, and is never asked.
OUTSIDE_LOGODDS = -12.0


def outside_image(cell: Cell) -> bool:
    """Whether a cell lies wholly outside its image (it opened retired, ``open_windows``)."""
    return cell.retire_reason == RetireReason.OUTSIDE


def is_control(image_id: int, share: float) -> bool:
    """A deterministic, well-spread choice of control images (Knuth's multiplicative hash).

    Whole images are control or held out, so that the frozen evaluation set is a set of images
    a model can be scored on without having seen any of their masks.
    """
    return ((image_id * 2654435761) % 2**32) / 2**32 < share


# A control target's mask is known: its ambiguous cells (neither clearly in nor out, so not
# gold) are worth asking about only when no real target has open work.
CONTROL_WINDOW_WEIGHT = 1e-6


def window_value(
    priority: float,
    posteriors: Sequence[float],
    *,
    control: bool,
    level: int = 0,
    area: float = 1.0,
    belief: float = 1.0,
) -> float:
    """The picker's value of an open window whose parent cell is at ``level``: priority x how
    sure we are the tag is there at all (``belief``, ``app.services.target.tag_beliefs``) x the
    expected gain in mask quality of one answer (``ml.aggregation.acquisition.window_gain``,
    from its open cells' posteriors and the object's expected ``area``), or a control target's
    mean uncertainty x ``CONTROL_WINDOW_WEIGHT``."""
    if control:
        return priority * uncertainty(posteriors) * CONTROL_WINDOW_WEIGHT
    return priority * belief * window_gain(level, posteriors, area)


def uncertainty(posteriors: Sequence[float]) -> float:
    """Mean closeness to 0.5 of the open cells' posteriors: 1 = unknown, 0 = settled."""
    if not posteriors:
        return 0.0
    return float(np.mean(cell_uncertainty(posteriors)))


@dataclass
class Truth:
    """A target's ground truth, and whether it is served (control) or held out (frozen); the
    image's pixels, when at hand, keep flat tiles out of the served gold."""

    mask: np.ndarray  # (H, W) bool
    frozen: bool
    pixels: np.ndarray | None = None  # (H, W, 3) uint8


# Decoded truth masks by their file: the settler reads a target's truth each time it opens a
# finer window (a PNG decode, 1-3 ms). Mask files are named by their content's hash, so a file
# read once reads the same ever after. Bounded: a demo truth is a few hundred kB as booleans.
TRUTHS_KEPT = 64
_truths: OrderedDict[tuple[str, str, str], np.ndarray] = OrderedDict()
_truths_lock = threading.Lock()


def load_truth(session: Session, settings: Settings, target: Target) -> np.ndarray | None:
    """The target's ground truth (newest version) as a read-only boolean mask, or None."""
    version = find_latest_mask(session, target=target, source=MaskSource.GROUND_TRUTH)
    if version is None:
        return None
    key = version.hard_path
    kept = (settings.storage_url, str(settings.data_dir), key)  # the storage, as open_storage
    with _truths_lock:
        mask = _truths.get(kept)
        if mask is not None:
            _truths.move_to_end(kept)
            return mask
    decoded = read_mask(settings, key)
    mask = np.asarray(decoded > 0.5) if decoded.dtype != bool else decoded
    mask.flags.writeable = False  # shared by every caller that reads this truth
    with _truths_lock:
        _truths[kept] = mask
        while len(_truths) > TRUTHS_KEPT:
            _truths.popitem(last=False)
    return mask


def _gold_label(coverage: float) -> bool | None:
    if coverage >= GOLD_TRUE_COVERAGE:
        return True
    if coverage <= GOLD_FALSE_COVERAGE:
        return False
    return None


def open_windows(
    session: Session,
    *,
    target: Target,
    parents: Sequence[grid.Cell],
    truth: Truth | None,
    image: Image,
    square: bool,
    prior_logodds: Sequence[Sequence[float]] | None = None,
    belief: float | None = None,
) -> list[int]:
    """Open the windows showing each parent's nine children, with their cells and consensus.

    Children wholly outside the image (``square``: the frame's margin) open retired "no"
    (``OUTSIDE_LOGODDS``) and are never asked. With a truth, its unambiguous cells become gold
    (``_gold``), and a served truth's gold cells open retired. Four statements however many
    windows open at once (rows inserted, not ORM objects: the session does not track them).
    ``belief``: the target's ``tag_belief``, when the caller has it. Returns the new windows'
    ids, in the parents' order.
    """
    if not parents:
        return []
    now = utcnow()
    addresses = [child for parent in parents for child in grid.children(parent)]
    inside = grid.cells_hold_pixels(addresses, image.height, image.width, square=square)
    outside = ~inside.reshape(-1, 9)
    priors = np.zeros((len(parents), 9)) if prior_logodds is None else np.asarray(prior_logodds)
    priors = np.where(outside, OUTSIDE_LOGODDS, priors)
    posteriors = 1.0 / (1.0 + np.exp(-priors))  # (n_windows, 9)
    gold = (
        _gold(truth, addresses, ~outside.reshape(-1), square=square)
        if truth is not None
        else [None] * len(addresses)
    )
    served = np.array([g is not None and not g.frozen for g in gold])
    known = np.asarray((served | outside.reshape(-1)).reshape(-1, 9).all(axis=1), dtype=bool)
    if belief is None:
        belief = tag_belief(session, target=target)
    window_ids = _inserted(
        session,
        INSERT_WINDOW,
        [
            {
                "project_id": target.project_id,
                "tag_id": target.tag_id,
                "target_id": target.id,
                "level": parent.level,
                "row": parent.row,
                "col": parent.col,
                "known": truth is not None and bool(known[k]),
                "opened_at": now,
                "value": window_value(
                    target.priority,
                    list(q),
                    control=truth is not None and not truth.frozen,
                    level=parent.level,
                    # The window's own cells; a refined target's windows are valued again by
                    # the settler with the whole target's area (``settle.target_areas``).
                    area=object_area([parent.level + 1] * 9, list(q)),
                    belief=belief,
                ),
                "state": WindowState.OPEN,
                "leased_until": None,
                "closed_at": None,
            }
            for k, (parent, q) in enumerate(zip(parents, posteriors, strict=True))
        ],
    )
    cell_rows = []
    for k, (child, prior, empty) in enumerate(
        zip(addresses, priors.reshape(-1), outside.reshape(-1), strict=True)
    ):
        row = {
            "target_id": target.id,
            "level": child.level,
            "row": child.row,
            "col": child.col,
            "prior_logodds": float(prior),
            "model_logodds": 0.0,
            "window_id": window_ids[k // 9],
            "status": CellStatus.OPEN,
            "label": None,
            "retire_reason": None,
            "retired_at": None,
            "uncertain": False,
        }
        if empty:
            row.update(status=CellStatus.RETIRED, label=False, retire_reason=RetireReason.OUTSIDE)
            row["retired_at"] = now
        elif served[k]:
            label = gold[k].label  # type: ignore[union-attr]
            row.update(status=CellStatus.RETIRED, label=label, retire_reason=RetireReason.GOLD)
        cell_rows.append(row)
    cell_ids = _inserted(session, INSERT_CELL, cell_rows)
    INSERT_CONSENSUS.run(
        session,
        [
            {
                "cell_id": cell_id,
                "logodds": float(prior),
                "posterior": float(q),
                "n_votes": 0,
                "n_yes": 0,
                "method": "online",
                "updated_at": now,
            }
            for cell_id, prior, q in zip(
                cell_ids, priors.reshape(-1), posteriors.reshape(-1), strict=True
            )
        ],
    )
    gold_rows = [
        {
            "cell_id": cell_id,
            "label": g.label,
            "coverage": g.coverage,
            "source": GoldSource.GROUND_TRUTH,
            "frozen": g.frozen,
            "tag_id": target.tag_id,
            "project_id": target.project_id,
            "created_by": None,
            "created_at": now,
        }
        for cell_id, g in zip(cell_ids, gold, strict=True)
        if g is not None
    ]
    if gold_rows:
        INSERT_GOLD.run(session, gold_rows)
    return window_ids


# The rows a new window brings, written on the driver's cursor (``app.dbapi``), every value
# bound: a window, its nine cells (each insert hands its id back), their consensus and gold.
INSERT_WINDOW = Prepared(
    insert(Window).returning(Window.id),
    columns=(
        *("project_id", "tag_id", "target_id", "level", "row", "col", "known", "opened_at"),
        *("value", "state", "leased_until", "closed_at"),
    ),
)
INSERT_CELL = Prepared(
    insert(Cell).returning(Cell.id),
    columns=(
        *("target_id", "level", "row", "col", "prior_logodds", "model_logodds", "window_id"),
        *("status", "label", "retire_reason", "retired_at", "uncertain"),
    ),
)
INSERT_CONSENSUS = Prepared(
    insert(Consensus),
    columns=("cell_id", "logodds", "posterior", "n_votes", "n_yes", "method", "updated_at"),
)
INSERT_GOLD = Prepared(
    insert(Gold),
    columns=(
        *("cell_id", "label", "coverage", "source", "frozen", "tag_id", "project_id"),
        *("created_by", "created_at"),
    ),
)


def _inserted(session: Session, statement: Prepared, rows: list[dict[str, Any]]) -> list[int]:
    """Insert these rows one statement each, in order; their new ids, in the same order."""
    return [statement.run(session, row).scalar() for row in rows]


@dataclass(frozen=True)
class _NewGold:
    label: bool
    coverage: float
    frozen: bool


def _gold(
    truth: Truth, addresses: Sequence[grid.Cell], inside: np.ndarray, *, square: bool
) -> list[_NewGold | None]:
    """Gold for the unambiguous cells (``GOLD_TRUE_COVERAGE``) inside the image that show
    something to judge (``GOLD_MIN_CONTRAST``, when the pixels are known); None elsewhere."""
    coverage = grid.cell_coverage(truth.mask, addresses, square=square)
    judgeable = inside.copy()
    if truth.pixels is not None and not truth.frozen:
        contrast = grid.cell_contrast(truth.pixels, addresses, square=square)
        judgeable &= contrast >= GOLD_MIN_CONTRAST
    out: list[_NewGold | None] = []
    for ok, cov in zip(judgeable, coverage, strict=True):
        label = _gold_label(float(cov))
        out.append(None if label is None or not ok else _NewGold(label, float(cov), truth.frozen))
    return out


def control_pyramid(
    truth: np.ndarray, height: int, width: int, config: RefinementConfig
) -> list[grid.Cell]:
    """The windows a perfect crowd would open on this truth: its border, level by level.

    Returns the parent cells of those windows, the root first.
    """
    cells = list(grid.children(grid.ROOT))
    opened = [grid.ROOT]
    while True:
        labels = (grid.cell_coverage(truth, cells, square=config.square) > 0).astype(np.int8)
        deeper = choose_refinements(cells, labels, height, width, opened=set(opened), config=config)
        if not deeper:
            return opened
        opened += deeper
        cells += grid.inside_children(deeper, height, width, square=config.square)


def open_target(
    session: Session,
    *,
    settings: Settings,
    project: Project,
    target: Target,
    image: Image,
    truth_mask: np.ndarray | None = None,
    root_prior: Sequence[float] | None = None,
) -> None:
    """Move a seeded target to collecting: its level-0 window opens (and more for controls).

    A target whose mask is the union of its children's (``can_be_union``) opens no window: the
    crowd answers for the children only, and it finishes with them (``masks.union``). A
    control target keeps its pyramid, whose known tiles check volunteers.
    """
    mask = truth_mask if truth_mask is not None else load_truth(session, settings, target)
    truth = None
    if mask is not None:
        control = is_control(target.image_id, float(project.setting("control_share")))
        pixels = load_pixels(settings, image) if control else None
        truth = Truth(mask=mask, frozen=not control, pixels=pixels)
    if (truth is None or truth.frozen) and can_be_union(session, target=target):
        target.state, target.control = TargetState.COLLECTING, False
        return
    parents = [grid.ROOT]
    if truth is not None and not truth.frozen:
        parents = control_pyramid(truth.mask, image.height, image.width, refinement_config(project))
    priors = None
    if root_prior is not None:  # the level-1 cells get the CAM; deeper control windows, flat
        priors = [list(root_prior)] + [[0.0] * 9 for _ in parents[1:]]
    open_windows(
        session,
        target=target,
        parents=parents,
        truth=truth,
        image=image,
        square=square_cells(project),
        prior_logodds=priors,
    )
    target.state = TargetState.COLLECTING
    target.control = truth is not None and not truth.frozen


def open_seeded_targets(
    session: Session,
    *,
    settings: Settings,
    project: Project,
    truths: dict[int, np.ndarray] | None = None,
) -> int:
    """Open every seeded target of the project. Returns how many were opened.

    ``truths`` holds ground-truth masks by target id that the caller has at hand already.
    """
    rows = session.execute(
        select(Target, Image)
        .join(Image, Image.id == Target.image_id)
        .where(Target.project_id == project.id, Target.state == TargetState.SEEDED)
        .order_by(Target.id)
    ).all()
    for target, image in rows:
        open_target(
            session,
            settings=settings,
            project=project,
            target=target,
            image=image,
            truth_mask=(truths or {}).get(target.id),
        )
    session.flush()
    return len(rows)
