"""The current volunteer's own view of their contribution."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import VolunteerDep, WriteSessionDep
from app.schemas.task import VolunteerStatsRead, VolunteerUpdate
from app.services.volunteer import rename_volunteer, volunteer_stats

router = APIRouter(prefix="/volunteers", tags=["volunteers"])


@router.get(
    "/me",
    response_model=VolunteerStatsRead,
    summary="Answers, tasks and a coarse quality level (never which tiles were known)",
)
def read_me(session: WriteSessionDep, volunteer: VolunteerDep) -> VolunteerStatsRead:
    stats = volunteer_stats(session, volunteer=volunteer)
    session.commit()
    return VolunteerStatsRead.model_validate(stats, from_attributes=True)


@router.patch("/me", response_model=VolunteerStatsRead, summary="Choose a display name")
def update_me(
    body: VolunteerUpdate, session: WriteSessionDep, volunteer: VolunteerDep
) -> VolunteerStatsRead:
    rename_volunteer(session, volunteer=volunteer, name=body.display_name)
    stats = volunteer_stats(session, volunteer=volunteer)
    session.commit()
    return VolunteerStatsRead.model_validate(stats, from_attributes=True)
