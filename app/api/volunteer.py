"""The current volunteer's own view of their contribution."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from app.deps import KnownVolunteerDep, SessionDep, VolunteerDep, WriteSessionDep, limit_address
from app.schemas.task import VolunteerStatsRead, VolunteerUpdate
from app.services.volunteer import rename_volunteer, volunteer_stats

# Counted against the caller's address like the task routes: a script without cookies must not
# be able to make identities (PATCH) or load the database (GET) without limit.
router = APIRouter(prefix="/volunteers", tags=["volunteers"], dependencies=[Depends(limit_address)])

# What a visitor who has not taken part yet sees: reading makes no identity.
NEWCOMER = VolunteerStatsRead(
    name="New volunteer", answers=0, tasks=0, streak_days=0, quality="new"
)


@router.get(
    "/me",
    response_model=VolunteerStatsRead,
    summary="Answers, tasks and a coarse quality level (never which tiles were known)",
)
def read_me(session: SessionDep, volunteer: KnownVolunteerDep) -> VolunteerStatsRead:
    if volunteer is None:
        return NEWCOMER
    stats = volunteer_stats(session, volunteer=volunteer)
    return VolunteerStatsRead.model_validate(stats, from_attributes=True)


@router.patch("/me", response_model=VolunteerStatsRead, summary="Choose a display name")
def update_me(
    body: VolunteerUpdate, session: WriteSessionDep, volunteer: VolunteerDep
) -> VolunteerStatsRead:
    rename_volunteer(session, volunteer=volunteer, name=body.display_name)
    stats = volunteer_stats(session, volunteer=volunteer)
    session.commit()
    return VolunteerStatsRead.model_validate(stats, from_attributes=True)
