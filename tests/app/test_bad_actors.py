"""Bad actors on the whole volunteer path: what their votes may and may not spend."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.models import (
    Cell,
    CellStatus,
    Consensus,
    Gold,
    GoldSource,
    Project,
    RetireReason,
    Target,
    Volunteer,
    Window,
    WindowState,
)
from app.models.project import DEFAULT_PROJECT_SETTINGS
from app.services.crowd.consensus import COUNT_COLUMNS
from app.services.curation.triage import set_cell
from app.services.recompute import recompute_project
from app.services.volunteer import ban_volunteer, credibility_of
from ml.aggregation.simulate import PROFILES, VolunteerProfile
from tests.app.conftest import Live
from tests.app.crowd import SimulatedVolunteer

SLUG = "demo"
COIN = 30  # answers of each kind on gold: a volunteer shown to toss a coin
MAX_ROUNDS = 30


def test_random_clickers_do_not_spend_a_cells_vote_budget(live: Live) -> None:
    clickers = [live.volunteer("random_clicker", seed) for seed in range(10)]
    for i, v in enumerate(clickers):  # an identity (choosing a name makes one), no vote yet
        response = v.client.patch("/api/volunteers/me", json={"display_name": f"Coin {i}"})
        assert response.status_code == 200
    with live.factory() as session:
        for volunteer_id in session.scalars(select(Volunteer.id)):
            row = credibility_of(session, volunteer_id=volunteer_id)
            for name in COUNT_COLUMNS:  # as many right as wrong answers on both kinds of gold
                setattr(row, name, COIN)
        session.commit()
    for _ in range(MAX_ROUNDS):  # one tag's windows, until each clicker has seen them all
        if not any([v.step(SLUG, tag="shape", kind="window") for v in clickers]):
            break
    budget = int(DEFAULT_PROJECT_SETTINGS["vote_budget"])
    with live.factory() as session:
        spent = session.scalar(
            select(func.count()).select_from(Cell).where(Cell.retire_reason == RetireReason.BUDGET)
        )
        most = session.scalar(
            select(func.max(Consensus.n_votes))
            .join(Cell, Cell.id == Consensus.cell_id)
            .where(Cell.retire_reason.is_(None))
        )
    # Ten coins were asked about every cell of the tag, more often than its budget of votes, and
    # the cells are still open: only credible votes spend it.
    assert spent == 0
    assert most is not None and most > budget


# Answers the opposite of what a careful volunteer sees, every time.
LIAR = VolunteerProfile("liar", 0.0, 0.0, PROFILES["diligent"].coverage_threshold, 1.8)


def _retired_by_liars(live: Live, n: int) -> set[int]:
    """``n`` newcomer liars answer one tag's windows until nothing is left for them; returns
    the cells retired on their votes."""
    crowd = [
        SimulatedVolunteer(TestClient(live.app), LIAR, np.random.default_rng(seed), live.truths)
        for seed in range(n)
    ]
    for _ in range(MAX_ROUNDS):  # a tag without a control target: no gold to catch them
        if not any([v.step(SLUG, tag="red", kind="window") for v in crowd]):
            break
    with live.factory() as session:
        retired = set(
            session.scalars(
                select(Cell.id).where(
                    Cell.status == CellStatus.RETIRED,
                    Cell.retire_reason.in_([RetireReason.CONFIDENT, RetireReason.BUDGET]),
                )
            )
        )
    return retired


def _recompute(live: Live) -> None:
    with live.factory() as session:
        project = session.scalar(select(Project).where(Project.slug == SLUG))
        assert project is not None
        recompute_project(session, settings=live.settings, project=project)
        session.commit()


def _sees(live: Live, session: Session, target: Target, cell: Cell) -> bool:
    coverage = live.truths.cell_coverage(session, target, cell)
    return coverage >= PROFILES["diligent"].coverage_threshold


def _wrong(live: Live, cell_ids: set[int]) -> set[int]:
    """Retired cells whose label is not what a careful volunteer sees."""
    with live.factory() as session:
        cells = list(
            session.scalars(
                select(Cell).where(Cell.id.in_(cell_ids), Cell.status == CellStatus.RETIRED)
            )
        )
        wrong = set()
        for cell in cells:
            target = session.get(Target, cell.target_id)
            assert target is not None
            if cell.label != _sees(live, session, target, cell):
                wrong.add(cell.id)
    return wrong


def test_cells_decided_by_banned_volunteers_open_again_and_are_served(live: Live) -> None:
    retired = _retired_by_liars(live, 5)
    assert retired  # three newcomers are believed until gold or EM says otherwise
    with live.factory() as session:
        for volunteer in session.scalars(select(Volunteer)):
            ban_volunteer(session, volunteer=volunteer, reason="adversarial answers")
        session.commit()
    _recompute(live)
    with live.factory() as session:
        cells = list(session.scalars(select(Cell).where(Cell.id.in_(retired))))
        assert {c.status for c in cells} == {CellStatus.OPEN}
        windows = {c.window_id for c in cells}
        states = set(session.scalars(select(Window.state).where(Window.id.in_(windows))))
        assert states == {WindowState.OPEN}
    # Somebody who looks is asked about them again.
    honest = live.volunteer("diligent", 7)
    task = honest.next_task(SLUG, tag="shape", kind="window")
    assert task is not None


@pytest.mark.parametrize("live", [{"gold_rate": 0.0}], indirect=True)
def test_the_em_pass_undoes_what_adversaries_decided_before_they_were_found_out(
    live: Live,
) -> None:
    retired = _retired_by_liars(live, 5)  # no gold served: believed as newcomers
    # A curator then answers every other of those cells: gold that gives the liars away. (The
    # demo holds every evaluation target's truth out as frozen gold, which a curator's answer
    # keeps frozen; here it is to count.)
    with live.factory() as session:
        for n, cell in enumerate(session.scalars(select(Cell).where(Cell.id.in_(retired)))):
            target = session.get(Target, cell.target_id)
            if n % 2 == 0 and target is not None and cell.status == CellStatus.RETIRED:
                truth = _sees(live, session, target, cell)
                set_cell(session, target=target, cell_id=cell.id, label=truth, curator="c")
        session.execute(update(Gold).where(Gold.source == GoldSource.CURATOR).values(frozen=False))
        session.commit()
        kept = set(
            session.scalars(
                select(Cell.id).where(
                    Cell.id.in_(retired), Cell.retire_reason != RetireReason.CURATOR
                )
            )
        )
    wrong = _wrong(live, kept)
    # They retired cells the wrong way (fewer than as mere newcomers: agreement already shows
    # them saying yes to nearly everything, see test_agreement).
    assert len(wrong) >= 1, len(wrong)
    _recompute(live)
    with live.factory() as session:
        reopened = session.scalar(
            select(func.count()).where(Cell.id.in_(kept), Cell.status == CellStatus.OPEN)
        )
    still_wrong = _wrong(live, kept)
    # Each cell they got wrong is now right (their votes read inverted) or open again.
    assert len(still_wrong) <= len(wrong) // 10, (len(wrong), len(still_wrong), reopened)
