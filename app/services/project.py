"""Projects: create, find, list with their counts."""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import bindparam, func, select
from sqlalchemy.orm import Session

from app.dbapi import Copies
from app.models import Image, Project, Tag, Target
from app.models.project import DEFAULT_PROJECT_SETTINGS
from app.services.errors import ConflictError, InvalidInputError, NotFoundError

SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")


def slugify(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:64]
    return slug or "project"


FIND_PROJECT = select(Project).where(Project.slug == bindparam("slug"))


def find_project(session: Session, *, slug: str) -> Project | None:
    """The project of a slug (a statement built once: it runs on every task request)."""
    return session.scalar(FIND_PROJECT, {"slug": slug})


# The task path's lookup, on every request: a copy of the row (``app.dbapi``).
PROJECT_COPY = Copies(Project).where(Project.slug == bindparam("slug"))


def get_project(session: Session, *, slug: str, read_only: bool = False) -> Project:
    """The project of a slug (``read_only``: a copy of its row, outside the session)."""
    if read_only:
        project = PROJECT_COPY.first(session, {"slug": slug})
    else:
        project = find_project(session, slug=slug)
    if project is None:
        raise NotFoundError(f"no project {slug!r}; `tessera project list` shows the projects")
    return project


def create_project(
    session: Session, *, slug: str, name: str | None = None, description: str = ""
) -> Project:
    if not SLUG_RE.match(slug):
        raise InvalidInputError(
            f"{slug!r} is not a valid project slug (lower-case letters, digits and '-')"
        )
    if find_project(session, slug=slug) is not None:
        raise ConflictError(f"project {slug!r} already exists")
    # The frame is stored, not taken from the defaults: a project's cell addresses keep their
    # meaning whatever a later version's default is.
    settings = {"square_cells": DEFAULT_PROJECT_SETTINGS["square_cells"]}
    project = Project(slug=slug, name=name or slug, description=description, settings=settings)
    session.add(project)
    session.flush()
    return project


def square_cells(project: Project) -> bool:
    """Whether the project's pyramid lies on the square around each image (every cell a square
    in image space; every project made since migration 0005) or on the image itself
    (``ml.aggregation.grid``). Fixed when the project is made: votes are stored by address."""
    return bool(project.setting("square_cells"))


def project_has_images(session: Session, *, project: Project) -> bool:
    return (
        session.scalar(select(Image.id).where(Image.project_id == project.id).limit(1)) is not None
    )


def get_or_create_project(session: Session, *, slug: str, name: str | None = None) -> Project:
    return find_project(session, slug=slug) or create_project(session, slug=slug, name=name)


@dataclass(frozen=True)
class ProjectSummary:
    slug: str
    name: str
    description: str
    images: int
    tags: int
    targets: int


def _counts(session: Session, model: type[Image] | type[Tag] | type[Target]) -> dict[int, int]:
    rows = session.execute(select(model.project_id, func.count()).group_by(model.project_id))
    return {project_id: count for project_id, count in rows}


def list_project_summaries(session: Session) -> list[ProjectSummary]:
    images, tags, targets = _counts(session, Image), _counts(session, Tag), _counts(session, Target)
    projects = session.scalars(select(Project).order_by(Project.created_at, Project.id))
    return [
        ProjectSummary(
            slug=p.slug,
            name=p.name,
            description=p.description,
            images=images.get(p.id, 0),
            tags=tags.get(p.id, 0),
            targets=targets.get(p.id, 0),
        )
        for p in projects
    ]
