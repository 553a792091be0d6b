"""Volunteers: anonymous identities, credibility rows, and the stats a volunteer may see."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, timedelta

import numpy as np
from sqlalchemy import bindparam, func, select
from sqlalchemy.orm import Session

from app.db import utcnow
from app.dbapi import Copies
from app.models import Credibility, Task, TaskState, Volunteer, Vote
from app.services.errors import InvalidInputError, NotFoundError
from ml.aggregation.credibility import COUNT_FIELDS, WorkerCounts, sensitivity_specificity

FIND_VOLUNTEER = select(Volunteer).where(Volunteer.public_id == bindparam("public_id"))


def find_volunteer(session: Session, *, public_id: str) -> Volunteer | None:
    """The volunteer of a public id (a statement built once: it runs on every task request)."""
    return session.scalar(FIND_VOLUNTEER, {"public_id": public_id})


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


# The task path's lookup, on every request: a copy of the row (``app.dbapi``), for callers that
# read the volunteer and write with statements.
VOLUNTEER_COPY = Copies(Volunteer).where(Volunteer.public_id == bindparam("public_id"))


def get_or_create_volunteer(
    session: Session, *, public_id: str | None, read_only: bool = False
) -> tuple[Volunteer, bool]:
    """The volunteer of a cookie, or a new anonymous one. Returns it and whether it is new.
    ``read_only``: an existing volunteer comes back as a copy of its row, outside the session."""
    if public_id is not None:
        if read_only:
            volunteer = VOLUNTEER_COPY.first(session, {"public_id": public_id})
        else:
            volunteer = find_volunteer(session, public_id=public_id)
        if volunteer is not None:
            return volunteer, False
    return create_volunteer(session), True


def credibility_of(session: Session, *, volunteer_id: int, category: str = "") -> Credibility:
    """The volunteer's credibility row (created empty: the prior alone)."""
    return credibility_rows(session, volunteer_ids=[volunteer_id], category=category)[volunteer_id]


def credibility_rows(
    session: Session, *, volunteer_ids: Iterable[int], category: str = ""
) -> dict[int, Credibility]:
    """These volunteers' credibility rows, in one query (those missing created empty: the prior
    alone)."""
    wanted = set(volunteer_ids)
    rows = {
        row.volunteer_id: row
        for row in session.scalars(
            select(Credibility).where(
                Credibility.volunteer_id.in_(sorted(wanted)), Credibility.category == category
            )
        )
    }
    missing = [
        Credibility(
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
        for volunteer_id in sorted(wanted - set(rows))
    ]
    if missing:
        session.add_all(missing)
        session.flush()
        rows.update((row.volunteer_id, row) for row in missing)
    return rows


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
    streak_days: int  # consecutive days, up to today, with at least one answer
    name: str


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
    cred = session.scalar(
        select(Credibility).where(
            Credibility.volunteer_id == volunteer.id, Credibility.category == ""
        )
    )
    return VolunteerStats(
        answers=answers or 0,
        tasks=tasks or 0,
        quality=quality_level(cred.gold_correct, cred.gold_answers) if cred else "new",
        streak_days=streak_days(session, volunteer=volunteer),
        name=display_name(volunteer),
    )


def display_name(volunteer: Volunteer) -> str:
    return volunteer.display_name or f"Volunteer {volunteer.public_id[:6]}"


def streak_days(session: Session, *, volunteer: Volunteer, today: date | None = None) -> int:
    days = {
        str(d)[:10]
        for d in session.scalars(
            select(func.date(Vote.created_at)).where(Vote.volunteer_id == volunteer.id).distinct()
        )
    }
    day, streak = today or utcnow().date(), 0
    while day.isoformat() in days:
        streak, day = streak + 1, day - timedelta(days=1)
    return streak


@dataclass(frozen=True)
class LeaderboardRow:
    rank: int
    name: str
    answers: int
    credible: int  # answers weighed by how informative the volunteer is (``leaderboard``)
    is_you: bool


# Raw answers first, re-ranked by credible contribution: enough candidates that a flood of
# throwaway identities cannot push every honest volunteer out of them.
LEADERBOARD_CANDIDATES = 2000


def leaderboard(
    session: Session, *, volunteer: Volunteer | None, limit: int = 20
) -> list[LeaderboardRow]:
    """Volunteers by credible contribution (banned ones left out): their answers times how
    informative they are (Youden's J of their credibility, 0 for a coin), so that answering
    at random as fast as possible earns no place."""
    rows = session.execute(
        select(Volunteer, func.count(Vote.id).label("answers"))
        .join(Vote, Vote.volunteer_id == Volunteer.id)
        .where(Volunteer.banned.is_(False))
        .group_by(Volunteer.id)
        .order_by(func.count(Vote.id).desc(), Volunteer.id)
        .limit(LEADERBOARD_CANDIDATES)
    ).all()
    found = {
        c.volunteer_id: c
        for c in session.scalars(
            select(Credibility).where(
                Credibility.volunteer_id.in_([v.id for v, _ in rows]), Credibility.category == ""
            )
        )
    }
    counts = WorkerCounts.from_rows(
        [
            [float(getattr(found[v.id], f)) if v.id in found else 0.0 for f in COUNT_FIELDS]
            for v, _ in rows
        ]
    )
    sens, spec = sensitivity_specificity(counts)
    informative = np.clip(sens + spec - 1.0, 0.0, 1.0)
    scored = sorted(
        ((round(n * float(j)), n, v) for (v, n), j in zip(rows, informative, strict=True)),
        key=lambda row: (-row[0], -row[1], row[2].id),
    )
    return [
        LeaderboardRow(
            rank=i + 1,
            name=display_name(v),
            answers=n,
            credible=c,
            is_you=volunteer is not None and v.id == volunteer.id,
        )
        for i, (c, n, v) in enumerate(scored[:limit])
    ]


# Characters that change how a name shows without showing themselves: direction overrides and
# isolates, marks, zero-width spaces and joiners, the byte-order mark.
INVISIBLE = re.compile("[\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]")
# The name every volunteer has until they choose one (``display_name``): nobody may choose it.
DEFAULT_NAME = re.compile(r"^volunteer\s*[0-9a-f]{4,}$", re.IGNORECASE)


def rename_volunteer(session: Session, *, volunteer: Volunteer, name: str) -> None:
    name = " ".join(INVISIBLE.sub("", name).split())
    if not 2 <= len(name) <= 40:
        raise InvalidInputError("a display name has 2 to 40 characters")
    if DEFAULT_NAME.match(name):
        raise InvalidInputError(
            f"{name!r} looks like the name Tessera gives volunteers who have not chosen one; "
            "choose another"
        )
    volunteer.display_name = name
