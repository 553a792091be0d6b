"""The curator's workspace in a real headless Chromium against a real uvicorn on the demo."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine, select, update

from app.db import make_engine
from app.models import Cell, Gold, GoldSource, MaskSource, MaskVersion, Tag, Target, TargetState
from tests.app.browser import CHROMIUM, Server, browser, demo_server, new_page, screenshot
from tests.app.conftest import HAS_PYRAMID

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs Debian's chromium (.ci/run installs it)"
    ),
]
__all__ = ["browser"]  # the fixture, imported

PASSWORD = "a long curator password"


@pytest.fixture
def server(fresh_database_url: str, tmp_path: Path) -> Iterator[Server]:
    with demo_server(tmp_path / "data", fresh_database_url) as running:
        yield running


def user_add(server: Server, name: str) -> subprocess.CompletedProcess[str]:
    """`tessera user add NAME --role curator --password-stdin`, in a real process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    env |= {"TESSERA_DATA_DIR": str(server.data_dir), "TESSERA_DATABASE_URL": server.database_url}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "user", "add", name, "--password-stdin"],
        input=PASSWORD + "\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def add_curator(server: Server, name: str) -> None:
    result = user_add(server, name)
    assert result.returncode == 0, result.stderr
    again = user_add(server, name)
    assert again.returncode == 2 and "exists already" in again.stderr


def logged_in_at(
    browser: object, server: Server, name: str, path: str, *, width: int = 1200, height: int = 900
) -> object:
    """A page of a curator who logged in on the way to ``path``, there."""
    page = new_page(browser, server, viewport={"width": width, "height": height})
    page.goto(f"{server.url}/login?next={path}")  # type: ignore[attr-defined]
    page.get_by_label("Name").fill(name)  # type: ignore[attr-defined]
    page.get_by_label("Password").fill(PASSWORD)  # type: ignore[attr-defined]
    page.get_by_role("button", name="Log in").click()  # type: ignore[attr-defined]
    page.wait_for_url(f"{server.url}{path}")  # type: ignore[attr-defined]
    return page


def test_a_curator_logs_in_fixes_cells_and_accepts_a_triage_item(
    browser: object, server: Server
) -> None:
    add_curator(server, "curie")
    engine: Engine = make_engine(server.database_url)
    with engine.connect() as conn:
        target_id = conn.scalar(
            select(Target.id)
            .where(Target.control.is_(False), HAS_PYRAMID)
            .order_by(Target.id)
            .limit(1)
        )
    # A transaction of its own that starts by writing: one that read first cannot take SQLite's
    # write lock once the running server has written meanwhile ("database is locked" at once,
    # no busy wait), which a loaded CI machine met.
    with engine.begin() as conn:
        conn.execute(
            update(Target)
            .where(Target.id == target_id)
            .values(state=TargetState.TRIAGE, triage_reason="cells still uncertain")
        )
        cells = conn.execute(
            select(Cell.id, Cell.row, Cell.col)
            .where(Cell.target_id == target_id, Cell.level == 1)
            .order_by(Cell.row, Cell.col)
        ).all()
    page = new_page(browser, server, viewport={"width": 1200, "height": 900})
    page.goto(f"{server.url}/curate")  # type: ignore[attr-defined]
    page.get_by_role("link", name="Log in").click()  # type: ignore[attr-defined]
    page.get_by_label("Name").fill("curie")  # type: ignore[attr-defined]
    page.get_by_label("Password").fill(PASSWORD)  # type: ignore[attr-defined]
    page.get_by_role("button", name="Log in").click()  # type: ignore[attr-defined]
    page.wait_for_url(f"{server.url}/curate")  # type: ignore[attr-defined]
    screenshot(page, "curate-queue.png")
    page.get_by_role("link", name="Open").first.click()  # type: ignore[attr-defined]
    page.wait_for_url(f"{server.url}/curate/targets/{target_id}")  # type: ignore[attr-defined]

    # Fix two squares: the top-left one and the centre one, each flipped from what it shows.
    flipped = {}
    for cell_id, row, col in (cells[0], cells[4]):
        button = page.locator(f'button[data-cell="1,{row},{col}"]')  # type: ignore[attr-defined]
        flipped[cell_id] = button.get_attribute("data-label") != "yes"
        button.click()
        page.wait_for_load_state()  # type: ignore[attr-defined]
        after = page.locator(f'button[data-cell="1,{row},{col}"]')  # type: ignore[attr-defined]
        assert after.get_attribute("data-source") == "curator"
        assert (after.get_attribute("data-label") == "yes") == flipped[cell_id]
    page.get_by_label("prior (CAM or model)").check()  # type: ignore[attr-defined]
    assert page.locator(".target-view").get_attribute("data-overlay") == "prior"  # type: ignore[attr-defined]
    page.get_by_label("crowd posterior").check()  # type: ignore[attr-defined]
    screenshot(page, "curate-target.png")
    page.get_by_role("button", name="Accept the mask").click()  # type: ignore[attr-defined]
    page.wait_for_url(f"{server.url}/curate?project=demo")  # type: ignore[attr-defined]
    assert "Nothing waits for a curator" in page.content()  # type: ignore[attr-defined]

    with engine.connect() as conn:
        state = conn.scalar(select(Target.state).where(Target.id == target_id))
        gold = dict(
            conn.execute(
                select(Gold.cell_id, Gold.label).where(Gold.source == GoldSource.CURATOR)
            ).all()
        )
        curator_masks = conn.scalar(
            select(MaskVersion.id).where(
                MaskVersion.target_id == target_id, MaskVersion.source == MaskSource.CURATOR
            )
        )
    engine.dispose()
    assert state == TargetState.COMPLETE
    assert {k: gold.get(k) for k in flipped} == flipped
    assert curator_masks is not None


def test_a_curator_paints_a_pixel_fix(browser: object, server: Server) -> None:
    add_curator(server, "hopper")
    engine: Engine = make_engine(server.database_url)
    with engine.connect() as conn:
        target_id = conn.scalar(
            select(Target.id)
            .where(Target.control.is_(False), HAS_PYRAMID)
            .order_by(Target.id)
            .limit(1)
        )
    page = logged_in_at(browser, server, "hopper", f"/curate/targets/{target_id}")
    page.get_by_role("button", name="Paint", exact=True).click()  # type: ignore[attr-defined]
    # Painting starts once the current mask is loaded into the brush's canvas.
    page.wait_for_function("() => !document.getElementById('paint-save').disabled")  # type: ignore[attr-defined]
    # The canvas opens where the curator is looking, with Save under it: no scrolling.
    page.wait_for_function(  # type: ignore[attr-defined]
        """() => {
            const inView = (el) => {
                const r = el.getBoundingClientRect();
                return r.top >= -1 && r.bottom <= window.innerHeight + 1;
            };
            return inView(document.querySelector('canvas.paint'))
                && inView(document.getElementById('paint-save'));
        }"""
    )
    height = page.evaluate("document.documentElement.scrollHeight")  # type: ignore[attr-defined]
    assert height < 2600, height  # the votes table is folded away, not 6,000 px of page
    canvas = page.locator("canvas.paint")  # type: ignore[attr-defined]
    box = canvas.bounding_box()
    # One horizontal stroke across the middle of the image.
    page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.5)  # type: ignore[attr-defined]
    page.mouse.down()  # type: ignore[attr-defined]
    for step in range(1, 21):
        x = box["x"] + box["width"] * (0.2 + 0.6 * step / 20)
        page.mouse.move(x, box["y"] + box["height"] * 0.5)  # type: ignore[attr-defined]
    page.mouse.up()  # type: ignore[attr-defined]
    screenshot(page, "curate-paint.png")
    page.get_by_role("button", name="Save painted mask").click()  # type: ignore[attr-defined]
    page.wait_for_function(  # type: ignore[attr-defined]
        "() => document.body.textContent.includes('curator,')"
    )
    with engine.connect() as conn:
        version = conn.execute(
            select(MaskVersion.hard_path, MaskVersion.meta).where(
                MaskVersion.target_id == target_id, MaskVersion.source == MaskSource.CURATOR
            )
        ).one()
        state = conn.scalar(select(Target.state).where(Target.id == target_id))
        start = conn.scalar(  # the brush starts from the latest mask: here the ground truth
            select(MaskVersion.hard_path).where(
                MaskVersion.target_id == target_id, MaskVersion.source == MaskSource.GROUND_TRUTH
            )
        )
    engine.dispose()
    from app.storage import decode_mask_png

    mask = decode_mask_png(server.data_dir / version.hard_path)
    before = decode_mask_png(server.data_dir / str(start))
    h, w = mask.shape
    assert version.meta["painted"] and state == TargetState.COMPLETE
    assert mask[h // 2, w // 2] and mask[h // 2, int(w * 0.7)]  # painted along the stroke
    far = np.r_[0 : h // 4, h - h // 4 : h]
    assert np.array_equal(mask[far], before[far])  # and nothing changed far from it


def test_a_union_page_names_its_parts_and_shows_its_current_mask(
    browser: object, server: Server
) -> None:
    add_curator(server, "noether")
    engine: Engine = make_engine(server.database_url)
    with engine.connect() as conn:
        union_id = conn.scalar(
            select(Target.id)
            .join(Tag, Tag.id == Target.tag_id)
            .where(Target.control.is_(False), Tag.exhaustive.is_(True), ~HAS_PYRAMID)
            .order_by(Target.id)
            .limit(1)
        )
    engine.dispose()
    assert union_id is not None, "the demo marks shape, polygon and patterned exhaustive"
    page = logged_in_at(browser, server, "noether", f"/curate/targets/{union_id}")
    parts = page.locator(".union-parts a")  # type: ignore[attr-defined]
    assert parts.count() >= 1
    page.get_by_label("current mask (composed now)").check()  # type: ignore[attr-defined]
    overlay = page.locator("img.mask-overlay.current")  # type: ignore[attr-defined]
    overlay.wait_for(state="visible")
    page.wait_for_function(  # type: ignore[attr-defined]
        "() => document.querySelector('img.mask-overlay.current').naturalWidth > 0"
    )
    screenshot(page, "curate-union.png")
    parts.first.click()
    page.wait_for_url(f"{server.url}/curate/targets/*")  # type: ignore[attr-defined]
    assert "/curate/targets/" in page.url and not page.url.endswith(f"/{union_id}")  # type: ignore[attr-defined]


def test_a_curator_reaches_a_collecting_target_from_the_dashboard_in_two_clicks(
    browser: object, server: Server
) -> None:
    add_curator(server, "ada")
    page = logged_in_at(browser, server, "ada", "/curate/dashboard", width=1280, height=800)
    page.locator("a:has([data-state=collecting])").click()  # type: ignore[attr-defined]  # 1
    page.wait_for_url("**/curate/targets?*state=collecting*")  # type: ignore[attr-defined]
    screenshot(page, "curate-targets.png")
    states = page.locator("table.targets tbody td:nth-child(3)").all_inner_texts()  # type: ignore[attr-defined]
    assert states and set(states) == {"collecting"}
    page.get_by_role("link", name="Open").first.click()  # type: ignore[attr-defined]  # 2
    page.wait_for_url("**/curate/targets/*")  # type: ignore[attr-defined]
    target_id = int(page.url.rsplit("/", 1)[1])  # type: ignore[attr-defined]
    engine: Engine = make_engine(server.database_url)
    with engine.connect() as conn:
        state = conn.scalar(select(Target.state).where(Target.id == target_id))
    engine.dispose()
    assert state == TargetState.COLLECTING
    # An error on a curator's page is a page with a way back, not JSON.
    page.goto(f"{server.url}/curate/targets?state=sleeping")  # type: ignore[attr-defined]
    assert "unknown state" in page.inner_text("main")  # type: ignore[attr-defined]
    page.get_by_role("link", name="Back to the curator's workspace").click()  # type: ignore[attr-defined]
    page.wait_for_url(f"{server.url}/curate")  # type: ignore[attr-defined]


def test_a_curator_clicks_an_object_and_searches_it_with_a_colour_changed(
    browser: object, server: Server
) -> None:
    add_curator(server, "lovelace")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    env |= {"TESSERA_DATA_DIR": str(server.data_dir), "TESSERA_DATABASE_URL": server.database_url}
    indexed = subprocess.run(
        [sys.executable, "-m", "app.cli", "objects", "index", "--steps", "40", "--device", "cpu"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert indexed.returncode == 0, indexed.stderr
    engine: Engine = make_engine(server.database_url)
    with engine.connect() as conn:
        image_id = conn.scalar(select(Target.image_id).order_by(Target.image_id).limit(1))
    engine.dispose()
    page = logged_in_at(browser, server, "lovelace", f"/curate/objects/{image_id}")
    outline = page.locator("figure.object-picker polygon.object").first  # type: ignore[attr-defined]
    row = outline.get_attribute("data-object")
    box = outline.bounding_box()
    assert box and box["width"] > 0, "the object's outline is drawn over the image"
    outline.click()  # on the object itself, as a curator would
    page.wait_for_url(f"{server.url}/curate/objects/{image_id}?object={row}")  # type: ignore[attr-defined]
    assert page.locator("polygon.object.chosen").count() == 1  # type: ignore[attr-defined]
    changes = page.locator("select[name=to] option")  # type: ignore[attr-defined]
    assert changes.count() > 1
    wanted = changes.nth(1).get_attribute("value")
    page.locator("select[name=to]").select_option(wanted)  # type: ignore[attr-defined]
    page.get_by_role("button", name="Search").click()  # type: ignore[attr-defined]
    page.wait_for_load_state()  # type: ignore[attr-defined]
    assert f"to={wanted}".replace(" ", "+") in page.url or "to=" in page.url  # type: ignore[attr-defined]
    results = page.locator("ol.objects li[data-image]")  # type: ignore[attr-defined]
    assert results.count() > 0
    assert page.locator("ol.objects polygon.object.matched").count() == results.count()  # type: ignore[attr-defined]
    screenshot(page, "curate-objects.png")
