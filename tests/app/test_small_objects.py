"""A tagged object that no first square showed is searched for one level down."""

from __future__ import annotations

import pytest
from sqlalchemy import insert, literal, select, update
from sqlalchemy.orm import Session

from app.models import Cell, Consensus, Image, ImageTag, ImageTagSource, Project, Target, Window
from app.services.crowd.opening import OUTSIDE_LOGODDS, window_value
from app.services.crowd.settle import settle_target, target_areas
from app.services.curation.triage import set_cell
from app.services.masks.composition import compose_target
from ml.aggregation import grid
from ml.aggregation.acquisition import MIN_OBJECT_AREA
from ml.aggregation.rules import SEARCH_PRIOR
from ml.aggregation.votes import logit, sigmoid
from tests.app.conftest import HAS_PYRAMID, Live

SLUG = "demo"


def _first_target(session: Session) -> Target | None:
    """The first evaluation target with a pyramid of its own (not a union of children)."""
    return session.scalars(
        select(Target).where(Target.control.is_(False), HAS_PYRAMID).order_by(Target.id)
    ).first()


def _nine_noes(live: Live) -> list[float]:
    """Every first square of one evaluation target answered "no"; returns the priors of the
    squares of the windows of level 1 the target has once settled."""
    with live.factory() as session:
        target = _first_target(session)
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


def test_a_tag_people_gave_is_searched_for_though_the_tagger_gave_it_too(live: Live) -> None:
    """The tagger's opinion of a tag people gave is a row of its own; it used to be read
    instead of theirs (it sorts first), and a learning loop's re-tagging stopped every search
    for a small object the tagger also saw (4 of 31 small targets searched in a demo loop arm,
    against about 20 in the crowd arm)."""
    with live.factory() as session:
        session.execute(
            insert(ImageTag).from_select(
                ["image_id", "tag_id", "source", "probability", "status", "created_at"],
                select(
                    ImageTag.image_id,
                    ImageTag.tag_id,
                    literal(ImageTagSource.CLASSIFIER.value),
                    literal(0.7),
                    ImageTag.status,
                    ImageTag.created_at,
                ),
            )
        )
        session.commit()
    assert len(_nine_noes(live)) == 81


def test_a_search_is_valued_as_looking_for_a_small_object(live: Live) -> None:
    """The 81 squares of a search hold only their prior until somebody answers: the object's
    expected area comes from the nine answered squares (the smallest object the picker
    expects), not from 81 guesses of 5% each, which made a search worth a quarter of what it
    is and left it behind every large object's border."""
    _nine_noes(live)
    with live.factory() as session:
        target = _first_target(session)
        assert target is not None
        windows = list(
            session.scalars(
                select(Window).where(
                    Window.target_id == target.id, Window.level == 1, Window.state == "open"
                )
            )
        )
        assert len(windows) >= 4
        assert target_areas(session, target_ids={target.id})[target.id] == MIN_OBJECT_AREA
        for window in windows:
            open_cells = session.scalars(
                select(Cell.prior_logodds).where(Cell.window_id == window.id, Cell.status == "open")
            ).all()
            expected = window_value(
                target.priority,
                [float(sigmoid(p)) for p in open_cells],
                control=False,
                level=1,
                area=MIN_OBJECT_AREA,
                belief=1.0,
            )
            assert window.value == pytest.approx(expected)


def test_a_search_square_people_saw_the_object_in_is_in_its_mask_before_it_settles(
    live: Live,
) -> None:
    """Two credible "yes" and a "no" leave a search square under even odds (its prior is
    ``SEARCH_PRIOR``): the object people tagged is there, so the mask claims that square
    rather than nothing; a tag only the tagger gave does not."""
    _nine_noes(live)
    with live.factory() as session:
        target = _first_target(session)
        assert target is not None
        image = session.get(Image, target.image_id)
        square = session.scalars(
            select(Cell).where(
                Cell.target_id == target.id, Cell.level == 2, Cell.prior_logodds == SEARCH_PRIOR
            )
        ).first()
        assert image is not None and square is not None
        assert not compose_target(session, settings=live.settings, target=target).hard.any()
        session.execute(
            update(Consensus)
            .where(Consensus.cell_id == square.id)
            .values(n_votes=3, posterior=0.2, logodds=float(logit(0.2)))
        )
        session.flush()
        rect = grid.cell_rect(
            grid.Cell(2, square.row, square.col), image.height, image.width, square=True
        )
        hard = compose_target(session, settings=live.settings, target=target).hard
        inside = hard[rect.top : rect.bottom, rect.left : rect.right].sum()
        assert inside > 0 and inside >= 0.9 * hard.sum()  # there, give or take the margin
        session.execute(update(ImageTag).values(source=ImageTagSource.CLASSIFIER))
        session.flush()
        assert not compose_target(session, settings=live.settings, target=target).hard.any()
