"""A square that credible volunteers split on holds a sliver: it retires as holding the object
and opens its finer window, instead of taking votes until its budget is spent."""

from __future__ import annotations

from sqlalchemy import select

from app.models import Cell, CellStatus, Consensus, RetireReason, Tag, Target, Volunteer, Window
from app.services.crowd.consensus import COUNT_COLUMNS
from app.services.volunteer import credibility_of
from ml.aggregation.simulate import VolunteerProfile
from tests.app.conftest import HAS_PYRAMID, Live
from tests.app.crowd import SimulatedVolunteer

SLUG = "demo"
# Two careful people: one notices any part of the object in a square, one only a part that
# fills half of it. Neither errs otherwise.
KEEN = VolunteerProfile("keen", 1.0, 1.0, 1e-9, 2.0)
COARSE = VolunteerProfile("coarse", 1.0, 1.0, 0.5, 2.0)
# Known to be right about five times in six, on many answers: a vote moves a square's odds
# about 5x, so that two yeses and one or two noes leave it unsure, and what agreement adds in
# this test hardly moves that.
SEEN = {"pos_yes": 170.0, "pos_no": 30.0, "neg_no": 170.0, "neg_yes": 30.0}


def _crowd(live: Live) -> list[SimulatedVolunteer]:
    crowd = []
    for seed, profile in enumerate([KEEN, KEEN, COARSE, COARSE]):
        v = live.volunteer(seed=seed)
        v.profile = profile
        response = v.client.patch("/api/volunteers/me", json={"display_name": f"V{seed}"})
        assert response.status_code == 200
        crowd.append(v)
    with live.factory() as session:
        for volunteer_id in session.scalars(select(Volunteer.id)):
            row = credibility_of(session, volunteer_id=volunteer_id)
            for name in COUNT_COLUMNS:
                setattr(row, name, SEEN.get(name, 0))
        session.commit()
    return crowd


def test_a_square_credible_people_split_on_retires_split_and_opens_its_window(
    live: Live,
) -> None:
    crowd = _crowd(live)
    with live.factory() as session:  # one tag's windows, the first a demo target holds
        tag = session.scalar(
            select(Tag.name)
            .join(Target, Target.tag_id == Tag.id)
            .where(Target.control.is_(False), HAS_PYRAMID)
            .order_by(Target.id)
            .limit(1)
        )
    assert tag is not None
    for _ in range(40):  # every window of the tag, by all four
        if not any([v.step(SLUG, kind="window", tag=tag) for v in crowd]):
            break
    with live.factory() as session:
        rows = session.execute(
            select(Cell, Target, Consensus.n_votes)
            .join(Target, Target.id == Cell.target_id)
            .join(Consensus, Consensus.cell_id == Cell.id)
            .where(Cell.level == 1, Target.control.is_(False), Consensus.n_votes >= 3)
        ).all()
        slivers, others = [], []
        for cell, target, _ in rows:
            coverage = live.truths.cell_coverage(session, target, cell)
            (slivers if 0 < coverage < COARSE.coverage_threshold else others).append(cell)
        opened = {
            (w.target_id, w.row, w.col)
            for w in session.scalars(select(Window).where(Window.level == 1))
        }
        # Two said yes and two no on every sliver: each retired split, holding the object, and
        # its own window opened (the refinement asks one level down, where the part is larger).
        assert slivers
        for cell in slivers:
            assert cell.status == CellStatus.RETIRED
            assert (cell.retire_reason, cell.label, cell.uncertain) == (
                RetireReason.SPLIT,
                True,
                False,
            )
        assert any((c.target_id, c.row, c.col) in opened for c in slivers)
        # Where all four agreed, the square retired on confidence.
        assert others and all(c.retire_reason == RetireReason.CONFIDENT for c in others)
