"""The curator's view of volunteers: credibility, agreement on gold, and suspicion flags.

Flags (each needs enough evidence before it is raised):

- ``random clicking``: agreement on gold close to a coin's (0.35-0.65) over 10 or more gold tiles;
- ``adversarial``: agreement on gold below 0.35 (answers that anti-correlate with the truth);
- ``inhuman speed``: a median under 1.5 s per nine-tile task over 5 or more tasks;
- ``adversarial (by consensus)``, ``random clicking (by consensus)``: the same judgements for a
  volunteer with too few gold answers, from the credibility the EM pass learned against the
  consensus (Youden's J = sensitivity + specificity - 1 below -0.3, or within 0.15 of 0) over
  90 or more answers. A project without gold still finds its bad actors this way, as long as
  most of its crowd is honest (the consensus is the crowd's).

A flag is a hint for a curator, never a ban by itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.models import Credibility, Project, Task, TaskState, Volunteer, Vote
from app.services.crowd.consensus import credibility_estimates
from app.services.errors import NotFoundError
from app.services.volunteer import display_name

MIN_GOLD_FOR_FLAGS = 10
MIN_ANSWERS_FOR_CONSENSUS_FLAGS = 90  # ten tasks
ADVERSARIAL_J = -0.3  # by consensus: a volunteer this far below a coin answers against it
COIN_J = 0.15  # by consensus: within this of a coin, a volunteer tells nothing
MIN_TASKS_FOR_SPEED = 5
INHUMAN_TASK_MS = 1500


@dataclass(frozen=True)
class VolunteerReview:
    id: int
    name: str
    answers: int
    tasks: int
    sensitivity: float  # posterior means of the two-coin model, with its priors
    specificity: float
    gold_answers: int
    gold_agreement: float | None
    median_task_ms: float | None
    banned: bool
    ban_reason: str | None
    flags: tuple[str, ...]


def suspicion_flags(
    gold_answers: int,
    gold_agreement: float | None,
    median_task_ms: float | None,
    tasks: int,
    *,
    answers: int = 0,
    youden: float | None = None,
) -> tuple[str, ...]:
    """Flags from the evidence (see the module's docstring); gold, when there is enough of it,
    speaks before the consensus. ``youden``: the learned sensitivity + specificity - 1."""
    flags = []
    if gold_agreement is not None and gold_answers >= MIN_GOLD_FOR_FLAGS:
        if gold_agreement < 0.35:
            flags.append("adversarial")
        elif gold_agreement <= 0.65:
            flags.append("random clicking")
    elif youden is not None and answers >= MIN_ANSWERS_FOR_CONSENSUS_FLAGS:
        if youden < ADVERSARIAL_J:
            flags.append("adversarial (by consensus)")
        elif abs(youden) < COIN_J:
            flags.append("random clicking (by consensus)")
    enough = median_task_ms is not None and tasks >= MIN_TASKS_FOR_SPEED
    if enough and median_task_ms is not None and median_task_ms < INHUMAN_TASK_MS:
        flags.append("inhuman speed")
    return tuple(flags)


def _task_times(session: Session, project: Project | None) -> dict[int, list[int]]:
    query = select(Vote.volunteer_id, Vote.task_id, func.max(Vote.elapsed_ms)).group_by(
        Vote.volunteer_id, Vote.task_id
    )
    if project is not None:
        query = query.join(Task, Task.id == Vote.task_id).where(Task.project_id == project.id)
    times: dict[int, list[int]] = {}
    for volunteer_id, _task_id, elapsed in session.execute(query):
        times.setdefault(volunteer_id, []).append(int(elapsed))
    return times


def review_volunteers(
    session: Session, *, project: Project | None = None, limit: int = 500
) -> list[VolunteerReview]:
    """Volunteers who answered (in ``project``, if given), flagged ones first, then by answers."""
    answers_q = select(Vote.volunteer_id, func.count(Vote.id)).group_by(Vote.volunteer_id)
    tasks_q = (
        select(Task.volunteer_id, func.count(Task.id))
        .where(Task.state == TaskState.SUBMITTED)
        .group_by(Task.volunteer_id)
    )
    if project is not None:
        answers_q = answers_q.join(Task, Task.id == Vote.task_id).where(
            Task.project_id == project.id
        )
        tasks_q = tasks_q.where(Task.project_id == project.id)
    answers = dict(session.execute(answers_q).all())
    tasks = dict(session.execute(tasks_q).all())
    times = _task_times(session, project)
    creds = {
        c.volunteer_id: c
        for c in session.scalars(
            select(Credibility).where(
                Credibility.category == "", Credibility.volunteer_id.in_(list(answers))
            )
        )
    }
    estimates = credibility_estimates(session, sorted(answers))
    out = []
    for volunteer in session.scalars(select(Volunteer).where(Volunteer.id.in_(list(answers)))):
        cred = creds.get(volunteer.id)
        sens, spec = estimates[volunteer.id]
        gold_n = cred.gold_answers if cred else 0
        agreement = cred.gold_correct / gold_n if cred and gold_n else None
        own = times.get(volunteer.id)
        median = float(np.median(own)) if own else None
        n_tasks = tasks.get(volunteer.id, 0)
        n_answers = answers.get(volunteer.id, 0)
        out.append(
            VolunteerReview(
                id=volunteer.id,
                name=display_name(volunteer),
                answers=n_answers,
                tasks=n_tasks,
                sensitivity=sens,
                specificity=spec,
                gold_answers=gold_n,
                gold_agreement=agreement,
                median_task_ms=median,
                banned=volunteer.banned,
                ban_reason=volunteer.ban_reason,
                flags=suspicion_flags(
                    gold_n, agreement, median, n_tasks, answers=n_answers, youden=sens + spec - 1
                ),
            )
        )
    out.sort(key=lambda r: (not r.flags, -r.answers, r.id))
    return out[:limit]


def get_volunteer_by_id(session: Session, *, volunteer_id: int) -> Volunteer:
    volunteer = session.get(Volunteer, volunteer_id)
    if volunteer is None:
        raise NotFoundError(f"no volunteer {volunteer_id}")
    return volunteer


def unban_volunteer(session: Session, *, volunteer: Volunteer) -> None:
    """Count a volunteer's votes again (from the next recomputation on)."""
    volunteer.banned, volunteer.banned_at, volunteer.ban_reason = False, None, None


def projects_of_volunteer(session: Session, *, volunteer: Volunteer) -> list[int]:
    """The ids of the projects a volunteer has answered in (to recompute after a ban)."""
    rows = session.scalars(
        select(Task.project_id).where(Task.volunteer_id == volunteer.id).distinct()
    )
    return sorted(rows)
