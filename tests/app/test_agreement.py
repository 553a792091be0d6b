"""Credibility learned online from agreement, in a project without gold."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.models import Cell, Project, RetireReason, Target, Volunteer
from app.services.crowd.consensus import base_rates, credibility_estimates
from app.services.crowd.opening import load_truth, outside_image
from app.services.project import square_cells
from ml.aggregation import grid
from ml.aggregation.simulate import PROFILES, VolunteerProfile
from tests.app.conftest import Live
from tests.app.crowd import SimulatedVolunteer

SLUG = "demo"
ROUNDS = 12
LIAR = VolunteerProfile("liar", 0.0, 0.0, PROFILES["diligent"].coverage_threshold, 1.8)


def _run(live: Live, crowd: list[SimulatedVolunteer], tag: str) -> None:
    for _ in range(ROUNDS):
        if not any([v.step(SLUG, tag=tag, kind="window") for v in crowd]):
            break


def _youden(live: Live) -> list[float]:
    with live.factory() as session:
        ids = list(session.scalars(select(Volunteer.id).order_by(Volunteer.id)))
        estimates = credibility_estimates(session, ids)
    return [s + c - 1.0 for s, c in (estimates[v] for v in ids)]


@pytest.mark.parametrize("live", [{"gold_rate": 0.0}], indirect=True)
def test_agreeing_volunteers_earn_credibility_and_settle_cells_before_any_em_pass(
    live: Live,
) -> None:
    crowd = [live.volunteer("diligent", seed) for seed in range(5)]
    _run(live, crowd, "shape")
    # Without gold and without an EM pass, the prior's J is 1/3: agreement raised it.
    assert min(_youden(live)) > 1 / 3 + 0.05 and np.mean(_youden(live)) > 0.45, _youden(live)
    with live.factory() as session:
        confident = session.scalar(
            select(func.count()).where(Cell.retire_reason == RetireReason.CONFIDENT)
        )
    assert confident and confident >= 9


# Cells down to 8 px: these four scenes then hold enough squares for the liars' answers to show.
DEEP = {"gold_rate": 0.0, "min_cell_px": 8}


@pytest.mark.parametrize("live", [DEEP], indirect=True)
def test_volunteers_who_say_yes_to_nearly_everything_lose_their_weight_without_gold(
    live: Live,
) -> None:
    crowd = [
        SimulatedVolunteer(TestClient(live.app), LIAR, np.random.default_rng(seed), live.truths)
        for seed in range(5)
    ]
    _run(live, crowd, "red")  # mostly negative cells: a liar says yes to them
    assert max(_youden(live)) < 0.1, _youden(live)


@pytest.mark.parametrize("live", [DEEP], indirect=True)
def test_liars_among_an_honest_majority_lose_their_weight_without_gold(live: Live) -> None:
    honest = [live.volunteer("diligent", seed) for seed in range(5)]
    liars = [
        SimulatedVolunteer(TestClient(live.app), LIAR, np.random.default_rng(seed), live.truths)
        for seed in range(5, 7)
    ]
    _run(live, honest + liars, "shape")
    j = _youden(live)  # volunteers in creation order: the honest five, then the liars
    assert min(j[:5]) > max(j[5:]) and max(j[5:]) < 0.1, j


def test_agreement_scores_votes_against_the_share_of_control_squares_that_show_the_tag(
    live: Live,
) -> None:
    with live.factory() as session:
        project = session.scalars(select(Project).where(Project.slug == SLUG)).one()
        rates = base_rates(session, project=project)
        # The same share, from the control truth's pixels: squares holding any of the object.
        shown, squares = 0, 0
        for target in session.scalars(select(Target).where(Target.control)):
            mask = load_truth(session, live.settings, target)
            assert mask is not None
            cells = [
                grid.Cell(c.level, c.row, c.col)
                for c in session.scalars(select(Cell).where(Cell.target_id == target.id))
                if c.level == 1 and not outside_image(c)
            ]
            coverage = grid.cell_coverage(mask, cells, square=square_cells(project))
            shown, squares = shown + int((coverage > 0).sum()), squares + len(cells)
    assert squares and 0 < shown < squares
    assert rates[1] == pytest.approx(np.log((shown + 1) / (squares - shown + 1)))
    assert rates[1] < 0  # most squares of the demo's scenes are empty


@pytest.mark.parametrize("live", [{"control_share": 0.0}], indirect=True)
def test_without_control_truth_agreement_has_no_base_rate(live: Live) -> None:
    with live.factory() as session:
        project = session.scalars(select(Project).where(Project.slug == SLUG)).one()
        assert base_rates(session, project=project) == {}
