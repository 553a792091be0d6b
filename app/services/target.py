"""Targets: one (image, tag) to segment, and its versioned masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.models import (
    Cell,
    CellStatus,
    Image,
    ImageTag,
    ImageTagSource,
    MaskSource,
    MaskVersion,
    Tag,
    Target,
    TargetState,
    Window,
)
from app.storage import FileStore, encode_mask_png


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
    (``app.services.campaign.open_target``) because it can be one."""
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
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    return parent if parent is not None and is_union(session, target=parent) else None


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
    written: list[Path],
    soft: np.ndarray | None = None,
) -> MaskVersion:
    """Store a new version of the target's mask: hard (H, W) bool, and soft (H, W) float."""
    path, created = store.put(encode_mask_png(mask), "png")
    if created:
        written.append(path)
    soft_path = None
    if soft is not None:
        soft_path, created = store.put(encode_mask_png(soft.astype(np.float32)), "png")
        if created:
            written.append(soft_path)
    latest = session.scalar(
        select(func.max(MaskVersion.version)).where(MaskVersion.target_id == target.id)
    )
    version = MaskVersion(
        target_id=target.id,
        version=(latest or 0) + 1,
        source=source,
        soft_path=str(soft_path.relative_to(store.root.parent)) if soft_path else None,
        hard_path=str(path.relative_to(store.root.parent)),
        area_fraction=float(mask.mean()),
        meta={"height": int(mask.shape[0]), "width": int(mask.shape[1])},
    )
    session.add(version)
    return version


def tag_belief(session: Session, *, target: Target) -> float:
    """How sure we are that the target's tag is on its image at all: 1 for a tag an import or
    a curator gave, or one the crowd has confirmed (a cell of the target retired positive);
    else the tagger's probability. A window's worth is the gain of an answer *if* there is
    something to segment, so a tag the tagger added weighs its probability until the crowd has
    seen it: a guess must not take the first looks of tags people gave (measured: a tagger
    trained on 7 images added 124 tags to 24 images, and a quarter of the answers went to them).
    """
    rows = session.execute(
        select(ImageTag.source, ImageTag.probability).where(
            ImageTag.image_id == target.image_id, ImageTag.tag_id == target.tag_id
        )
    ).all()
    if not rows or any(source != ImageTagSource.CLASSIFIER for source, _ in rows):
        return 1.0
    confirmed = session.scalar(
        select(Cell.id)
        .where(
            Cell.target_id == target.id,
            Cell.status == CellStatus.RETIRED,
            Cell.label.is_(True),
        )
        .limit(1)
    )
    guess = max(float(p) for _, p in rows)
    return 1.0 if confirmed is not None else float(np.clip(guess, 0.0, 1.0))
