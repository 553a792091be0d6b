"""Every target of a project, for curators: filtered, sorted and paged in the database.

The triage queue shows what waits for a decision; this is the way into any other target (a
collecting one that looks wrong, a complete one to check). Filters: tag, state and a part of the
image's file name. Sorting: by uncertainty (the mean closeness to 0.5 of the target's cells'
posteriors, gold and curator cells settled, computed in the same query so that a page of a
large project costs one query), by how many cells are still open, or by id. Pages hold
``PAGE_SIZE`` targets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from app.models import Cell, CellStatus, Consensus, Image, Project, Tag, Target, TargetState
from app.services.curation.triage import SETTLED
from app.services.errors import InvalidInputError

PAGE_SIZE = 50
TargetSort = Literal["uncertainty", "open", "id"]
SORTS: tuple[str, ...] = get_args(TargetSort)


@dataclass(frozen=True)
class TargetRow:
    target_id: int
    image_name: str
    tag: str
    state: str
    cells: int
    open_cells: int
    # Mean over its cells: 1 = nothing known, 0 = every cell settled; None without cells of its
    # own (a union of its parts).
    uncertainty: float | None


@dataclass(frozen=True)
class TargetPage:
    rows: list[TargetRow]
    total: int  # targets that match the filters
    page: int
    pages: int


def browse_targets(
    session: Session,
    *,
    project: Project,
    tag: str | None = None,
    state: str | None = None,
    image: str | None = None,
    sort: str = "uncertainty",
    page: int = 1,
) -> TargetPage:
    """One page of the project's targets that match the filters, sorted.

    Raises:
        InvalidInputError: an unknown state or sort, or a page below 1.
    """
    if state and state not in {s.value for s in TargetState}:
        known = ", ".join(s.value for s in TargetState)
        raise InvalidInputError(f"unknown state {state!r}: choose one of {known}")
    if sort not in SORTS:
        raise InvalidInputError(f"unknown sort {sort!r}: choose one of {', '.join(SORTS)}")
    if page < 1:
        raise InvalidInputError("pages start at 1")
    # A gold or curator cell is settled whatever its votes say (as in the triage queue).
    closeness = case(
        (Cell.retire_reason.in_(SETTLED), 0.0),
        else_=1.0 - func.abs(2.0 * func.coalesce(Consensus.posterior, 0.5) - 1.0),
    )
    stats = (
        select(
            Cell.target_id.label("target_id"),
            func.count(Cell.id).label("cells"),
            func.sum(case((Cell.status == CellStatus.OPEN, 1), else_=0)).label("open_cells"),
            func.avg(closeness).label("uncertainty"),
        )
        .join(Consensus, Consensus.cell_id == Cell.id, isouter=True)
        .group_by(Cell.target_id)
        .subquery()
    )
    query = (
        select(
            Target.id,
            Image.file_name,
            Tag.name,
            Target.state,
            func.coalesce(stats.c.cells, 0),
            func.coalesce(stats.c.open_cells, 0),
            stats.c.uncertainty,
        )
        .join(Image, Image.id == Target.image_id)
        .join(Tag, Tag.id == Target.tag_id)
        .join(stats, stats.c.target_id == Target.id, isouter=True)
        .where(Target.project_id == project.id)
    )
    if tag:
        query = query.where(Tag.name == tag)
    if state:
        query = query.where(Target.state == TargetState(state))
    if image:
        pattern = "%" + image.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        query = query.where(Image.file_name.ilike(pattern, escape="\\"))
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    order = {
        # A target without cells of its own (a union of its parts) comes last.
        "uncertainty": (func.coalesce(stats.c.uncertainty, -1.0).desc(), Target.id),
        "open": (func.coalesce(stats.c.open_cells, 0).desc(), Target.id),
        "id": (Target.id,),
    }[sort]
    pages = max(1, math.ceil(total / PAGE_SIZE))
    page = min(
        page, pages
    )  # past the last page (a huge number overflowed SQL's integers): the last
    rows = session.execute(
        query.order_by(*order).limit(PAGE_SIZE).offset((page - 1) * PAGE_SIZE)
    ).all()
    return TargetPage(
        rows=[
            TargetRow(
                target_id=t,
                image_name=name,
                tag=tag_name,
                state=TargetState(target_state).value,
                cells=int(cells),
                open_cells=int(open_cells),
                uncertainty=None if unc is None else float(unc),
            )
            for t, name, tag_name, target_state, cells, open_cells, unc in rows
        ],
        total=total,
        page=page,
        pages=pages,
    )
