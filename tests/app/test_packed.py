"""A grid with few squares still open is filled up with other windows' last open squares of the
same tag: a whole grid is not spent on the one or two squares a first window has left."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from app.models import (
    DEFAULT_PROJECT_SETTINGS,
    Cell,
    CellStatus,
    Consensus,
    Project,
    RetireReason,
    Tag,
    Target,
    Task,
    TaskTile,
    Window,
    WindowState,
)
from app.services.crowd import picker
from app.services.crowd.picker import TILES
from tests.app.conftest import Live

SLUG = "demo"
PACK_BELOW = 5
# No known tiles (a newcomer would be served them first), grids of five open squares or more.
PACKING = {"gold_rate": 0.0, "mosaic_share": 0.0, "pack_below": PACK_BELOW}


def _first_windows(live: Live, tag_id: int) -> list[Window]:
    with live.factory() as session:
        return list(
            session.scalars(
                select(Window)
                .join(Target, Target.id == Window.target_id)
                .where(
                    Window.tag_id == tag_id,
                    Window.level == 0,
                    Window.known.is_(False),
                    Target.control.is_(False),
                )
                .order_by(Window.id)
            )
        )


def _settle_all_but(live: Live, window: Window, keep: int) -> set[int]:
    """Retire all but ``keep`` of the window's squares (as a crowd's *no*). Returns the ids of
    those left open."""
    with live.factory() as session:
        cells = list(
            session.scalars(select(Cell).where(Cell.window_id == window.id).order_by(Cell.id))
        )
        for cell in cells[keep:]:
            cell.status, cell.label = CellStatus.RETIRED, False
            cell.retire_reason = RetireReason.CONFIDENT
        session.commit()
        return {c.id for c in cells[:keep]}


def _tag_with_two_first_windows(live: Live) -> tuple[str, list[Window]]:
    with live.factory() as session:
        tags = list(session.scalars(select(Tag).order_by(Tag.id)))
    for tag in tags:
        windows = _first_windows(live, tag.id)
        if len(windows) >= 2:
            return tag.name, windows
    raise AssertionError("the demo has no tag with two first windows")


@pytest.mark.parametrize(
    "live",
    # The random baseline packs too, drawing the other squares at random.
    [PACKING, {**PACKING, "acquisition": "random"}],
    indirect=True,
    ids=["by-value", "random"],
)
def test_a_grid_with_few_open_squares_takes_other_windows_last_ones(live: Live) -> None:
    tag, (first, second, *_) = _tag_with_two_first_windows(live)
    mine = _settle_all_but(live, first, 2)
    theirs = _settle_all_but(live, second, 3)
    with live.factory() as session:  # the first is the one served by value; no other is open
        session.get(Window, first.id).value = 100.0  # type: ignore[union-attr]
        for window in session.scalars(
            select(Window).where(
                Window.tag_id == first.tag_id, Window.id.not_in([first.id, second.id])
            )
        ):
            window.state = WindowState.CLOSED
        session.commit()
    volunteer = live.volunteer(kind="oracle")
    task = volunteer.next_task(SLUG, tag=tag)
    assert task is not None
    assert task["kind"] == "mosaic" and len(task["tiles"]) == TILES
    with live.factory() as session:
        shown = set(session.scalars(select(TaskTile.cell_id).where(TaskTile.task_id == task["id"])))
    # Both windows' open squares are in it; the rest of the nine are the first window's own.
    assert mine | theirs <= shown
    assert len(mine) + len(theirs) < PACK_BELOW * 2
    volunteer.answer(SLUG, task)
    with live.factory() as session:
        voted = dict(
            session.execute(
                select(Consensus.cell_id, Consensus.n_votes).where(
                    Consensus.cell_id.in_(mine | theirs)
                )
            ).all()
        )
        assert all(voted[c] == 1 for c in mine | theirs)
        assert session.get(Task, task["id"]).window_id in (first.id, second.id)  # type: ignore[union-attr]


def _kind_served(live: Live, open_first: int, open_second: int, **params: str) -> str:
    """The kind of task a new volunteer is served of a tag whose two first windows have these
    many squares left open, the first worth most."""
    tag, (first, second, *_) = _tag_with_two_first_windows(live)
    _settle_all_but(live, first, open_first)
    _settle_all_but(live, second, open_second)
    with live.factory() as session:
        session.get(Window, first.id).value = 100.0  # type: ignore[union-attr]
        session.commit()
    task = live.volunteer(kind="oracle").next_task(SLUG, tag=tag, **params)
    assert task is not None
    return str(task["kind"])


@pytest.mark.parametrize("live", [PACKING], indirect=True)
def test_a_grid_with_enough_open_squares_stays_a_window(live: Live) -> None:
    assert _kind_served(live, PACK_BELOW, 3) == "window"


@pytest.mark.parametrize("live", [PACKING], indirect=True)
def test_a_client_that_asks_for_a_window_gets_one(live: Live) -> None:
    assert _kind_served(live, 2, 3, kind="window") == "window"


@pytest.mark.parametrize("live", [{**PACKING, "pack_below": 0}], indirect=True)
def test_a_project_can_turn_packing_off(live: Live) -> None:
    assert DEFAULT_PROJECT_SETTINGS["pack_below"] == 0  # off unless a project turns it on
    assert _kind_served(live, 1, 1) == "window"


@pytest.mark.parametrize(
    "live",
    [PACKING, {**PACKING, "acquisition": "random"}],
    indirect=True,
    ids=["by-value", "random"],
)
def test_the_random_baseline_packs_other_squares_at_random(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bool] = []
    packed = picker._packed

    def spy(*args: Any, by_value: bool = True) -> list[Cell] | None:
        seen.append(by_value)
        return packed(*args, by_value=by_value)

    monkeypatch.setattr(picker, "_packed", spy)
    _kind_served(live, 2, 3)
    with live.factory() as session:
        project = session.scalar(select(Project).where(Project.slug == SLUG))
        assert project is not None
        random_baseline = project.setting("acquisition") == "random"
    assert seen == [not random_baseline]
