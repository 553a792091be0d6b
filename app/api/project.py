"""Projects over JSON."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import SessionDep
from app.schemas.project import ProjectRead
from app.services.errors import NotFoundError
from app.services.project import list_project_summaries

router = APIRouter(prefix="/projects", tags=["projects"])


@router.get("", response_model=list[ProjectRead], summary="List projects with their counts")
def list_projects(session: SessionDep) -> list[ProjectRead]:
    return [ProjectRead.model_validate(s) for s in list_project_summaries(session)]


@router.get(
    "/{slug}",
    response_model=ProjectRead,
    summary="One project with its counts",
    responses={404: {"description": "No such project"}},
)
def read_project(slug: str, session: SessionDep) -> ProjectRead:
    for summary in list_project_summaries(session):
        if summary.slug == slug:
            return ProjectRead.model_validate(summary)
    raise NotFoundError(f"no project {slug!r}")
