"""A target's current mask moves only with answers: windows opened and not yet answered leave it
as it was."""

from __future__ import annotations

import numpy as np
from sqlalchemy import select, update

from app.models import Cell, Consensus, Project, Target, Window
from app.services.crowd.opening import load_truth
from app.services.crowd.settle import settle_target
from app.services.curation.triage import set_cell
from app.services.masks.composition import compose_target, mask_inputs
from ml.aggregation import grid
from tests.app.conftest import HAS_PYRAMID, Live

SLUG = "demo"


def test_unanswered_finer_windows_leave_the_mask_as_the_answers_made_it(live: Live) -> None:
    with live.factory() as session:
        project = session.scalar(select(Project).where(Project.slug == SLUG))
        assert project is not None
        for target in session.scalars(
            select(Target).where(Target.control.is_(False)).order_by(Target.id)
        ):
            truth = load_truth(session, live.settings, target)
            if truth is None or not truth.any():
                continue
            cells = list(
                session.scalars(select(Cell).where(Cell.target_id == target.id, Cell.level == 1))
            )
            coverage = grid.cell_coverage(
                truth, [grid.Cell(1, c.row, c.col) for c in cells], square=True
            )
            if 0 < (coverage > 0).sum() < 9:  # a border to refine
                break
        else:
            raise AssertionError("the demo has no evaluation target with a border")
        for cell, covered in zip(cells, coverage, strict=True):
            set_cell(session, target=target, cell_id=cell.id, label=bool(covered > 0), curator="c")
        session.flush()
        before = compose_target(session, settings=live.settings, target=target).hard
        settle_target(session, settings=live.settings, project=project, target=target)
        session.flush()
        opened = session.scalars(
            select(Window.id).where(Window.target_id == target.id, Window.level == 1)
        ).all()
        after = compose_target(session, settings=live.settings, target=target).hard
        assert opened, "the border squares open finer windows"
        assert np.array_equal(before, after)


def test_the_composition_knows_which_squares_only_people_s_no_answered(live: Live) -> None:
    """A square whose votes all say "no" is background however few said it
    (``ml.composition.trimap``'s ``no_only``); one with a "yes" among them, or no votes yet,
    is not."""
    with live.factory() as session:
        target = session.scalars(
            select(Target).where(Target.control.is_(False), HAS_PYRAMID).order_by(Target.id)
        ).first()
        assert target is not None
        cells = session.scalars(
            select(Cell).where(Cell.target_id == target.id, Cell.level == 1).order_by(Cell.id)
        ).all()
        counts = {cells[0].id: (1, 0), cells[1].id: (3, 1), cells[2].id: (2, 0)}
        for cell_id, (n, yes) in counts.items():
            session.execute(
                update(Consensus)
                .where(Consensus.cell_id == cell_id)
                .values(n_votes=n, n_yes=yes, posterior=0.02)
            )
        session.flush()
        inputs = mask_inputs(session, settings=live.settings, target=target)
        by_address = dict(zip(inputs.cells, inputs.no_only or [], strict=True))
        said = [by_address[grid.Cell(1, c.row, c.col)] for c in cells]
        assert said[:3] == [True, False, True]
        assert not any(said[3:])  # nobody answered them
