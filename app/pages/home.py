"""The landing page: what Tessera is and the projects it holds."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from app.deps import SessionDep
from app.pages import templates
from app.services.project import list_project_summaries

router = APIRouter(include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
def home(request: Request, session: SessionDep) -> HTMLResponse:
    projects = list_project_summaries(session)
    return templates.TemplateResponse(request, "home.html", {"projects": projects})
