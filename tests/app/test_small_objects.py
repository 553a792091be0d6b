"""A tagged object that no first square showed is searched for one level down."""

from __future__ import annotations

from sqlalchemy import select, update

from app.models import Cell, ImageTag, ImageTagSource, Project, Target, Window
from app.services.crowd.settle import settle_target
from app.services.curation.triage import set_cell
from tests.app.conftest import HAS_PYRAMID, Live

SLUG = "demo"


def _nine_noes(live: Live) -> int:
    """Every first square of one evaluation target answered "no"; returns the windows of
    level 1 the target has once settled."""
    with live.factory() as session:
        target = session.scalars(  # one with a pyramid of its own (not a union of children)
            select(Target).where(Target.control.is_(False), HAS_PYRAMID).order_by(Target.id)
        ).first()
        project = session.scalar(select(Project).where(Project.slug == SLUG))
        assert target is not None and project is not None
        for cell in session.scalars(
            select(Cell).where(Cell.target_id == target.id, Cell.level == 1)
        ):
            set_cell(session, target=target, cell_id=cell.id, label=False, curator="c")
        settle_target(session, settings=live.settings, project=project, target=target)
        session.commit()
        return len(
            session.scalars(
                select(Window.id).where(Window.target_id == target.id, Window.level == 1)
            ).all()
        )


def test_nine_no_squares_on_a_tag_people_gave_open_the_nine_squares_as_windows(
    live: Live,
) -> None:
    assert _nine_noes(live) == 9


def test_a_tag_only_the_tagger_gave_is_not_searched_for(live: Live) -> None:
    with live.factory() as session:
        session.execute(update(ImageTag).values(source=ImageTagSource.CLASSIFIER))
        session.commit()
    assert _nine_noes(live) == 0
