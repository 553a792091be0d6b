"""Targets whose mask is the union of their children's: finishing them with their children.

A tag marked *exhaustive* (every instance is one of its children's: a "shape" is a circle, a
square, a triangle or a star) costs no pyramid of its own on an image that has targets of its
children (``app.services.target.can_be_union``): the crowd answers for the children, and the
parent's mask is composed as their union (``compose_target``). The parent finishes once every
child has: complete, or in triage when a child is. Whoever finishes the last child finishes the
parent, holding its row, so two children finishing at once finish it once; a part the
consensus opens again opens its unions again (``app.services.target.reopen_unions_above``).
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.config import Settings
from app.models import Target, TargetState
from app.services.masks.composition import record_consensus_mask
from app.services.target import child_targets, union_parent

FINISHED = (TargetState.COMPLETE, TargetState.TRIAGE)
UNION_TRIAGE_REASON = "a part of it (a child tag's target) is in triage"


def finish_unions(session: Session, *, settings: Settings, target: Target) -> int:
    """After ``target`` finished, finish the union targets above it whose children all have.

    Returns how many finished."""
    parent = union_parent(session, target=target)
    if parent is None or parent.state != TargetState.COLLECTING:
        return 0
    children = child_targets(session, target=parent)
    if any(c.state not in FINISHED for c in children):
        return 0
    record_consensus_mask(session, settings=settings, target=parent)
    triaged = any(c.state == TargetState.TRIAGE for c in children)
    parent.state = TargetState.TRIAGE if triaged else TargetState.COMPLETE
    parent.triage_reason = UNION_TRIAGE_REASON if triaged else None
    return 1 + finish_unions(session, settings=settings, target=parent)
