"""The volunteer's pages: the grid, their contribution, the leaderboard."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from app.deps import KnownVolunteerDep, SessionDep
from app.pages import templates
from app.services.project import get_project
from app.services.volunteer import (
    MIN_GOLD_FOR_LEVEL,
    QUALITY_LEVELS,
    leaderboard,
    volunteer_stats,
)

router = APIRouter(include_in_schema=False)


@router.get("/p/{slug}", response_class=HTMLResponse)
def play(request: Request, slug: str, session: SessionDep) -> HTMLResponse:
    project = get_project(session, slug=slug)
    return templates.TemplateResponse(request, "play.html", {"project": project})


@router.get("/me", response_class=HTMLResponse)
def me(request: Request, session: SessionDep, volunteer: KnownVolunteerDep) -> HTMLResponse:
    stats = volunteer_stats(session, volunteer=volunteer) if volunteer else None
    board = leaderboard(session, volunteer=volunteer, limit=100)
    rank = next((row.rank for row in board if row.is_you), None)
    levels = [(round(100 * bound), name) for bound, name in QUALITY_LEVELS]
    return templates.TemplateResponse(
        request,
        "me.html",
        {"stats": stats, "rank": rank, "levels": levels, "min_known": MIN_GOLD_FOR_LEVEL},
    )


@router.get("/leaderboard", response_class=HTMLResponse)
def board(request: Request, session: SessionDep, volunteer: KnownVolunteerDep) -> HTMLResponse:
    rows = leaderboard(session, volunteer=volunteer)
    return templates.TemplateResponse(request, "leaderboard.html", {"rows": rows})
