"""The landing page: what Tessera is and the projects it holds."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse

from app.deps import SessionDep
from app.pages import FRONTEND_DIR, templates
from app.services.project import list_project_summaries

router = APIRouter(include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
def home(request: Request, session: SessionDep) -> HTMLResponse:
    projects = list_project_summaries(session)
    return templates.TemplateResponse(request, "home.html", {"projects": projects})


@router.get("/favicon.ico")
def favicon() -> FileResponse:
    """The icon, for clients that ask for it where browsers used to (pages link the SVG)."""
    return FileResponse(
        FRONTEND_DIR / "static" / "favicon.svg",
        media_type="image/svg+xml",
        headers={"Cache-Control": "public, max-age=86400"},
    )
