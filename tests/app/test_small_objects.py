"""A tagged object that no first square showed is searched for one level down."""

from __future__ import annotations

from sqlalchemy import select, update

from app.models import Cell, ImageTag, ImageTagSource, Project, Target, Window
from app.services.crowd.opening import OUTSIDE_LOGODDS
from app.services.crowd.settle import settle_target
from app.services.curation.triage import set_cell
from ml.aggregation.rules import SEARCH_PRIOR
from tests.app.conftest import HAS_PYRAMID, Live

SLUG = "demo"


def _nine_noes(live: Live) -> list[float]:
    """Every first square of one evaluation target answered "no"; returns the priors of the
    squares of the windows of level 1 the target has once settled."""
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
        windows = select(Window.id).where(Window.target_id == target.id, Window.level == 1)
        return list(session.scalars(select(Cell.prior_logodds).where(Cell.window_id.in_(windows))))


def test_nine_no_squares_on_a_tag_people_gave_open_the_nine_squares_as_windows(
    live: Live,
) -> None:
    priors = _nine_noes(live)
    assert len(priors) == 81
    # Few of the 81 squares hold a sliver of the object: each starts sure enough that one
    # credible "no" retires it; squares wholly outside the image (the square frame's margin)
    # open retired.
    assert SEARCH_PRIOR in priors and set(priors) <= {SEARCH_PRIOR, OUTSIDE_LOGODDS}


def test_a_tag_only_the_tagger_gave_is_not_searched_for(live: Live) -> None:
    with live.factory() as session:
        session.execute(update(ImageTag).values(source=ImageTagSource.CLASSIFIER))
        session.commit()
    assert _nine_noes(live) == []
