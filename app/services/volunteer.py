"""Volunteers: anonymous identities, credibility rows, and the stats a volunteer may see."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db import utcnow
from app.models import Credibility, Task, TaskState, Volunteer, Vote
from app.services.errors import NotFoundError


def find_volunteer(session: Session, *, public_id: str) -> Volunteer | None:
    return session.scalar(select(Volunteer).where(Volunteer.public_id == public_id))


def get_volunteer(session: Session, *, public_id: str) -> Volunteer:
    volunteer = find_volunteer(session, public_id=public_id)
    if volunteer is None:
        raise NotFoundError("unknown volunteer")
    return volunteer


def create_volunteer(session: Session) -> Volunteer:
    volunteer = Volunteer(public_id=str(uuid.uuid4()))
    session.add(volunteer)
    session.flush()
    return volunteer


def get_or_create_volunteer(session: Session, *, public_id: str | None) -> tuple[Volunteer, bool]:
    """The volunteer of a cookie, or a new anonymous one. Returns it and whether it is new."""
    if public_id is not None:
        volunteer = find_volunteer(session, public_id=public_id)
        if volunteer is not None:
            return volunteer, False
    return create_volunteer(session), True


def credibility_of(session: Session, *, volunteer_id: int, category: str = "") -> Credibility:
    """The volunteer's credibility row (created empty: the prior alone)."""
    row = session.scalar(
        select(Credibility).where(
            Credibility.volunteer_id == volunteer_id, Credibility.category == category
        )
    )
    if row is None:
        row = Credibility(
            volunteer_id=volunteer_id,
            category=category,
            pos_yes=0.0,
            pos_no=0.0,
            neg_no=0.0,
            neg_yes=0.0,
            gold_tp=0,
            gold_fn=0,
            gold_tn=0,
            gold_fp=0,
        )
        session.add(row)
        session.flush()
    return row


def ban_volunteer(session: Session, *, volunteer: Volunteer, reason: str) -> None:
    """Stop counting a volunteer: nothing is deleted; the next recomputation leaves them out."""
    volunteer.banned, volunteer.banned_at, volunteer.ban_reason = True, utcnow(), reason


QUALITY_LEVELS = ((0.95, "excellent"), (0.85, "good"), (0.7, "fair"), (0.0, "learning"))
MIN_GOLD_FOR_LEVEL = 5


@dataclass(frozen=True)
class VolunteerStats:
    answers: int
    tasks: int
    quality: str  # coarse: never reveals which tiles were known


def quality_level(gold_correct: int, gold_answers: int) -> str:
    if gold_answers < MIN_GOLD_FOR_LEVEL:
        return "new"
    share = gold_correct / gold_answers
    return next(name for bound, name in QUALITY_LEVELS if share >= bound)


def volunteer_stats(session: Session, *, volunteer: Volunteer) -> VolunteerStats:
    answers = session.scalar(
        select(func.count()).select_from(Vote).where(Vote.volunteer_id == volunteer.id)
    )
    tasks = session.scalar(
        select(func.count())
        .select_from(Task)
        .where(Task.volunteer_id == volunteer.id, Task.state == TaskState.SUBMITTED)
    )
    cred = credibility_of(session, volunteer_id=volunteer.id)
    return VolunteerStats(
        answers=answers or 0,
        tasks=tasks or 0,
        quality=quality_level(cred.gold_correct, cred.gold_answers),
    )
