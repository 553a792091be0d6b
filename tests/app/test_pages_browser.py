"""The volunteer's pages in a real headless Chromium against a real uvicorn on the demo."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, select, update

from app.db import make_engine
from app.models import Gold, Project, Task, TaskState, TaskTile, Vote
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
    assert page.inner_text("#counter") == "3 grids answered"  # type: ignore[attr-defined]


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
    deadline = time.monotonic() + 30  # a retried send backs off 1, 2, 4, 8 s
    while time.monotonic() < deadline:
        with db.connect() as conn:
            state = conn.execute(select(Task.state).where(Task.id == int(second))).scalar_one()
        if state == TaskState.SKIPPED:
            break
        time.sleep(0.1)
    assert state == TaskState.SKIPPED
    assert votes_of(db, int(second), timeout_s=0.5) == {}


def test_one_request_per_grid_and_answers_given_offline_are_sent_once_back_online(
    browser: object, server: Server, db: Engine
) -> None:
    page = new_page(browser, server)
    calls: list[str] = []
    page.on(  # type: ignore[attr-defined]
        "request",
        lambda r: (
            calls.append(f"{r.method} {r.url.split('/tasks/')[1]}")
            if "/tasks/" in r.url and "/tiles/" not in r.url and "/context" not in r.url
            else None
        ),
    )
    page.goto(f"{server.url}/p/demo")  # type: ignore[attr-defined]
    shown = [shown_task(page)]
    sent = "() => (localStorage.getItem('tessera.outbox.demo') || '[]') === '[]'"
    for _ in range(3):
        page.wait_for_timeout(300)  # type: ignore[attr-defined]  (a person takes seconds)
        page.click("#verify")  # type: ignore[attr-defined]
        shown.append(shown_task(page, shown[-1]))
        page.wait_for_function(sent)  # type: ignore[attr-defined]
    # The first grid and the one after it on their own, then each answer brings the next.
    assert calls == ["GET next"] * 2 + ["POST answer"] * 3, calls
    for task_id in shown[:3]:
        assert len(votes_of(db, int(task_id))) == 9
    # Offline: the answers stay on the device (the grid already fetched still shows) ...
    page.wait_for_selector("#play[data-prefetched=true]", state="attached")  # type: ignore[attr-defined]
    page.context.set_offline(True)  # type: ignore[attr-defined]
    page.click(".tile[data-position='4']")  # type: ignore[attr-defined]
    page.click("#verify")  # type: ignore[attr-defined]
    offline = shown_task(page, shown[-1])
    page.wait_for_function(  # type: ignore[attr-defined]
        "() => document.getElementById('status').dataset.kind === 'error'"
    )
    assert votes_of(db, int(shown[-1]), timeout_s=1) == {}
    # ... and are sent once the network is back, exactly as given.
    page.context.set_offline(False)  # type: ignore[attr-defined]
    votes = votes_of(db, int(shown[-1]), timeout_s=40)
    assert {p for p, y in votes.items() if y} == {4}
    page.click("#verify")  # type: ignore[attr-defined]
    shown_task(page, offline)
    assert len(votes_of(db, int(offline), timeout_s=40)) == 9


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
    assert page.inner_text("#answers") == "9"  # type: ignore[attr-defined]  (squares)
    assert page.inner_text("#tasks") == "1"  # type: ignore[attr-defined]  (grids)
    assert "excellent" in page.inner_text("main")  # type: ignore[attr-defined]  (what it means)
    quality = page.inner_text("#quality")  # type: ignore[attr-defined]
    assert quality in {"new", "learning", "fair", "good", "excellent"}
    page.goto(f"{server.url}/leaderboard")  # type: ignore[attr-defined]
    assert "(you)" in page.inner_text("table.leaderboard")  # type: ignore[attr-defined]


# Everything a volunteer needs to answer a grid, at once: all nine tiles whole on screen (never
# cropped), Verify in view, and for a window finer than the image, where it is in the image.
GRID_CHECK = """() => {
    const view = {w: window.innerWidth, h: window.innerHeight};
    const inView = (r) => r.top >= 0 && r.left >= 0 && r.bottom <= view.h && r.right <= view.w;
    const tiles = [...document.querySelectorAll('.tile')].map((t) => {
        const img = t.querySelector('img');
        return {
            box: t.getBoundingClientRect(),
            fit: getComputedStyle(img).objectFit,
            natural: img.naturalWidth / img.naturalHeight,
        };
    });
    const context = document.getElementById('context');
    const picture = context.querySelector('img.whole');
    const around = context.querySelector('img.around');
    return {
        tilesInView: tiles.every((t) => inView(t.box)),
        fits: [...new Set(tiles.map((t) => t.fit))],
        tileAspects: tiles.map((t) => t.box.width / t.box.height),
        pictureAspects: tiles.map((t) => t.natural),
        verifyInView: inView(document.getElementById('verify').getBoundingClientRect()),
        verifyBottom: document.getElementById('verify').getBoundingClientRect().bottom,
        viewHeight: view.h,
        shown: document.getElementById('play').dataset.taskId,
        context: !context.hidden && picture.complete && picture.naturalWidth > 0,
        contextInView: !context.hidden && inView(picture.getBoundingClientRect()),
        around: !around.hidden && around.complete && around.naturalWidth > 0
            && inView(around.getBoundingClientRect()),
        kind: document.getElementById('grid').dataset.kind,
    };
}"""


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("desktop", {"viewport": {"width": 1280, "height": 800}}),
        (
            "phone",
            {
                "viewport": {"width": 390, "height": 844},
                "is_mobile": True,
                "has_touch": True,
                "device_scale_factor": 2,
            },
        ),
    ],
)
def test_every_grid_fits_the_screen_whole_and_fine_windows_show_where_they_are(
    browser: object, server: Server, name: str, options: dict[str, object]
) -> None:
    page = new_page(browser, server, **options)
    page.goto(f"{server.url}/p/demo")  # type: ignore[attr-defined]
    previous, with_context, with_around = None, 0, 0
    for i in range(24):
        previous = shown_task(page, previous)
        grid = page.evaluate(GRID_CHECK)  # type: ignore[attr-defined]
        where = {k: grid[k] for k in ("verifyBottom", "viewHeight", "kind", "context", "shown")}
        assert grid["tilesInView"] and grid["verifyInView"], (i, where)
        assert grid["fits"] == ["contain"], grid  # letterboxed, never cropped
        # Square cells (the demo is a new project): square boxes showing square pictures.
        assert all(abs(a - 1) < 0.02 for a in grid["tileAspects"]), grid
        assert all(abs(a - 1) < 0.02 for a in grid["pictureAspects"]), grid
        if grid["context"]:
            assert grid["contextInView"], grid
            with_context += 1
            if with_context == 1:
                screenshot(page, f"grid-context-{name}.png")
        if grid["around"]:
            with_around += 1
            if with_around == 1:
                screenshot(page, f"grid-around-{name}.png")
        page.click("#verify")  # type: ignore[attr-defined]
    # The demo's control targets open their pyramids at once, so finer known windows come
    # within the first grids (the gold rate); each must have shown its context.
    assert with_context > 0 and with_around > 0, (with_context, with_around)


def _known_answers(db: Engine, task_id: int) -> dict[int, bool]:
    with db.connect() as conn:
        rows = conn.execute(
            select(TaskTile.position, Gold.label)
            .join(Gold, Gold.cell_id == TaskTile.cell_id)
            .where(TaskTile.task_id == task_id, TaskTile.known.is_(True))
        ).all()
    return {p: bool(y) for p, y in rows}


def test_the_check_again_warning_clears_once_a_grid_is_right(
    browser: object, server: Server, db: Engine
) -> None:
    page = new_page(browser, server)
    page.goto(f"{server.url}/p/demo")  # type: ignore[attr-defined]
    previous, wrong_done = None, False
    for _ in range(60):
        previous = shown_task(page, previous)
        known = _known_answers(db, int(previous))
        if known:
            # Wrong on every known tile first, then right on every one.
            chosen = {p for p, y in known.items() if y == wrong_done}
            for position in chosen:
                page.click(f".tile[data-position='{position}']")  # type: ignore[attr-defined]
        page.click("#verify")  # type: ignore[attr-defined]
        if known and not wrong_done:
            page.wait_for_function(  # type: ignore[attr-defined]
                "() => document.getElementById('status').textContent.includes('did not look right')"
            )
            wrong_done = True
        elif known:
            page.wait_for_function(  # type: ignore[attr-defined]
                "() => !document.getElementById('status').textContent.includes('did not look')"
            )
            assert "looked right" in page.inner_text("#status")  # type: ignore[attr-defined]
            return
    pytest.fail("no two grids with known tiles in 60")


def test_pages_have_an_icon(server: Server) -> None:
    icon = httpx.get(f"{server.url}/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")
    page = httpx.get(f"{server.url}/p/demo").text
    assert 'rel="icon"' in page


def test_the_api_docs_render_every_operation_without_internet(
    browser: object, server: Server
) -> None:
    page = new_page(browser, server)  # every request off localhost is refused
    page.goto(f"{server.url}/docs")  # type: ignore[attr-defined]
    page.wait_for_selector(".opblock", timeout=20_000)  # type: ignore[attr-defined]
    operations = page.locator(".opblock").count()  # type: ignore[attr-defined]
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert spec["openapi"].startswith("3.1")
    assert operations == sum(len(methods) for methods in spec["paths"].values())
    screenshot(page, "api-docs.png")
