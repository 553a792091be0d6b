"""Targets whose mask is the union of their children's: finishing them with their children.

A tag marked *exhaustive* (every instance is one of its children's: a "shape" is a circle, a
square, a triangle or a star) costs no pyramid of its own on an image that has targets of its
children (``app.services.target.can_be_union``): the crowd answers for the children, and the
parent's mask is composed as their union (``compose_target``). The parent finishes once every
child has: complete, or in triage when a child is. Whoever finishes the last child finishes the
parent, holding its row, so two children finishing at once finish it once.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.models import Tag, Target, TargetState
from app.services.masks.composition import record_consensus_mask
from app.services.target import child_targets, is_union

FINISHED = (TargetState.COMPLETE, TargetState.TRIAGE)
UNION_TRIAGE_REASON = "a part of it (a child tag's target) is in triage"


def _parent_target(session: Session, target: Target) -> Target | None:
    tag = session.get(Tag, target.tag_id)
    if tag is None or tag.parent_id is None:
        return None
    return session.scalar(
        select(Target)
        .where(Target.image_id == target.image_id, Target.tag_id == tag.parent_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )


def finish_unions(session: Session, *, settings: Settings, target: Target) -> int:
    """After ``target`` finished, finish the union targets above it whose children all have.

    Returns how many finished."""
    parent = _parent_target(session, target)
    if parent is None or parent.state != TargetState.COLLECTING:
        return 0
    if not is_union(session, target=parent):
        return 0
    children = child_targets(session, target=parent)
    if any(c.state not in FINISHED for c in children):
        return 0
    record_consensus_mask(session, settings=settings, target=parent)
    triaged = any(c.state == TargetState.TRIAGE for c in children)
    parent.state = TargetState.TRIAGE if triaged else TargetState.COMPLETE
    parent.triage_reason = UNION_TRIAGE_REASON if triaged else None
    return 1 + finish_unions(session, settings=settings, target=parent)
