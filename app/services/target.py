"""Targets: one (image, tag) to segment, and its versioned masks."""

from __future__ import annotations

from collections.abc import Collection
from typing import NamedTuple

import numpy as np
from sqlalchemy import bindparam, func, select
from sqlalchemy.orm import Session, aliased

from app.db import utcnow
from app.dbapi import Prepared
from app.models import (
    Cell,
    CellStatus,
    Consensus,
    Image,
    ImageTag,
    ImageTagSource,
    ImageTagStatus,
    MaskSource,
    MaskVersion,
    RetireReason,
    Tag,
    Target,
    TargetState,
    Window,
    WindowState,
)
from app.storage import FileStore, encode_mask_png
from ml.aggregation.acquisition import Verdicts, guess_correction, presence
from ml.aggregation.votes import logit, sigmoid


def find_latest_mask(session: Session, *, target: Target, source: MaskSource) -> MaskVersion | None:
    """The target's newest mask version from ``source``, or None."""
    return session.scalar(
        select(MaskVersion)
        .where(MaskVersion.target_id == target.id, MaskVersion.source == source)
        .order_by(MaskVersion.version.desc())
        .limit(1)
    )


def find_target(session: Session, *, image: Image, tag: Tag) -> Target | None:
    if image.id is None or tag.id is None:
        return None
    return session.scalar(
        select(Target).where(Target.image_id == image.id, Target.tag_id == tag.id)
    )


def child_targets(session: Session, *, target: Target) -> list[Target]:
    """The targets of the same image whose tag is a child of this target's tag."""
    return list(
        session.scalars(
            select(Target)
            .join(Tag, Tag.id == Target.tag_id)
            .where(Target.image_id == target.image_id, Tag.parent_id == target.tag_id)
            .order_by(Target.id)
        )
    )


def can_be_union(session: Session, *, target: Target) -> bool:
    """Whether the target's mask can be its children's union: its tag is exhaustive (every
    instance is one of its children's) and the image has targets of its children."""
    tag = session.get(Tag, target.tag_id)
    return tag is not None and tag.exhaustive and bool(child_targets(session, target=target))


def is_union(session: Session, *, target: Target) -> bool:
    """Whether the target's mask is its children's union: opened without a pyramid of its own
    (``app.services.crowd.opening.open_target``) because it can be one."""
    if target.state == TargetState.SEEDED or target.control:
        return False
    own = session.scalar(select(Window.id).where(Window.target_id == target.id).limit(1))
    return own is None and can_be_union(session, target=target)


def union_parent(session: Session, *, target: Target) -> Target | None:
    """The target of the same image whose tag is this one's parent, when it is a union (its
    row locked: whoever finishes or reopens a part changes it once)."""
    tag = session.get(Tag, target.tag_id)
    if tag is None or tag.parent_id is None:
        return None
    parent = session.scalar(
        select(Target)
        .where(Target.image_id == target.image_id, Target.tag_id == tag.parent_id)
        .with_for_update(key_share=True)  # as ``settle.lock_targets``
        .execution_options(populate_existing=True)
    )
    return parent if parent is not None and is_union(session, target=parent) else None


def stop_collecting(
    session: Session, *, target: Target, state: TargetState, reason: str | None = None
) -> None:
    """The target leaves the crowd: ``state`` (complete or triage, with its ``reason``), and
    every open window of it closes, its leases given back. A window left open would still be
    served: it keeps its value, and no settling closes it once its target stopped collecting
    (a retraining's triage once left windows that each of 20 volunteers answered once more,
    16% of a campaign's grids)."""
    now = utcnow()
    for window in session.scalars(
        select(Window).where(Window.target_id == target.id, Window.state == WindowState.OPEN)
    ):
        window.state, window.closed_at, window.value = WindowState.CLOSED, now, 0.0
        window.leased_until, window.leased_by = None, None
    target.state, target.triage_reason = state, reason


def reopen_unions_above(session: Session, *, target: Target) -> None:
    """A part opened again: the unions above it that the consensus finished collect again
    (their mask is recomposed when the part finishes); a curator's finished union stays."""
    parent = union_parent(session, target=target)
    while parent is not None and parent.state != TargetState.COLLECTING:
        latest = session.scalar(
            select(MaskVersion.source)
            .where(MaskVersion.target_id == parent.id)
            .order_by(MaskVersion.version.desc())
            .limit(1)
        )
        if latest != MaskSource.CONSENSUS:
            return
        parent.state, parent.triage_reason = TargetState.COLLECTING, None
        parent = union_parent(session, target=parent)


def ensure_target(session: Session, *, image: Image, tag: Tag) -> tuple[Target, bool]:
    """The target for (image, tag), created in the seeded state if new."""
    session.flush()
    target = find_target(session, image=image, tag=tag)
    if target is not None:
        return target, False
    target = Target(
        project_id=image.project_id,
        image_id=image.id,
        tag_id=tag.id,
        state=TargetState.SEEDED,
        priority=tag.priority,
    )
    session.add(target)
    session.flush()
    return target, True


def add_mask_version(
    session: Session,
    *,
    target: Target,
    mask: np.ndarray,
    source: MaskSource,
    store: FileStore,
    written: list[str],
    soft: np.ndarray | None = None,
) -> MaskVersion:
    """Store a new version of the target's mask: hard (H, W) bool, and soft (H, W) float."""
    hard_key, created = store.put(encode_mask_png(mask), "png")
    if created:
        written.append(hard_key)
    soft_key = None
    if soft is not None:
        soft_key, created = store.put(encode_mask_png(soft.astype(np.float32)), "png")
        if created:
            written.append(soft_key)
    latest = session.scalar(
        select(func.max(MaskVersion.version)).where(MaskVersion.target_id == target.id)
    )
    version = MaskVersion(
        target_id=target.id,
        version=(latest or 0) + 1,
        source=source,
        soft_path=soft_key,
        hard_path=hard_key,
        area_fraction=float(mask.mean()),
        meta={"height": int(mask.shape[0]), "width": int(mask.shape[1])},
    )
    session.add(version)
    return version


def tag_is_known(session: Session, *, target: Target) -> bool:
    """Whether people (an import or a curator) gave the image the target's tag, and no curator
    rejected it: then the object is there, and nine squares that do not show it mean that it is
    small. The tagger's opinion of the same tag is a row of its own beside theirs, and changes
    nothing (it used to be read instead of theirs when it came first)."""
    return target.id in known_tags(session, target_ids=[target.id])


# The targets of some whose tag people gave (``tag_is_known``), in one statement.
KNOWN_TAGS = Prepared(
    select(Target.id)
    .join(
        ImageTag,
        (ImageTag.image_id == Target.image_id) & (ImageTag.tag_id == Target.tag_id),
    )
    .where(
        Target.id.in_(bindparam("target_ids", expanding=True)),
        ImageTag.source.in_([ImageTagSource.IMPORT, ImageTagSource.CURATOR]),
        ImageTag.status != ImageTagStatus.REJECTED,
    )
    .distinct()
)


def known_tags(session: Session, *, target_ids: Collection[int]) -> set[int]:
    """Those of ``target_ids`` whose tag people gave (``tag_is_known``)."""
    if not target_ids:
        return set()
    return set(KNOWN_TAGS.run(session, {"target_ids": sorted(target_ids)}).scalars())


def tag_belief(session: Session, *, target: Target) -> float:
    """How sure we are that the target's tag is on its image at all (``tag_beliefs``)."""
    return tag_beliefs(session, target_ids={target.id}).get(target.id, 1.0)


class _FirstCell(NamedTuple):
    prior: float
    logodds: float
    status: CellStatus
    label: bool | None
    reason: RetireReason | None


FIRST_CELLS = Prepared(
    select(
        Cell.target_id,
        Cell.prior_logodds,
        Consensus.logodds,
        Cell.status,
        Cell.label,
        Cell.retire_reason,
    )
    .join(Consensus, Consensus.cell_id == Cell.id)
    .where(Cell.target_id.in_(bindparam("target_ids", expanding=True)), Cell.level == 1)
)
# Each target's tag on its image: who gave it, and the tagger's probability and correction.
TARGET_TAGS = Prepared(
    select(Target.id, ImageTag.source, ImageTag.probability, Tag.guess_logodds)
    .join(
        ImageTag,
        (ImageTag.image_id == Target.image_id) & (ImageTag.tag_id == Target.tag_id),
    )
    .join(Tag, Tag.id == Target.tag_id)
    .where(Target.id.in_(bindparam("target_ids", expanding=True)))
)


def _first_cells(session: Session, *, target_ids: Collection[int]) -> dict[int, list[_FirstCell]]:
    """The first-level cells of some targets that lie in their image, with their consensus."""
    first: dict[int, list[_FirstCell]] = {}
    for target_id, prior, logodds, status, label, reason in FIRST_CELLS.run(
        session, {"target_ids": sorted(target_ids)}
    ).rows:
        if reason != RetireReason.OUTSIDE:
            cell = _FirstCell(float(prior), float(logodds), status, label, reason)
            first.setdefault(target_id, []).append(cell)
    return first


def tag_beliefs(session: Session, *, target_ids: Collection[int]) -> dict[int, float]:
    """How sure we are that each target's tag is on its image at all: 1 for a tag an import or
    a curator gave, or one the crowd has confirmed (a first-level cell retired positive); else
    the tagger's probability, corrected by what the crowd found of its earlier guesses of the tag
    (``learn_guess_corrections``) and updated by what the crowd has said of the first-level
    cells (``ml.aggregation.acquisition.presence``).

    A window's worth is the gain of an answer *if* there is something to segment, so a guessed
    tag's windows weigh this: a guess must not take the first looks of tags people gave
    (measured: a tagger trained on 7 images added 124 tags to 24 images, and a quarter of the
    answers went to them), and the crowd's "not here" must move the budget away at once
    (measured, loop arm at 40 s: evaluation targets got 320 of 602 grids with the guess's
    probability alone, against 507 with re-tagging off, because a wrong guess's cells keep
    their value until each is settled).
    """
    if not target_ids:
        return {}
    guesses: dict[int, float] = {}
    given: set[int] = set()
    for target_id, source, probability, correction in TARGET_TAGS.run(
        session, {"target_ids": sorted(target_ids)}
    ).rows:
        if source != ImageTagSource.CLASSIFIER:
            given.add(target_id)
        else:
            guess = float(sigmoid(logit(float(probability or 0.0)) + float(correction or 0.0)))
            guesses[target_id] = max(guesses.get(target_id, 0.0), guess)
    beliefs = {t: 1.0 for t in target_ids}
    guessed = set(guesses) - given
    if not guessed:
        return beliefs
    first = _first_cells(session, target_ids=guessed)
    for target_id in guessed:
        cells = first.get(target_id, [])
        if any(c.status == CellStatus.RETIRED and c.label for c in cells):
            continue
        beliefs[target_id] = presence(
            guesses[target_id], [c.prior for c in cells], [c.logodds for c in cells]
        )
    return beliefs


# A first cell's answers that say the tag is on the image: the crowd's confident "yes", or a
# curator's. A split (credible people disagree) is not a verdict on the tag.
_SEEN = (RetireReason.CONFIDENT, RetireReason.CURATOR, RetireReason.GOLD)
# The crowd has turned a guess down once its answers leave the tagger's own probability this
# low (``presence``: two credible "none of these" grids take a guess of 0.75 to about 0.02),
# though its squares may stay open: their windows are worth little by then, and a guess whose
# verdict waited for nine settled squares was judged too late to matter (measured: none of 59
# guesses by the second round of a demo campaign, 20 of them by the third).
TURNED_DOWN = 0.05


def guess_verdicts(session: Session, *, project_id: int) -> dict[int, list[tuple[float, bool]]]:
    """The judged guesses of each tag, by tag id: (the tagger's probability, whether the crowd
    saw the tag on the image).

    A guess is a tag only the tagger gave the image (people's tags are not guesses, whatever the
    tagger says of them). It is confirmed when one of its first cells retired as showing the
    tag (``_SEEN``), turned down when a curator rejected the tag, every first cell in the image
    retired without it, or the crowd's answers on them leave it unlikely (``TURNED_DOWN``);
    otherwise it is not judged yet.
    """
    given = aliased(ImageTag)
    people = (
        select(given.id)
        .where(
            given.image_id == Target.image_id,
            given.tag_id == Target.tag_id,
            given.source != ImageTagSource.CLASSIFIER,
        )
        .exists()
    )
    guesses = {
        target_id: (tag_id, float(probability or 0.0), status)
        for target_id, tag_id, probability, status in session.execute(
            select(Target.id, Target.tag_id, ImageTag.probability, ImageTag.status)
            .join(
                ImageTag,
                (ImageTag.image_id == Target.image_id) & (ImageTag.tag_id == Target.tag_id),
            )
            .where(
                Target.project_id == project_id,
                ImageTag.source == ImageTagSource.CLASSIFIER,
                ~people,
            )
        )
    }
    first = _first_cells(session, target_ids=list(guesses))
    verdicts: dict[int, list[tuple[float, bool]]] = {}
    for target_id, (tag_id, probability, tag_status) in guesses.items():
        cells = first.get(target_id, [])
        seen = any(c.label and c.reason in _SEEN for c in cells)
        turned_down = (
            tag_status == ImageTagStatus.REJECTED
            or (bool(cells) and all(c.status == CellStatus.RETIRED and not c.label for c in cells))
            or (
                bool(cells)
                and not any(c.label for c in cells)
                and presence(probability, [c.prior for c in cells], [c.logodds for c in cells])
                < TURNED_DOWN
            )
        )
        if seen or turned_down:
            verdicts.setdefault(tag_id, []).append((probability, seen))
    return verdicts


def learn_guess_corrections(session: Session, *, project_id: int) -> Verdicts:
    """Set each tag's ``guess_logodds`` from the crowd's verdicts on the tagger's earlier guesses
    (``ml.aggregation.acquisition.guess_correction``), so that a tagger that guesses wrong
    stops drawing the crowd's first looks and one that guesses right draws them sooner. Returns
    the verdicts over every tag."""
    verdicts = guess_verdicts(session, project_id=project_id)
    by_tag = {
        tag_id: Verdicts(len(v), sum(seen for _, seen in v), sum(p for p, _ in v))
        for tag_id, v in verdicts.items()
    }
    project = Verdicts(
        sum(v.judged for v in by_tag.values()),
        sum(v.confirmed for v in by_tag.values()),
        sum(v.claimed for v in by_tag.values()),
    )
    for tag in session.scalars(select(Tag).where(Tag.project_id == project_id)):
        tag.guess_logodds = guess_correction(by_tag.get(tag.id, Verdicts()), project)
    session.flush()
    return project
