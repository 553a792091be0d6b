"""A window with one square left to ask is served with its neighbours' open squares: the grid of
nine same-level squares shifted over the windows beside it."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select, update

from app.db import utcnow
from app.models import (
    Cell,
    CellStatus,
    Image,
    RetireReason,
    Target,
    TaskTile,
    Volunteer,
    Vote,
    Window,
    WindowState,
)
from app.services.crowd.opening import open_windows
from ml.aggregation import grid
from tests.app.conftest import HAS_PYRAMID, Live

SLUG = "demo"


def _two_windows(live: Live) -> int:
    """Only two windows open, side by side on level 2: the left one settled but for its middle
    right square, the right one but for its left column (and worth less: the left one is
    served)."""
    with live.factory() as session:
        target = session.scalars(
            select(Target).where(Target.control.is_(False), HAS_PYRAMID).order_by(Target.id)
        ).first()
        assert target is not None
        session.execute(update(Window).values(state=WindowState.CLOSED))
        image = session.get(Image, target.image_id)
        assert image is not None
        left, right = (
            session.get_one(Window, window_id)
            for window_id in open_windows(
                session,
                target=target,
                parents=[grid.Cell(1, 1, 0), grid.Cell(1, 1, 1)],
                truth=None,
                image=image,
                square=False,  # every square inside the image, whatever its shape
            )
        )
        left.value, right.value = 10.0, 1.0
        for cell in session.scalars(select(Cell).where(Cell.window_id.in_([left.id, right.id]))):
            if (cell.row, cell.col) != (4, 2) and cell.col != 3:
                cell.status, cell.label, cell.retired_at = CellStatus.RETIRED, False, utcnow()
                cell.retire_reason = RetireReason.CONFIDENT
        session.commit()
        return left.id


@pytest.mark.parametrize("live", [{"gold_rate": 0.0}], indirect=True)
def test_a_window_with_one_open_square_is_asked_with_the_open_squares_beside_it(
    live: Live,
) -> None:
    left = _two_windows(live)
    volunteer = live.volunteer("diligent", 3)
    task = volunteer.next_task(SLUG, kind="window")
    assert task is not None and task["kind"] == "window"
    with live.factory() as session:
        shown = session.execute(
            select(Cell.level, Cell.row, Cell.col)
            .join(TaskTile, TaskTile.cell_id == Cell.id)
            .where(TaskTile.task_id == task["id"])
            .order_by(TaskTile.position)
        ).all()
        leased = session.get(Window, left)
        assert leased is not None and leased.leased_until is not None  # the lease it keeps
    # The left window's open square with the right window's three: row-major, one area.
    assert [tuple(c) for c in shown] == [(2, r, c) for r in (3, 4, 5) for c in (1, 2, 3)]
    assert volunteer.client.get(task["context_url"]).status_code == 200
    volunteer.answer(SLUG, task)
    with live.factory() as session:
        voted = session.scalars(
            select(Cell.col).join(Vote, Vote.cell_id == Cell.id).where(Vote.task_id == task["id"])
        ).all()
        assert sorted(voted) == [1, 1, 1, 2, 2, 2, 3, 3, 3]
        released = session.get(Window, left)
        assert released is not None and released.leased_until is None
    # Both windows' open squares are answered: neither is this volunteer's to see again.
    assert volunteer.next_task(SLUG, kind="window") is None


@pytest.mark.parametrize("live", [{"gold_rate": 0.0}], indirect=True)
def test_squares_of_a_window_leased_to_someone_else_are_not_shown(live: Live) -> None:
    left = _two_windows(live)
    with live.factory() as session:
        other = Volunteer(public_id="someone-else")
        session.add(other)
        session.flush()
        session.execute(
            update(Window)
            .where(Window.id != left, Window.state == WindowState.OPEN)
            .values(leased_by=other.id, leased_until=utcnow() + timedelta(minutes=5))
        )
        session.commit()
    task = live.volunteer("diligent", 4).next_task(SLUG, kind="window")
    assert task is not None
    with live.factory() as session:
        shown = session.execute(
            select(Cell.window_id)
            .join(TaskTile, TaskTile.cell_id == Cell.id)
            .where(TaskTile.task_id == task["id"])
        ).all()
    assert {w for (w,) in shown} == {left}  # the window as it is
