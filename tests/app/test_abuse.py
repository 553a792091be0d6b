"""Abuse of a running server (issue 18): one volunteer must not starve the crowd, no request
may exhaust the server, and bad input gets a 4xx with a message, never a 500."""

from __future__ import annotations

import json
import logging
import re
import stat
import threading
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from fastapi.testclient import TestClient
from httpx import Response
from sqlalchemy import select, update

from app.api import task as task_api
from app.db import as_utc, make_engine, utcnow
from app.main import create_app
from app.models import Image, Role, Tag, Task, TaskState, Volunteer, Window
from app.services import account as account_service
from app.services.crowd.consensus import COUNT_COLUMNS
from app.services.import_formats import (
    ImportFormatError,
    coco_masks,
    read_coco,
    read_vocabulary,
)
from app.services.masks.export import _entry_name
from app.services.volunteer import credibility_of, leaderboard
from tests.app.conftest import Live
from tests.app.test_curate import PASSWORD, csrf_of, logged_in, triage_some

SLUG = "demo"


def _leased_windows(live: Live) -> list[Window]:
    now = utcnow()
    with live.factory() as session:
        windows = session.scalars(select(Window).where(Window.leased_by.is_not(None))).all()
        return [w for w in windows if w.leased_until and as_utc(w.leased_until) > now]


def test_one_volunteer_cannot_hoard_the_open_windows(live: Live) -> None:
    with live.factory() as session:
        unknown = len(session.scalars(select(Window).where(Window.known.is_(False))).all())
    # One address for both (the address's own cap has a test of its own).
    app = create_app(live.settings.model_copy(update={"open_tasks_per_address": 0}))
    hoarder = live.volunteer()
    hoarder.client = TestClient(app)
    tasks = [hoarder.next_task(SLUG, kind="window") for _ in range(unknown + 5)]
    first = tasks[0]
    assert first is not None
    # The page holds the task in hand and the next one: two leases, never more.
    assert len(_leased_windows(live)) <= 2
    # An honest volunteer still gets unknown windows to answer (a newcomer's first tasks may
    # be known ones, which check them).
    honest, windows = live.volunteer(seed=1), []
    honest.client = TestClient(app)
    for _ in range(5):
        task = honest.next_task(SLUG, kind="window")
        assert task is not None
        honest.answer(SLUG, task)
        with live.factory() as session:
            served = session.get(Task, task["id"])
            assert served is not None and served.window_id is not None
            windows.append(session.get(Window, served.window_id))
    assert any(w is not None and not w.known for w in windows)
    # The hoarder's oldest task lost its window's lease, not its answer: a page that kept
    # answers while offline sends them later, and they count.
    response = hoarder.client.post(
        f"/api/projects/{SLUG}/tasks/submit",
        json={"token": first["token"], "selected": [], "elapsed_ms": 10},
    )
    assert response.status_code == 200, response.text


def test_the_page_keeps_the_task_in_hand_while_it_fetches_the_next(live: Live) -> None:
    volunteer = live.volunteer()
    in_hand = volunteer.next_task(SLUG, kind="window")
    ahead = volunteer.next_task(SLUG, kind="window")
    assert in_hand is not None and ahead is not None
    volunteer.answer(SLUG, in_hand)  # answered while the next one waits
    volunteer.answer(SLUG, ahead)
    assert len(volunteer.submitted) == 2


def test_reading_ones_stats_makes_no_identity_and_counts_against_the_address(live: Live) -> None:
    for _ in range(30):  # a script without cookies
        response = TestClient(live.app).get("/api/volunteers/me")
        assert response.status_code == 200 and response.json()["answers"] == 0
        assert "tessera_volunteer" not in response.cookies
    assert live.count(Volunteer) == 0
    limited = create_app(live.settings.model_copy(update={"rate_limit_address_per_minute": 3}))
    statuses = [TestClient(limited).get("/api/volunteers/me").status_code for _ in range(5)]
    assert statuses == [200, 200, 200, 429, 429]
    # A volunteer who has answered sees their own numbers.
    volunteer = live.volunteer()
    task = volunteer.next_task(SLUG)
    assert task is not None
    volunteer.answer(SLUG, task)
    assert volunteer.client.get("/api/volunteers/me").json()["answers"] == 9


def test_one_address_makes_a_bounded_number_of_new_volunteers(live: Live) -> None:
    """Each request without a cookie made a volunteer row and a cookie: one address could make
    1.7 million a day under the request limit alone."""
    limited = create_app(live.settings.model_copy(update={"rate_limit_new_volunteers_per_hour": 3}))
    url = f"/api/projects/{SLUG}/tasks/next"
    statuses = [TestClient(limited).get(url).status_code for _ in range(5)]
    assert statuses == [200, 200, 200, 429, 429]
    refused = TestClient(limited).get(url)
    assert "too many new volunteers" in refused.json()["detail"]
    assert "retry-after" in refused.headers
    assert live.count(Volunteer) == 3
    # Volunteers who keep their cookie go on.
    keeper = TestClient(limited)
    keeper.cookies.update(TestClient(live.app).get(url).cookies)
    assert keeper.get(url).status_code == 200


@pytest.mark.parametrize("tag", ["<b>", "", "x" * 200, "' OR 1=1--", "\x00", "é" * 10])
def test_a_tag_no_tag_could_have_is_not_found(live: Live, tag: str) -> None:
    client = TestClient(live.app, raise_server_exceptions=False)
    response = client.get(f"/api/projects/{SLUG}/tasks/next", params={"tag": tag})
    assert response.status_code == 404 and "no tag" in response.json()["detail"]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "tasks/submit", b'{"token": "x", "selected": [1], "elapsed_ms": NaN}'),
        ("POST", "tasks/submit", b'{"token": "x", "selected": [1], "elapsed_ms": 1e400}'),
        ("POST", "tasks/submit", b'{"token": "x", "selected": [1], "elapsed_ms": -Infinity}'),
        ("POST", "tasks/answer", b'{"next": true, "tag": "\\ud800"}'),
        ("POST", "tasks/answer", b'{"submit": {"token": "\\ud800\\udfff", "selected": []}}'),
        ("PATCH", "me", b'{"display_name": NaN}'),
        ("PATCH", "me", b'{"display_name": "ab\\ud800cd"}'),
    ],
)
def test_json_no_encoder_could_write_back_is_a_client_error(
    live: Live, method: str, path: str, body: bytes
) -> None:
    """Python's JSON reader takes NaN, infinities and lone surrogates; FastAPI's list of what was
    wrong echoed them back, and writing the response then failed: a 500 for any JSON endpoint."""
    client = TestClient(live.app, raise_server_exceptions=False)
    url = "/api/volunteers/me" if path == "me" else f"/api/projects/{SLUG}/{path}"
    response = client.request(
        method, url, content=body, headers={"content-type": "application/json"}
    )
    assert 400 <= response.status_code < 500, response.text
    response.json()  # and the error itself is valid JSON


def test_secrets_with_non_ascii_characters_are_refused_not_crashed_on(live: Live) -> None:
    client = TestClient(live.app, raise_server_exceptions=False)
    client.get("/login")  # the CSRF cookie
    response = client.post(
        "/login",
        headers={"X-CSRF-Token": "é".encode()},
        data={"name": "a", "password": "b"},
    )
    assert response.status_code == 403 and "security token" in response.text
    app = create_app(live.settings.model_copy(update={"metrics_token": "a-long-metrics-token"}))
    metrics = TestClient(app, raise_server_exceptions=False)
    response = metrics.get("/metrics", headers={"Authorization": "Bearer é".encode()})
    assert response.status_code == 401 and "bearer token" in response.text


def test_a_curator_adding_a_tag_no_tag_could_have_is_told_so(live: Live) -> None:
    (target_id,) = triage_some(live, 1)
    client = logged_in(live, Role.CURATOR)
    token = csrf_of(client.get(f"/curate/targets/{target_id}").text)
    response = client.post(
        f"/curate/targets/{target_id}/tags", data={"csrf_token": token, "tag": "<b>"}
    )
    assert response.status_code == 422 and "no tag" in response.text


@pytest.mark.parametrize(
    "tags",
    [
        {"tags": [{"name": "cat", "aliases": 5}]},
        {"tags": [{"name": "cat", "aliases": [1, 2]}]},
        {"tags": [{"name": "cat", "parent": 5}]},
        {"tags": [{"name": "cat", "category": {"a": 1}}]},
    ],
)
def test_a_vocabulary_of_the_wrong_types_is_refused_with_where(tmp_path: Path, tags: dict) -> None:
    path = tmp_path / "vocabulary.json"
    path.write_text(json.dumps(tags))
    with pytest.raises(ImportFormatError, match=re.escape("vocabulary.json tag 0: '")):
        read_vocabulary(path)


COCO_IMAGE = {"id": 1, "file_name": "a.png", "width": 4, "height": 4}
COCO_CATEGORY = {"id": 1, "name": "cat"}
COCO_ANNOTATION = {"image_id": 1, "category_id": 1, "segmentation": [[0, 0, 2, 0, 2, 2]]}


@pytest.mark.parametrize(
    ("coco", "where"),
    [
        ({"images": 5, "annotations": [], "categories": []}, "'images' must be a list"),
        ({"images": [{**COCO_IMAGE, "width": "x"}]}, "images[0]"),
        ({"images": [{**COCO_IMAGE, "file_name": 3}]}, "images[0]"),
        ({"categories": [{"id": "x", "name": "cat"}]}, "categories[0]"),
        ({"categories": [{"id": 1, "name": ["cat"]}]}, "categories[0]"),
        ({"categories": [{**COCO_CATEGORY, "supercategory": 7}]}, "categories[0]"),
        ({"annotations": [{**COCO_ANNOTATION, "image_id": [1]}]}, "annotations[0]"),
        ({"annotations": [{**COCO_ANNOTATION, "category_id": {"a": 1}}]}, "annotations[0]"),
    ],
)
def test_coco_of_the_wrong_types_is_refused_with_where(
    tmp_path: Path, coco: dict, where: str
) -> None:
    data = {
        "images": [COCO_IMAGE],
        "categories": [COCO_CATEGORY],
        "annotations": [COCO_ANNOTATION],
        **coco,
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ImportFormatError, match=re.escape(where)):
        read_coco(path)
    path.write_text(
        json.dumps(
            {
                "images": [COCO_IMAGE],
                "categories": [COCO_CATEGORY],
                "annotations": [COCO_ANNOTATION],
            }
        )
    )
    assert read_coco(path).annotations  # the same file with the right types reads


@pytest.mark.parametrize(
    ("segmentation", "message"),
    [
        # pycocotools rasterises a polygon edge by edge: a vertex at 1e8 took 16 s and 7.8 GB,
        # at 1e9 it takes the server's memory. Clipped to the image, it is a triangle here.
        ([[1.0, 1.0, 30.0, 1.0, 1e9, 1e9]], None),
        ([[1.0, 1.0, 30.0, 1.0, float("nan"), 5.0]], "not finite"),
        ([[1.0, 1.0, 30.0, 1.0, 5.0]], "odd count"),
        ([[1.0, 1.0, "x", 1.0, 5.0, 5.0]], "not a list of numbers"),
        # An RLE whose runs do not cover the image decoded the rest from uninitialised memory.
        ({"size": [20, 30], "counts": []}, "cover 0 pixels"),
        ({"size": [20, 30], "counts": "0"}, "cover 0 pixels"),
        ({"size": [20, 30], "counts": [100, -5, 505]}, "none negative"),
        ({"size": [20, 30], "counts": "!!!!"}, "out of range"),
        ({"size": [20, 30], "counts": "P"}, "middle of a run"),
    ],
)
def test_hostile_segmentations_are_refused_or_clipped_quickly(
    tmp_path: Path, segmentation: object, message: str | None
) -> None:
    image = {**COCO_IMAGE, "width": 30, "height": 20}
    path = tmp_path / "instances.json"
    annotation = {**COCO_ANNOTATION, "segmentation": segmentation}
    path.write_text(
        json.dumps({"images": [image], "categories": [COCO_CATEGORY], "annotations": [annotation]})
    )
    coco = read_coco(path)
    if message is None:
        ((_, mask),) = coco_masks(coco, coco.images[1])
        assert mask.shape == (20, 30) and mask[2:4, 5:25].all() and not mask[15:, :10].any()
        return
    with pytest.raises(ImportFormatError, match=message):
        list(coco_masks(coco, coco.images[1]))


def _pixel_centres_inside(points: np.ndarray, h: int, w: int) -> np.ndarray:
    """Exact even-odd rule at each pixel's centre: the rasterisation both are compared with."""
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    inside = np.zeros((h, w), dtype=bool)
    for (x0, y0), (x1, y1) in zip(points, np.roll(points, -1, axis=0), strict=True):
        if y0 == y1:
            continue
        crosses = (ys >= min(y0, y1)) & (ys < max(y0, y1))
        inside ^= crosses & (xs < x0 + (ys - y0) * (x1 - x0) / (y1 - y0))
    return inside


def test_a_crowds_polygons_past_the_edge_and_degenerate_ones_read_as_drawn() -> None:
    """Real annotators' vertices fall a little outside the image, and some polygons have one or
    two points: a clipped polygon rasterises as the whole one does (both within pycocotools'
    own rounding of the exact pixel-centre rule), and a polygon with no area adds nothing."""
    from pycocotools import mask as mask_utils

    from app.services.import_formats import _segmentation_mask

    rng = np.random.default_rng(0)
    h, w = 40, 60
    ours_off = whole_off = 0
    for _ in range(50):
        points = rng.uniform(-30, 90, (int(rng.integers(3, 9)), 2))
        polygon = points.reshape(-1).tolist()
        exact = _pixel_centres_inside(points, h, w)
        whole = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([polygon], h, w)))
        ours = _segmentation_mask([polygon, [5.0, 5.0, 9.0, 9.0], [3.0, 3.0]], h, w, "a")
        ours_off += int(np.count_nonzero(ours != exact))
        whole_off += int(np.count_nonzero(whole.astype(bool) != exact))
    assert ours_off <= 1.1 * whole_off + 10
    assert not _segmentation_mask([[5.0, 5.0, 9.0, 9.0]], h, w, "a").any()


def _login(client: TestClient, name: str, password: str) -> Response:
    token = csrf_of(client.get("/login").text)
    return client.post("/login", data={"name": name, "password": password, "csrf_token": token})


def test_password_guessing_locks_the_account_and_the_address(live: Live) -> None:
    logged_in(live, Role.CURATOR)  # makes the account
    client = TestClient(live.app, follow_redirects=False)
    for _ in range(5):
        assert _login(client, "curator-user", "wrong password!!").status_code == 401
    locked = _login(client, "curator-user", PASSWORD)  # the right one, too late
    assert locked.status_code == 429 and "too many wrong passwords" in locked.text
    assert int(locked.headers["retry-after"]) > 0
    # Another account is not locked by these failures.
    assert logged_in(live, Role.ADMIN).cookies.get("tessera_session")
    app = create_app(live.settings.model_copy(update={"login_attempts_per_address": 3}))
    client = TestClient(app, follow_redirects=False)
    statuses = [_login(client, f"name-{i}", "wrong password!!").status_code for i in range(5)]
    assert statuses == [401, 401, 401, 429, 429]


def test_a_login_checks_its_password_outside_the_write_lock(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not live.settings.resolved_database_url.startswith("sqlite"):
        pytest.skip("SQLite's single writer: PostgreSQL has no database-wide write lock")
    logged_in(live, Role.CURATOR)
    volunteer = live.volunteer()
    wrote: list[bool] = []
    hasher = account_service._hasher

    class SlowHasher:
        """The real hasher, whose check lets a volunteer write first: that write must not
        wait for the login."""

        def verify(self, hash_: str, password: str) -> bool:
            writer = threading.Thread(
                target=lambda: wrote.append(volunteer.next_task(SLUG) is not None)
            )
            writer.start()
            writer.join(timeout=10)
            return hasher.verify(hash_, password)

        def check_needs_rehash(self, hash_: str) -> bool:
            return hasher.check_needs_rehash(hash_)

    monkeypatch.setattr(account_service, "_hasher", SlowHasher())
    response = _login(TestClient(live.app, follow_redirects=False), "curator-user", PASSWORD)
    assert response.status_code == 303
    assert wrote == [True], "the volunteer's write waited for the password check"


def test_a_body_over_its_cap_is_refused_before_it_is_read(live: Live) -> None:
    app = create_app(live.settings.model_copy(update={"max_body_bytes": 4096}))

    def body(size: int) -> Iterator[bytes]:  # streamed (chunked): no Content-Length
        for _ in range(size // 1024):
            yield b" " * 1024

    client = TestClient(app, raise_server_exceptions=False)
    url = f"/api/projects/{SLUG}/tasks/submit"
    big = b'{"token": "' + b"x" * 10_000 + b'", "selected": [], "elapsed_ms": 1}'
    response = client.post(url, content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413 and "more than 4,096" in response.json()["detail"]
    response = client.post(
        url, content=body(1024 * 1024), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413  # counted as it came, refused at the cap
    # Under the cap the request is read and judged as before.
    small = client.post(url, json={"token": "x", "selected": [], "elapsed_ms": 1})
    assert small.status_code == 400
    # An anonymous upload to a curator form is refused before its body is spooled.
    response = client.post("/curate/import", content=b"x" * 10_000)
    assert response.status_code in (401, 403, 411)


@pytest.mark.parametrize(
    "tag", ["x/../../../../tmp/p", "..", "a\\b", "c:d", "fate/stay_night", "k-on!"]
)
def test_an_archive_entry_is_named_from_safe_parts(tag: str) -> None:
    name = _entry_name(Image(file_name="../up/img.png"), Tag(id=7, name=tag))
    assert "/" not in name and "\\" not in name and ":" not in name and ".." not in name
    assert PurePosixPath(name).name == name and name.endswith(".png")
    assert name.startswith("img__")


def test_tags_whose_names_change_keep_entries_of_their_own() -> None:
    image = Image(file_name="img.png")
    names = {_entry_name(image, Tag(id=i, name=n)) for i, n in enumerate(["a/b", "a_b", "a:b"])}
    assert len(names) == 3
    assert _entry_name(image, Tag(id=1, name="cat")) == "img__cat.png"  # names as before


def _copied(live: Live, client: TestClient) -> TestClient:
    """Another browser holding a copy of ``client``'s login cookie."""
    thief = TestClient(live.app, follow_redirects=False)
    thief.cookies.set("tessera_session", client.cookies["tessera_session"])
    return thief


def test_logging_out_ends_the_session_everywhere(live: Live) -> None:
    client = logged_in(live, Role.CURATOR)
    thief = _copied(live, client)
    assert thief.get("/curate").status_code == 200
    token = csrf_of(client.get("/curate").text)
    assert client.post("/logout", data={"csrf_token": token}).status_code == 303
    assert thief.get("/curate").status_code == 401
    assert logged_in(live, Role.CURATOR).get("/curate").status_code == 200  # a new login works


@pytest.mark.parametrize(
    "change",
    [{"password": "a new password!"}, {"role": Role.VOLUNTEER}, {"disabled": True}],
)
def test_a_changed_account_ends_its_sessions(live: Live, change: dict[str, object]) -> None:
    client = logged_in(live, Role.CURATOR)
    thief = _copied(live, client)
    with live.factory() as session:
        account = account_service.find_account(session, name="curator-user")
        assert account is not None
        account_service.update_account(account, **change)  # type: ignore[arg-type]
        session.commit()
    assert thief.get("/curate").status_code == 401
    assert client.get("/curate").status_code == 401


def test_pages_carry_security_headers_and_never_echo_the_host(live: Live) -> None:
    client = TestClient(live.app, base_url="https://testserver")
    page = client.get("/p/demo", headers={"Host": "evil.example"})
    assert page.status_code == 200 and "evil.example" not in page.text
    assert 'src="/static/js/play.js"' in page.text
    policy = page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in policy and "script-src 'self';" in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["referrer-policy"] == "same-origin"
    assert page.headers["strict-transport-security"].startswith("max-age=")
    plain = TestClient(live.app).get("/healthz")
    assert "strict-transport-security" not in plain.headers  # not over plain HTTP
    assert plain.headers["x-frame-options"] == "DENY"
    app = create_app(live.settings.model_copy(update={"allowed_hosts": "tessera.example"}))
    refused = TestClient(app, base_url="http://evil.example").get("/")
    assert refused.status_code == 400
    assert TestClient(app, base_url="http://tessera.example").get("/").status_code == 200


def test_pictures_are_rendered_once_per_task_and_limited_per_volunteer(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    rendered: list[int] = []
    real = task_api.render_tile

    def counting(*args: object, **kwargs: object) -> bytes:
        rendered.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(task_api, "render_tile", counting)
    app = create_app(live.settings.model_copy(update={"rate_limit_volunteer_per_minute": 2}))
    volunteer = live.volunteer()
    volunteer.client = TestClient(app)
    task = volunteer.next_task(SLUG)
    assert task is not None
    url = task["tiles"][0]["url"]
    statuses = [volunteer.client.get(url).status_code for _ in range(30)]
    # Two task requests a minute allow 24 pictures; the tile is rendered once.
    assert statuses[:24] == [200] * 24 and statuses[24:] == [429] * 6
    assert len(rendered) == 1


def test_the_leaderboard_ranks_credible_answers_not_fast_clicks(live: Live) -> None:
    clickers = [live.volunteer("random_clicker", seed) for seed in range(3)]
    careful = live.volunteer("diligent", seed=9)
    for _ in range(6):
        for clicker in clickers:
            clicker.step(SLUG)
    for _ in range(2):
        careful.step(SLUG)
    with live.factory() as session:
        clicker_ids = set(session.scalars(select(Volunteer.id).where(Volunteer.id <= 3)))
        for volunteer_id in clicker_ids:  # shown to toss a coin on gold
            row = credibility_of(session, volunteer_id=volunteer_id)
            for name in COUNT_COLUMNS:
                setattr(row, name, 30)
        session.commit()
        board = leaderboard(session, volunteer=None)
    assert board[0].answers < max(row.answers for row in board)  # fewer answers, ranked first
    # A coin's answers count for next to nothing (J of 30 right and 30 wrong under the priors).
    assert board[0].credible > 5 and all(row.credible <= 2 for row in board[1:])


@pytest.mark.parametrize("name", ["Volunteer 1a2b3c", "volunteer1a2b3c", "VOLUNTEER abcdef"])
def test_nobody_may_take_the_name_of_a_volunteer_without_one(live: Live, name: str) -> None:
    client = live.volunteer().client
    response = client.patch("/api/volunteers/me", json={"display_name": name})
    assert response.status_code == 422 and "choose another" in response.text


def test_invisible_characters_are_stripped_from_names(live: Live) -> None:
    client = live.volunteer().client
    sneaky = "Ad\u202ea\u200b Lo\u2066vel\u2069ace\ufeff"
    response = client.patch("/api/volunteers/me", json={"display_name": sneaky})
    assert response.status_code == 200 and response.json()["name"] == "Ada Lovelace"
    response = client.patch("/api/volunteers/me", json={"display_name": "\u200b\u200bA\u202e"})
    assert response.status_code == 422  # one visible character is no name


def test_a_new_sqlite_database_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'new.db'}")
    with engine.connect() as connection:
        connection.exec_driver_sql("CREATE TABLE t (x INTEGER)")
        connection.commit()
    engine.dispose()
    assert stat.S_IMODE((tmp_path / "new.db").stat().st_mode) == 0o600


def test_what_is_public_can_be_closed_and_is_said_in_production(
    live: Live, caplog: pytest.LogCaptureFixture
) -> None:
    closed = TestClient(create_app(live.settings.model_copy(update={"public_api_docs": False})))
    assert closed.get("/docs").status_code == 404
    assert closed.get("/openapi.json").status_code == 404
    assert TestClient(live.app).get("/openapi.json").status_code == 200  # open by default
    production = live.settings.model_copy(update={"environment": "production"})
    with caplog.at_level(logging.WARNING):
        create_app(production)
    said = caplog.text
    assert "TESSERA_METRICS_TOKEN" in said and "TESSERA_PUBLIC_API_DOCS=false" in said


def test_cookies_are_https_only_whenever_the_request_came_over_https(live: Live) -> None:
    secure = TestClient(live.app, base_url="https://testserver")
    response = secure.get(f"/api/projects/{SLUG}/tasks/next")
    assert "secure" in response.headers["set-cookie"].lower()
    plain = TestClient(live.app).get(f"/api/projects/{SLUG}/tasks/next")
    assert "secure" not in plain.headers["set-cookie"].lower()


def test_a_display_name_longer_than_its_column_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "vocabulary.json"
    path.write_text(json.dumps({"tags": [{"name": "cat", "display_name": "c" * 129}]}))
    with pytest.raises(ImportFormatError, match="more than 128 characters"):
        read_vocabulary(path)


def test_one_address_with_many_cookies_cannot_hoard_either(live: Live) -> None:
    app = create_app(live.settings.model_copy(update={"open_tasks_per_address": 5}))
    statuses = [  # every request a new cookie: a new volunteer, two leases each at most
        TestClient(app).get(f"/api/projects/{SLUG}/tasks/next").status_code for _ in range(8)
    ]
    assert statuses == [200] * 5 + [429] * 3
    refused = TestClient(app).get(f"/api/projects/{SLUG}/tasks/next")
    assert "answer or skip one first" in refused.json()["detail"]
    assert int(refused.headers["retry-after"]) > 0
    with live.factory() as session:
        clients = set(session.scalars(select(Task.client)))
        assert len(clients) == 1 and "testclient" not in str(clients)  # a hash, not the address
    # A volunteer of that address who answers keeps going: the answer frees a place.
    volunteer = live.volunteer()
    volunteer.client = TestClient(app)
    with live.factory() as session:
        session.execute(update(Task).values(state=TaskState.EXPIRED))  # the hoard runs out
        session.commit()
    for _ in range(8):
        task = volunteer.next_task(SLUG)
        assert task is not None
        volunteer.answer(SLUG, task)


def test_an_anonymous_upload_is_refused_by_its_login_before_its_form_is_read(
    live: Live,
) -> None:
    client = TestClient(live.app, follow_redirects=False)
    files = {"mask": ("mask.png", b"x" * 200_000, "image/png")}
    response = client.post("/curate/targets/1/mask", files=files)
    # 401 (who is it?) before 403 (its CSRF token): the CSRF check reads the form.
    assert response.status_code == 401, response.text
