"""The curator's use cases: the triage queue, one target's cells and votes, curator decisions.

A curator decision is gold: setting a cell stores a ``Gold`` row (source ``curator``) and retires
the cell with that answer, so that volunteers are scored against it from then on. Accepting a
target composes its mask from the finest cells (curator and gold cells as 0/1, the others their
posterior), stores it as a curator mask version and completes the target; rejecting the tag marks
the image tag rejected and stores the empty mask as the truth. Both recompute the project's
consensus so that the new gold re-weighs every volunteer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import utcnow
from app.models import (
    Cell,
    CellStatus,
    Consensus,
    Gold,
    GoldSource,
    Image,
    ImageTag,
    ImageTagSource,
    ImageTagStatus,
    MaskSource,
    MaskVersion,
    Project,
    RetireReason,
    Tag,
    Target,
    TargetState,
    Volunteer,
    Vote,
)
from app.services.crowd.consensus import credibility_estimates
from app.services.crowd.opening import uncertainty
from app.services.errors import InvalidInputError, NotFoundError
from app.services.files import mask_store
from app.services.masks.composition import compose_target
from app.services.masks.union import finish_unions
from app.services.project import square_cells
from app.services.recompute import recompute_project
from app.services.target import add_mask_version, child_targets, is_union, stop_collecting
from app.services.volunteer import display_name
from ml.aggregation import grid
from ml.aggregation.rules import leaf_cells


@dataclass(frozen=True)
class TriageItem:
    target_id: int
    image_id: int
    image_name: str
    tag: str
    reason: str
    uncertainty: float  # 1 = nothing known, 0 = every cell settled
    cells: int


def _leaf_posteriors(session: Session, target_ids: list[int]) -> dict[int, list[float]]:
    """Per target, the posteriors of its finest cells (gold and curator cells as 0/1)."""
    rows = session.execute(
        select(Cell, Consensus.posterior)
        .join(Consensus, Consensus.cell_id == Cell.id, isouter=True)
        .where(Cell.target_id.in_(target_ids))
    ).all()
    by_target: dict[int, list[tuple[Cell, float]]] = {}
    for cell, posterior in rows:
        by_target.setdefault(cell.target_id, []).append(
            (cell, 0.5 if posterior is None else float(posterior))
        )
    out = {}
    for target_id, pairs in by_target.items():
        leaves = leaf_cells([grid.Cell(c.level, c.row, c.col) for c, _ in pairs])
        out[target_id] = [
            float(bool(c.label)) if c.retire_reason in SETTLED else p
            for (c, p), leaf in zip(pairs, leaves, strict=True)
            if leaf
        ]
    return out


SETTLED = (RetireReason.GOLD, RetireReason.CURATOR, RetireReason.OUTSIDE)


DISAGREE = "volunteers disagree"
PRIOR_VS_CROWD = "the prior (CAM or model) and the crowd disagree"
TAGGER_UNSURE = "the tagger is unsure of the tag"
RETAG_CONFLICT = "re-tagging conflict"
# A cell is disputed with this many votes, a yes-share in this band, or a prior this far away.
MIN_VOTES_TO_DISPUTE = 4
DISPUTED_SHARE = (0.3, 0.7)
PRIOR_GAP = 0.6
UNSURE_PROBABILITY = 0.6


def _cell_flags(session: Session, project: Project) -> dict[int, str]:
    """Collecting targets whose cells show disagreement, by target id."""
    rows = session.execute(
        select(Cell.target_id, Cell.prior_logodds, Consensus.n_votes, Consensus.n_yes)
        .add_columns(Consensus.posterior)
        .join(Consensus, Consensus.cell_id == Cell.id)
        .join(Target, Target.id == Cell.target_id)
        .where(
            Target.project_id == project.id,
            Target.state == TargetState.COLLECTING,
            Target.control.is_(False),
            Cell.status == CellStatus.OPEN,
            Consensus.n_votes >= 3,
        )
    ).all()
    flags: dict[int, str] = {}
    for target_id, prior, n_votes, n_yes, posterior in rows:
        share = n_yes / n_votes
        if n_votes >= MIN_VOTES_TO_DISPUTE and DISPUTED_SHARE[0] <= share <= DISPUTED_SHARE[1]:
            flags.setdefault(target_id, DISAGREE)
        elif prior != 0 and abs(1 / (1 + np.exp(-prior)) - posterior) >= PRIOR_GAP:
            flags.setdefault(target_id, PRIOR_VS_CROWD)
    return flags


def _tag_flags(session: Session, project: Project) -> dict[int, str]:
    """Open targets whose image tag the tagger is unsure of, or that re-tagging disputed."""
    rows = session.execute(
        select(Target.id, ImageTag.source, ImageTag.status, ImageTag.probability)
        .join(
            ImageTag,
            (ImageTag.image_id == Target.image_id) & (ImageTag.tag_id == Target.tag_id),
        )
        .where(
            Target.project_id == project.id,
            Target.state.in_([TargetState.SEEDED, TargetState.COLLECTING]),
        )
    ).all()
    flags: dict[int, str] = {}
    for target_id, source, status, probability in rows:
        if status == ImageTagStatus.DISPUTED:
            flags[target_id] = RETAG_CONFLICT
        elif source == ImageTagSource.CLASSIFIER and probability < UNSURE_PROBABILITY:
            flags[target_id] = TAGGER_UNSURE
    return flags


def _candidates(session: Session, project: Project) -> dict[int, str]:
    """Every target a curator should see, with why: triaged ones, then flagged open ones."""
    triaged = dict(
        session.execute(
            select(Target.id, Target.triage_reason).where(
                Target.project_id == project.id, Target.state == TargetState.TRIAGE
            )
        ).all()
    )
    out = {**_tag_flags(session, project), **_cell_flags(session, project)}
    out.update({t: reason or "unspecified" for t, reason in triaged.items()})
    return out


def triage_reasons(session: Session, *, project: Project) -> list[str]:
    return sorted(set(_candidates(session, project).values()))


def triage_queue(
    session: Session,
    *,
    project: Project,
    tag: str | None = None,
    reason: str | None = None,
    limit: int = 100,
) -> list[TriageItem]:
    """What waits for a curator, least certain first, optionally of one tag or reason.

    Targets in triage (out of budget, disputed by re-tagging, an empty mask), and open targets
    whose volunteers disagree, whose prior and crowd disagree, or whose tag the tagger doubts.
    """
    reasons = {
        t: why for t, why in _candidates(session, project).items() if not reason or why == reason
    }
    query = (
        select(Target, Image.file_name, Tag.name)
        .join(Image, Image.id == Target.image_id)
        .join(Tag, Tag.id == Target.tag_id)
        .where(Target.id.in_(list(reasons)))
    )
    if tag:
        query = query.where(Tag.name == tag)
    rows = session.execute(query).all()
    posteriors = _leaf_posteriors(session, [t.id for t, _, _ in rows])
    items = [
        TriageItem(
            target_id=t.id,
            image_id=t.image_id,
            image_name=name,
            tag=tag_name,
            reason=reasons[t.id],
            uncertainty=uncertainty(posteriors.get(t.id, [])),
            cells=len(posteriors.get(t.id, [])),
        )
        for t, name, tag_name in rows
    ]
    items.sort(key=lambda item: (-item.uncertainty, item.target_id))
    return items[:limit]


@dataclass(frozen=True)
class VoteView:
    volunteer: str
    volunteer_id: int
    label: bool
    elapsed_ms: int
    sensitivity: float
    specificity: float
    banned: bool


@dataclass
class CellView:
    id: int
    level: int
    row: int
    col: int
    posterior: float
    prior: float  # the prior as a probability
    status: str
    label: bool | None
    source: str  # how it was decided: open, confident, budget, gold, model, curator
    uncertain: bool
    # Where the cell lies, in percent of the image's width and height (for overlays).
    box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # left, top, width, height
    votes: list[VoteView] = field(default_factory=list)


@dataclass(frozen=True)
class TargetView:
    target: Target
    image: Image
    tag: Tag
    cells: list[CellView]  # the finest cells (or those of ``level``), row-major per level
    levels: list[int]  # the levels that have cells
    level: int | None  # the level shown; None: the finest cells
    masks: list[MaskVersion]  # newest first
    # A union of its children's masks (no pyramid of its own): (target id, tag name) of each part
    parts: list[tuple[int, str]] = field(default_factory=list)

    @property
    def final_mask(self) -> MaskVersion | None:
        return next((m for m in self.masks if m.source != MaskSource.MODEL), None)

    @property
    def model_mask(self) -> MaskVersion | None:
        return next((m for m in self.masks if m.source == MaskSource.MODEL), None)


def get_target(session: Session, *, target_id: int) -> Target:
    target = session.get(Target, target_id)
    if target is None:
        raise NotFoundError(f"no target {target_id}")
    return target


def _vote_views(session: Session, cell_ids: list[int]) -> dict[int, list[VoteView]]:
    rows = session.execute(
        select(Vote, Volunteer)
        .join(Volunteer, Volunteer.id == Vote.volunteer_id)
        .where(Vote.cell_id.in_(cell_ids))
        .order_by(Vote.id)
    ).all()
    estimates = credibility_estimates(session, sorted({v.id for _, v in rows}))
    out: dict[int, list[VoteView]] = {}
    for vote, volunteer in rows:
        sens, spec = estimates[volunteer.id]
        out.setdefault(vote.cell_id, []).append(
            VoteView(
                display_name(volunteer),
                volunteer.id,
                vote.label,
                vote.elapsed_ms,
                sens,
                spec,
                volunteer.banned,
            )
        )
    return out


def _box(cell: Cell, image: Image, square: bool) -> tuple[float, float, float, float]:
    address = grid.Cell(cell.level, cell.row, cell.col)
    r = grid.cell_rect(address, image.height, image.width, square=square)
    return (
        100 * r.left / image.width,
        100 * r.top / image.height,
        100 * (r.right - r.left) / image.width,
        100 * (r.bottom - r.top) / image.height,
    )


def target_view(session: Session, *, target: Target, level: int | None = None) -> TargetView:
    image = session.get(Image, target.image_id)
    tag = session.get(Tag, target.tag_id)
    assert image is not None and tag is not None
    cells = list(
        session.scalars(
            select(Cell).where(Cell.target_id == target.id).order_by(Cell.level, Cell.row, Cell.col)
        )
    )
    levels = sorted({c.level for c in cells})
    if level is None:
        leaves = leaf_cells([grid.Cell(c.level, c.row, c.col) for c in cells])
        finest = [c for c, leaf in zip(cells, leaves, strict=True) if leaf]
    elif level in levels:
        finest = [c for c in cells if c.level == level]
    else:
        raise InvalidInputError(f"the target has no cells of level {level}; it has {levels}")
    posterior = dict(
        session.execute(
            select(Consensus.cell_id, Consensus.posterior).where(
                Consensus.cell_id.in_([c.id for c in finest])
            )
        ).all()
    )
    votes = _vote_views(session, [c.id for c in finest])
    project = session.get(Project, target.project_id)
    assert project is not None
    square = square_cells(project)
    views = [
        CellView(
            id=c.id,
            level=c.level,
            row=c.row,
            col=c.col,
            posterior=float(bool(c.label))
            if c.retire_reason in SETTLED
            else posterior.get(c.id, 0.5),
            prior=float(1 / (1 + np.exp(-c.prior_logodds))),
            status=c.status.value,
            label=c.label,
            source=c.retire_reason.value if c.retire_reason else "open",
            uncertain=c.uncertain,
            box=_box(c, image, square),
            votes=votes.get(c.id, []),
        )
        for c in finest
    ]
    masks = list(
        session.scalars(
            select(MaskVersion)
            .where(MaskVersion.target_id == target.id)
            .order_by(MaskVersion.version.desc())
        )
    )
    children = child_targets(session, target=target) if is_union(session, target=target) else []
    parts = [
        (child.id, child_tag.display_name)
        for child in children
        if (child_tag := session.get(Tag, child.tag_id)) is not None
    ]
    return TargetView(target, image, tag, views, levels, level, masks, parts)


def _descendants(cells: list[Cell], cell: Cell) -> list[Cell]:
    """``cell`` and every finer cell of the target inside it."""
    out = []
    for other in cells:
        scale = 3 ** (other.level - cell.level)
        if scale >= 1 and other.row // scale == cell.row and other.col // scale == cell.col:
            out.append(other)
    return out


def set_cell(session: Session, *, target: Target, cell_id: int, label: bool, curator: str) -> int:
    """A curator's answer for one cell (and every finer cell inside it): gold from now on.

    Returns how many cells were set.
    """
    cells = list(session.scalars(select(Cell).where(Cell.target_id == target.id)))
    cell = next((c for c in cells if c.id == cell_id), None)
    if cell is None:
        raise InvalidInputError(f"cell {cell_id} is not a cell of target {target.id}")
    changed = _descendants(cells, cell)
    existing = {
        g.cell_id: g
        for g in session.scalars(select(Gold).where(Gold.cell_id.in_([c.id for c in changed])))
    }
    now = utcnow()
    for c in changed:
        c.status, c.retire_reason, c.label, c.uncertain = (
            CellStatus.RETIRED,
            RetireReason.CURATOR,
            label,
            False,
        )
        c.retired_at = c.retired_at or now
        gold = existing.get(c.id)
        if gold is None:
            gold = Gold(
                cell_id=c.id, tag_id=target.tag_id, project_id=target.project_id, frozen=False
            )
            session.add(gold)
        gold.label, gold.source, gold.created_by, gold.coverage = (
            label,
            GoldSource.CURATOR,
            curator,
            None,
        )
    session.flush()
    return len(changed)


def _image_tags(session: Session, target: Target) -> list[ImageTag]:
    """The image's rows of the target's tag: people's, and the tagger's beside them."""
    return list(
        session.scalars(
            select(ImageTag).where(
                ImageTag.image_id == target.image_id, ImageTag.tag_id == target.tag_id
            )
        )
    )


def finish_target(
    session: Session,
    *,
    settings: Settings,
    project: Project,
    target: Target,
    mask: np.ndarray,
    soft: np.ndarray | None,
    meta: dict[str, object],
    tag_status: ImageTagStatus,
) -> MaskVersion:
    """Store a curator's mask, close the target's windows, complete it and recompute the
    project's consensus (every curator decision ends here: accept, reject, a painted mask)."""
    version = add_mask_version(
        session,
        target=target,
        mask=mask,
        soft=soft,
        source=MaskSource.CURATOR,
        store=mask_store(settings),
        written=[],
    )
    version.meta = {**version.meta, **meta}
    stop_collecting(session, target=target, state=TargetState.COMPLETE)
    for image_tag in _image_tags(session, target):  # a rejection holds for every source
        image_tag.status = tag_status
    session.flush()
    finish_unions(session, settings=settings, target=target)
    recompute_project(session, settings=settings, project=project)
    return version


def accept_target(
    session: Session, *, settings: Settings, project: Project, target: Target, curator: str
) -> MaskVersion:
    """Accept the target's mask as it stands now (after the curator's fixes) and complete it."""
    image = session.get(Image, target.image_id)
    assert image is not None
    cells = list(session.scalars(select(Cell).where(Cell.target_id == target.id)))
    composed = compose_target(session, settings=settings, target=target, image=image, cells=cells)
    return finish_target(
        session,
        settings=settings,
        project=project,
        target=target,
        mask=composed.hard,
        soft=composed.soft,
        meta={"curator": curator},
        tag_status=ImageTagStatus.ACTIVE,
    )


def reject_target(
    session: Session, *, settings: Settings, project: Project, target: Target, curator: str
) -> MaskVersion:
    """The tag is not in the image: every cell is a known 'no' and the mask is empty."""
    image = session.get(Image, target.image_id)
    assert image is not None
    roots = session.scalars(select(Cell).where(Cell.target_id == target.id, Cell.level == 1)).all()
    for cell in roots:
        set_cell(session, target=target, cell_id=cell.id, label=False, curator=curator)
    return finish_target(
        session,
        settings=settings,
        project=project,
        target=target,
        mask=np.zeros((image.height, image.width), dtype=bool),
        soft=None,
        meta={"curator": curator, "rejected": True},
        tag_status=ImageTagStatus.REJECTED,
    )
