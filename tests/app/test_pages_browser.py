"""The volunteer's pages in a real headless Chromium against a real uvicorn on the demo."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, select, update

from app.db import make_engine
from app.models import Project, Task, TaskState, Vote
from tests.app.browser import CHROMIUM, Server, browser, demo_server, new_page, screenshot

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs Debian's chromium (.ci/run installs it)"
    ),
]

__all__ = ["browser"]  # the fixture, imported


@pytest.fixture
def server(fresh_database_url: str, tmp_path: Path) -> Iterator[Server]:
    with demo_server(tmp_path / "data", fresh_database_url) as running:
        yield running


@pytest.fixture
def db(server: Server) -> Iterator[Engine]:
    engine = make_engine(server.database_url)
    yield engine
    engine.dispose()


def shown_task(page: object, previous: str | None = None) -> str:
    """Wait until a task other than ``previous`` is on screen, with its tiles loaded."""
    page.wait_for_function(  # type: ignore[attr-defined]
        """prev => {
            const id = document.getElementById('play').dataset.taskId;
            const imgs = [...document.querySelectorAll('.tile img')];
            return id && id !== prev && imgs.every(i => i.complete && i.naturalWidth);
        }""",
        arg=previous,
    )
    task_id: str = page.get_attribute("#play", "data-task-id")  # type: ignore[attr-defined]
    return task_id


def votes_of(db: Engine, task_id: int, timeout_s: float = 10) -> dict[int, bool]:
    """The stored votes of a task (waiting for the page's background send)."""
    deadline = time.monotonic() + timeout_s
    while True:
        with db.connect() as conn:
            rows = conn.execute(
                select(Vote.position, Vote.label).where(Vote.task_id == task_id)
            ).all()
        if rows or time.monotonic() > deadline:
            return {p: bool(y) for p, y in rows}
        time.sleep(0.1)


def test_landing_page_starts_a_first_time_volunteer_in_one_click(
    browser: object, server: Server
) -> None:
    page = new_page(browser, server)
    page.goto(server.url)  # type: ignore[attr-defined]
    assert "nine squares at a time" in page.inner_text("h1")  # type: ignore[attr-defined]
    page.click("[data-project=demo] >> text=Start")  # type: ignore[attr-defined]
    shown_task(page)
    assert "Select all squares with" in page.inner_text("#prompt")  # type: ignore[attr-defined]


def test_answers_by_mouse_are_stored_exactly_as_clicked(
    browser: object, server: Server, db: Engine
) -> None:
    page = new_page(browser, server, viewport={"width": 1280, "height": 900})
    page.goto(f"{server.url}/p/demo")  # type: ignore[attr-defined]
    clicks = [{0, 4}, set(), {2, 5, 8}]
    task_ids, previous = [], None
    for i, chosen in enumerate(clicks):
        previous = shown_task(page, previous)
        task_ids.append(int(previous))
        for position in chosen:
            page.click(f".tile[data-position='{position}']")  # type: ignore[attr-defined]
        selected = page.locator(".tile[aria-selected=true]").count()  # type: ignore[attr-defined]
        assert selected == len(chosen)
        if i == 0:
            screenshot(page, "grid-desktop.png")
        page.click("#verify")  # type: ignore[attr-defined]
    shown_task(page, previous)
    for task_id, chosen in zip(task_ids, clicks, strict=True):
        votes = votes_of(db, task_id)
        assert len(votes) == 9
        assert {p for p, y in votes.items() if y} == chosen
    assert page.inner_text("#counter") == "3 answered"  # type: ignore[attr-defined]


def test_keyboard_uses_the_keypad_layout_enter_verifies_s_skips(
    browser: object, server: Server, db: Engine
) -> None:
    page = new_page(browser, server)
    page.goto(f"{server.url}/p/demo")  # type: ignore[attr-defined]
    first = shown_task(page)
    for key in ("7", "5", "3"):  # top-left, centre, bottom-right
        page.keyboard.press(key)  # type: ignore[attr-defined]
    focused = page.evaluate("document.activeElement.dataset.position")  # type: ignore[attr-defined]
    assert focused == "8"  # the last toggled tile has the (visible) focus
    page.keyboard.press("Enter")  # type: ignore[attr-defined]
    second = shown_task(page, first)
    page.keyboard.press("s")  # type: ignore[attr-defined]
    shown_task(page, second)
    votes = votes_of(db, int(first))
    assert {p for p, y in votes.items() if y} == {0, 4, 8}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with db.connect() as conn:
            state = conn.execute(select(Task.state).where(Task.id == int(second))).scalar_one()
        if state == TaskState.SKIPPED:
            break
        time.sleep(0.1)
    assert state == TaskState.SKIPPED
    assert votes_of(db, int(second), timeout_s=0.5) == {}


def test_a_phone_volunteer_taps_tiles_on_a_360px_screen(
    browser: object, server: Server, db: Engine
) -> None:
    page = new_page(
        browser,
        server,
        viewport={"width": 360, "height": 740},
        is_mobile=True,
        has_touch=True,
        device_scale_factor=2,
    )
    page.goto(f"{server.url}/p/demo")  # type: ignore[attr-defined]
    first = shown_task(page)
    page.tap(".tile[data-position='1']")  # type: ignore[attr-defined]
    page.tap(".tile[data-position='7']")  # type: ignore[attr-defined]
    screenshot(page, "grid-phone.png")
    width = page.evaluate("document.documentElement.scrollWidth")  # type: ignore[attr-defined]
    assert width <= 360, "the page scrolls sideways on a phone"
    box = page.locator("#verify").bounding_box()  # type: ignore[attr-defined]
    assert box["height"] >= 44 and box["x"] + box["width"] <= 360
    page.tap("#verify")  # type: ignore[attr-defined]
    shown_task(page, first)
    assert {p for p, y in votes_of(db, int(first)).items() if y} == {1, 7}


def test_an_expired_task_says_so_and_recovers(browser: object, server: Server, db: Engine) -> None:
    with db.begin() as conn:
        conn.execute(update(Project).values(settings={"lease_seconds": 7}))
    page = new_page(browser, server)
    page.goto(f"{server.url}/p/demo")  # type: ignore[attr-defined]
    first = shown_task(page)
    time.sleep(2.5)  # 7 s lease minus the page's 5 s safety margin
    page.click(".tile[data-position='0']")  # type: ignore[attr-defined]
    page.click("#verify")  # type: ignore[attr-defined]
    fresh = shown_task(page, first)
    assert fresh != first
    assert "expired" in page.inner_text("#status")  # type: ignore[attr-defined]
    assert votes_of(db, int(first), timeout_s=0.5) == {}
    page.click("#verify")  # type: ignore[attr-defined]  (the fresh one is accepted)
    shown_task(page, fresh)
    assert len(votes_of(db, int(fresh))) == 9


def test_contribution_and_leaderboard_pages(browser: object, server: Server) -> None:
    page = new_page(browser, server)
    page.goto(f"{server.url}/p/demo")  # type: ignore[attr-defined]
    first = shown_task(page)
    page.keyboard.press("Enter")  # type: ignore[attr-defined]
    shown_task(page, first)
    page.wait_for_function(  # type: ignore[attr-defined]
        "() => !localStorage.getItem('tessera.outbox.demo') || "
        "localStorage.getItem('tessera.outbox.demo') === '[]'"
    )
    page.goto(f"{server.url}/me")  # type: ignore[attr-defined]
    assert page.inner_text("#answers") == "9"  # type: ignore[attr-defined]
    quality = page.inner_text("#quality")  # type: ignore[attr-defined]
    assert quality in {"new", "learning", "fair", "good", "excellent"}
    page.goto(f"{server.url}/leaderboard")  # type: ignore[attr-defined]
    assert "(you)" in page.inner_text("table.leaderboard")  # type: ignore[attr-defined]
