"""The current volunteer's own view of their contribution."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import VolunteerDep, WriteSessionDep
from app.schemas.task import VolunteerStatsRead
from app.services.volunteer import volunteer_stats

router = APIRouter(prefix="/volunteers", tags=["volunteers"])


@router.get(
    "/me",
    response_model=VolunteerStatsRead,
    summary="Answers, tasks and a coarse quality level (never which tiles were known)",
)
def read_me(session: WriteSessionDep, volunteer: VolunteerDep) -> VolunteerStatsRead:
    stats = volunteer_stats(session, volunteer=volunteer)
    session.commit()
    return VolunteerStatsRead(answers=stats.answers, tasks=stats.tasks, quality=stats.quality)
