"""The curator's workspace: accounts and roles, CSRF, triage, cell fixes, bans and export."""

from __future__ import annotations

import io
import json
import re
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image as PILImage
from pycocotools import mask as mask_utils
from sqlalchemy import func, select

from app.models import (
    Account,
    Cell,
    Gold,
    GoldSource,
    ImageTag,
    ImageTagSource,
    ImageTagStatus,
    MaskSource,
    MaskVersion,
    Project,
    Role,
    Target,
    TargetState,
    Volunteer,
)
from app.services.account import authenticate, create_account
from app.services.curation.volunteer_review import suspicion_flags
from app.services.errors import ConflictError, InvalidInputError, UnauthorizedError
from app.services.recompute import recompute_project
from app.services.target import tag_is_known
from app.storage import decode_mask_png
from tests.app.conftest import HAS_PYRAMID, SLUG, Live

PASSWORD = "correct horse battery"


def add_account(live: Live, name: str, role: Role) -> None:
    with live.factory() as session:
        create_account(session, name=name, password=PASSWORD, role=role)
        session.commit()


def csrf_of(page: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert match, "the page has no CSRF token"
    return match.group(1)


def logged_in(live: Live, role: Role | None) -> TestClient:
    """A client logged in with an account of ``role`` (None: nobody logged in)."""
    client = TestClient(live.app, follow_redirects=False)
    if role is None:
        return client
    name = f"{role}-user"
    with live.factory() as session:
        if session.scalar(select(Account).where(Account.name == name)) is None:
            create_account(session, name=name, password=PASSWORD, role=role)
            session.commit()
    token = csrf_of(client.get("/login").text)
    response = client.post("/login", data={"name": name, "password": PASSWORD, "csrf_token": token})
    assert response.status_code == 303, response.text
    return client


def triage_some(live: Live, n: int = 2) -> list[int]:
    """Send the first ``n`` evaluation targets to triage, as an exhausted vote budget would."""
    with live.factory() as session:
        targets = session.scalars(
            select(Target)
            .where(Target.control.is_(False), HAS_PYRAMID)
            .order_by(Target.id)
            .limit(n)
        ).all()
        for target in targets:
            target.state = TargetState.TRIAGE
            target.triage_reason = "cells still uncertain after their vote budget"
        session.commit()
        return [t.id for t in targets]


def test_passwords_are_hashed_and_checked(live: Live) -> None:
    with live.factory() as session:
        account = create_account(session, name="ada", password=PASSWORD, role=Role.CURATOR)
        assert account.password_hash.startswith("$argon2id$")
        assert PASSWORD not in account.password_hash
        assert authenticate(session, name="ada", password=PASSWORD).id == account.id
        with pytest.raises(UnauthorizedError, match="wrong name or password"):
            authenticate(session, name="ada", password="wrong password!")
        with pytest.raises(UnauthorizedError, match="wrong name or password"):
            authenticate(session, name="nobody", password=PASSWORD)
        with pytest.raises(ConflictError):
            create_account(session, name="ada", password=PASSWORD, role=Role.ADMIN)
        with pytest.raises(InvalidInputError, match="at least 10"):
            create_account(session, name="bob", password="short", role=Role.CURATOR)


# Every curator and admin route, with the least role that may use it.
ROUTES = [
    ("GET", "/curate", Role.CURATOR),
    ("GET", "/curate/targets", Role.CURATOR),
    ("GET", "/curate/targets/{target}", Role.CURATOR),
    ("GET", "/curate/images/{target}", Role.CURATOR),
    ("POST", "/curate/targets/{target}/cells/{cell}", Role.CURATOR),
    ("POST", "/curate/targets/{target}/accept", Role.CURATOR),
    ("POST", "/curate/targets/{target}/reject", Role.CURATOR),
    ("POST", "/curate/targets/{target}/tags", Role.CURATOR),
    ("GET", "/curate/masks/{mask}.png", Role.CURATOR),
    ("GET", "/curate/targets/{target}/current.png", Role.CURATOR),
    ("GET", "/curate/volunteers", Role.CURATOR),
    ("GET", "/curate/dashboard", Role.CURATOR),
    ("GET", "/curate/similar/{image}", Role.CURATOR),
    ("GET", "/curate/objects/{image}", Role.CURATOR),
    ("GET", "/curate/files/{image}", Role.CURATOR),
    ("POST", "/curate/volunteers/{volunteer}/ban", Role.CURATOR),
    ("POST", "/curate/volunteers/{volunteer}/unban", Role.CURATOR),
    ("GET", "/curate/export/demo.zip", Role.CURATOR),
    ("GET", "/admin/accounts", Role.ADMIN),
    ("POST", "/admin/accounts", Role.ADMIN),
]


@pytest.mark.parametrize("role", [None, Role.VOLUNTEER, Role.CURATOR, Role.ADMIN])
def test_the_role_matrix(live: Live, role: Role | None) -> None:
    live.volunteer().step(SLUG)  # one volunteer with votes, to ban and unban
    with live.factory() as session:
        volunteer = session.scalar(select(Volunteer.id))
    client = logged_in(live, role)
    token = csrf_of(client.get("/login").text)
    for method, template, needed in ROUTES:
        target = triage_some(live, 1)[0]
        with live.factory() as session:
            cell = session.scalar(select(Cell.id).where(Cell.target_id == target, Cell.level == 1))
            mask = session.scalar(select(MaskVersion.id).limit(1))
            image = session.scalar(select(Target.image_id).where(Target.id == target))
        path = template.format(
            target=target, cell=cell, volunteer=volunteer, mask=mask, image=image
        )
        data = {"csrf_token": token, "label": "yes", "reason": "test", "tag": "red"}
        if path == "/admin/accounts":
            data |= {"name": f"new-{role}", "password": PASSWORD, "role": "curator"}
        response = client.request(method, path, data=data if method == "POST" else None)
        allowed = role is not None and role.rank >= needed.rank
        status, why = response.status_code, (method, path, role, response.text[:200])
        if allowed:  # past the role check: done, or refused for the data (409, 422), never 5xx
            assert status not in (401, 403) and status < 500, why
        else:
            assert status == (401 if role is None else 403), why


def test_a_page_without_login_offers_the_login(live: Live) -> None:
    client = TestClient(live.app, follow_redirects=False)
    page = client.get("/curate", headers={"accept": "text/html"})
    assert page.status_code == 401
    assert "/login?next=%2Fcurate" in page.text


def test_csrf_is_required_on_every_state_change(live: Live) -> None:
    target = triage_some(live, 1)[0]
    client = logged_in(live, Role.CURATOR)
    token = csrf_of(client.get("/curate").text)
    for data in ({}, {"csrf_token": "forged"}, {"csrf_token": token + "x"}):
        response = client.post(f"/curate/targets/{target}/accept", data=data)
        assert response.status_code == 403 and "security token" in response.text
    # A login form posted from elsewhere (no cookie) is refused too.
    stranger = TestClient(live.app, follow_redirects=False)
    add_account(live, "eve", Role.CURATOR)
    response = stranger.post(
        "/login", data={"name": "eve", "password": PASSWORD, "csrf_token": token}
    )
    assert response.status_code == 403
    with live.factory() as session:
        assert session.get(Target, target).state == TargetState.TRIAGE  # type: ignore[union-attr]
    assert (
        client.post(f"/curate/targets/{target}/accept", headers={"X-CSRF-Token": token}).status_code
        == 303
    )


def test_a_wrong_password_is_refused_with_a_message(live: Live) -> None:
    add_account(live, "ada", Role.CURATOR)
    client = TestClient(live.app, follow_redirects=False)
    token = csrf_of(client.get("/login").text)
    response = client.post("/login", data={"name": "ada", "password": "nope", "csrf_token": token})
    assert response.status_code == 401 and "wrong name or password" in response.text
    assert "tessera_session" not in client.cookies


def test_triage_fix_accept_makes_gold_and_a_curator_mask(live: Live) -> None:
    first, second = triage_some(live, 2)
    client = logged_in(live, Role.CURATOR)
    queue = client.get("/curate")
    assert queue.status_code == 200
    assert f"/curate/targets/{first}" in queue.text and f"/curate/targets/{second}" in queue.text
    page = client.get(f"/curate/targets/{first}")
    assert page.status_code == 200
    token = csrf_of(page.text)
    with live.factory() as session:
        cells = session.scalars(
            select(Cell).where(Cell.target_id == first, Cell.level == 1).order_by(Cell.id)
        ).all()
        yes, no = cells[0].id, cells[1].id
    for cell, label in ((yes, "yes"), (no, "no")):
        response = client.post(
            f"/curate/targets/{first}/cells/{cell}", data={"label": label, "csrf_token": token}
        )
        assert response.status_code == 303
    response = client.post(f"/curate/targets/{first}/accept", data={"csrf_token": token})
    assert response.status_code == 303
    assert response.headers["location"] == f"/curate/targets/{second}"  # the next item
    with live.factory() as session:
        target = session.get(Target, first)
        assert target is not None and target.state == TargetState.COMPLETE
        gold = dict(
            session.execute(
                select(Gold.cell_id, Gold.label).where(Gold.source == GoldSource.CURATOR)
            ).all()
        )
        assert gold[yes] is True and gold[no] is False
        version = session.scalar(
            select(MaskVersion).where(
                MaskVersion.target_id == first, MaskVersion.source == MaskSource.CURATOR
            )
        )
        assert version is not None
        mask = decode_mask_png(live.settings.data_dir / version.hard_path)
        image_cells = session.get(Cell, yes), session.get(Cell, no)
    from ml.aggregation import grid

    coverage = grid.level_coverage(mask, 1, square=True).ravel()
    index = [c.row * 3 + c.col for c in image_cells if c is not None]
    # A "yes" says some of the tag is in the cell (the image decides which pixels); a "no", none.
    assert coverage[index[0]] > 0.0 and coverage[index[1]] == 0.0
    queue = client.get("/curate")
    assert f"/curate/targets/{first}" not in queue.text


def test_rejecting_a_tag_stores_an_empty_truth(live: Live) -> None:
    (target_id,) = triage_some(live, 1)
    with live.factory() as session:  # the tagger gave the tag too: its own row, beside people's
        target = session.get(Target, target_id)
        assert target is not None
        session.add(
            ImageTag(
                image_id=target.image_id,
                tag_id=target.tag_id,
                source=ImageTagSource.CLASSIFIER,
                probability=0.7,
            )
        )
        session.commit()
    client = logged_in(live, Role.CURATOR)
    token = csrf_of(client.get(f"/curate/targets/{target_id}").text)
    assert (
        client.post(f"/curate/targets/{target_id}/reject", data={"csrf_token": token}).status_code
        == 303
    )
    with live.factory() as session:
        target = session.get(Target, target_id)
        assert target is not None and target.state == TargetState.COMPLETE
        statuses = session.scalars(
            select(ImageTag.status).where(
                ImageTag.image_id == target.image_id, ImageTag.tag_id == target.tag_id
            )
        ).all()
        assert statuses == [ImageTagStatus.REJECTED] * 2  # whoever gave it
        assert not tag_is_known(session, target=target)
        labels = session.scalars(select(Gold.label).join(Cell).where(Cell.target_id == target_id))
        assert set(labels) == {False}


def test_ban_and_unban_from_the_volunteers_page_recompute(live: Live) -> None:
    honest = [live.volunteer("diligent", s) for s in range(2)]
    adversary = live.volunteer("adversary", 9)
    for _ in range(6):
        for v in [*honest, adversary]:
            v.step(SLUG)
    client = logged_in(live, Role.CURATOR)
    page = client.get("/curate/volunteers")
    assert page.status_code == 200
    with live.factory() as session:
        bad = session.scalar(select(Volunteer).order_by(Volunteer.id.desc()).limit(1))
        assert bad is not None
        bad_id = bad.id
    assert f'data-volunteer="{bad_id}"' in page.text
    token = csrf_of(page.text)

    def counted_votes() -> int:
        from app.models import Consensus

        with live.factory() as session:
            return session.scalar(select(func.sum(Consensus.n_votes))) or 0

    with live.factory() as session:  # the full EM pass, as the periodic timer runs it
        project = session.scalar(select(Project).where(Project.slug == SLUG))
        assert project is not None
        recompute_project(session, settings=live.settings, project=project)
        session.commit()
    before = counted_votes()
    response = client.post(
        f"/curate/volunteers/{bad_id}/ban", data={"csrf_token": token, "reason": "adversary"}
    )
    assert response.status_code == 303
    with live.factory() as session:
        volunteer = session.get(Volunteer, bad_id)
        assert volunteer is not None and volunteer.banned and volunteer.ban_reason == "adversary"
    banned = counted_votes()
    assert banned < before
    client.post(f"/curate/volunteers/{bad_id}/unban", data={"csrf_token": token})
    assert counted_votes() == before


def test_suspicion_flags_need_evidence() -> None:
    assert suspicion_flags(20, 0.2, 9000, 10) == ("adversarial",)
    assert suspicion_flags(20, 0.5, 9000, 10) == ("random clicking",)
    assert suspicion_flags(20, 0.95, 800, 10) == ("inhuman speed",)
    assert suspicion_flags(3, 0.0, 800, 2) == ()


def test_without_enough_gold_the_learned_credibility_flags() -> None:
    def flags(gold: int, agreement: float | None, *, youden: float, answers: int = 900) -> tuple:
        return suspicion_flags(gold, agreement, 9000.0, 100, answers=answers, youden=youden)

    assert flags(0, None, youden=-0.7) == ("adversarial (by consensus)",)
    assert flags(4, 0.9, youden=0.05) == ("random clicking (by consensus)",)
    assert flags(0, None, youden=0.5) == ()  # a sloppy but honest volunteer
    assert flags(0, None, youden=1 / 3) == ()  # a newcomer: the priors' J
    assert flags(0, None, youden=-0.7, answers=45) == ()  # too few answers to judge
    assert flags(20, 0.9, youden=-0.7) == ()  # enough gold: gold speaks, and clears them


def test_export_round_trips_through_pycocotools(live: Live, tmp_path: Path) -> None:
    targets = triage_some(live, 3)
    client = logged_in(live, Role.CURATOR)
    token = csrf_of(client.get("/curate").text)
    for target in targets:  # accept them as they stand: their posteriors make the masks
        client.post(f"/curate/targets/{target}/accept", data={"csrf_token": token})
    with live.factory() as session:
        expected = {}
        for target in targets:
            version = session.scalar(
                select(MaskVersion)
                .where(MaskVersion.target_id == target)
                .order_by(MaskVersion.version.desc())
                .limit(1)
            )
            assert version is not None
            expected[target] = decode_mask_png(live.settings.data_dir / version.hard_path)
        project = session.scalar(select(Project).where(Project.slug == SLUG))
        assert project is not None
    response = client.get(f"/curate/export/{SLUG}.zip")
    assert response.status_code == 200 and response.headers["content-type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    coco = json.loads(archive.read("annotations.json"))
    assert len([n for n in archive.namelist() if n.startswith("masks/")]) == len(targets)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    with live.factory() as session:
        for target_id, truth in expected.items():
            target = session.get(Target, target_id)
            assert target is not None
            anns = [
                a
                for a in coco["annotations"]
                if a["image_id"] == target.image_id
                and names[a["category_id"]] == target_tag_name(session, target)
            ]
            if not truth.any():
                assert not anns
                continue
            (ann,) = anns
            rle = dict(ann["segmentation"], counts=ann["segmentation"]["counts"].encode())
            decoded = mask_utils.decode(rle).astype(bool)
            assert np.array_equal(decoded, truth)
            assert ann["area"] == int(truth.sum())
    png = next(n for n in archive.namelist() if n.startswith("masks/"))
    assert PILImage.open(io.BytesIO(archive.read(png))).mode == "1"


def target_tag_name(session: object, target: Target) -> str:
    from app.models import Tag

    tag = session.get(Tag, target.tag_id)  # type: ignore[attr-defined]
    assert tag is not None
    return str(tag.name)


def test_a_painted_mask_must_fit_the_image(live: Live) -> None:
    (target_id,) = triage_some(live, 1)
    client = logged_in(live, Role.CURATOR)
    token = csrf_of(client.get(f"/curate/targets/{target_id}").text)
    with live.factory() as session:
        target = session.get(Target, target_id)
        assert target is not None
        from app.models import Image

        image = session.get(Image, target.image_id)
        assert image is not None
        size = (image.width, image.height)

    def post(data: bytes) -> int:
        files = {"mask": ("mask.png", data, "image/png")}
        response = client.post(
            f"/curate/targets/{target_id}/mask", data={"csrf_token": token}, files=files
        )
        return response.status_code

    def png(w: int, h: int) -> bytes:
        buf = io.BytesIO()
        PILImage.new("L", (w, h), 255).save(buf, format="PNG")
        return buf.getvalue()

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    def raw_png(w: int, h: int, rows: bytes, extra: bytes = b"") -> bytes:
        header = chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
        data = chunk(b"IDAT", zlib.compress(rows))
        return b"\x89PNG\r\n\x1a\n" + header + extra + data + chunk(b"IEND", b"")

    assert post(b"not a png") == 422
    assert post(png(size[0] + 1, size[1])) == 422
    # A header that claims a vast image (Pillow's DecompressionBombError), and a text chunk that
    # unpacks to 50 MB (ValueError): both were server errors.
    assert post(raw_png(100_000, 100_000, b"\0" * 10)) == 422
    bomb = chunk(b"zTXt", b"k\0\0" + zlib.compress(b"a" * (50 * 1024 * 1024), 9))
    rows = (b"\0" + b"\xff" * size[0]) * size[1]
    assert post(raw_png(*size, rows, extra=bomb)) == 422
    with live.factory() as session:
        assert session.get(Target, target_id).state == TargetState.TRIAGE  # type: ignore[union-attr]
    assert post(png(*size)) == 303
    with live.factory() as session:
        assert session.get(Target, target_id).state == TargetState.COMPLETE  # type: ignore[union-attr]
        from app.models import Window, WindowState

        still_open = (
            select(func.count())
            .select_from(Window)
            .where(Window.target_id == target_id, Window.state == WindowState.OPEN)
        )
        assert session.scalar(still_open) == 0  # no longer served to the crowd


def test_a_missing_tag_is_added_and_opened(live: Live) -> None:
    (target_id,) = triage_some(live, 1)
    client = logged_in(live, Role.CURATOR)
    token = csrf_of(client.get(f"/curate/targets/{target_id}").text)
    with live.factory() as session:
        from app.models import Tag

        target = session.get(Target, target_id)
        assert target is not None
        present = set(
            session.scalars(select(ImageTag.tag_id).where(ImageTag.image_id == target.image_id))
        )
        missing = session.scalar(select(Tag).where(Tag.id.not_in(present)).limit(1))
        assert missing is not None
        name = missing.name
    response = client.post(
        f"/curate/targets/{target_id}/tags", data={"csrf_token": token, "tag": name}
    )
    assert response.status_code == 303
    new_id = int(response.headers["location"].rsplit("/", 1)[1])
    with live.factory() as session:
        new = session.get(Target, new_id)
        assert new is not None and new.state == TargetState.COLLECTING
        assert session.scalar(
            select(func.count()).select_from(Cell).where(Cell.target_id == new_id)
        )
    again = client.post(
        f"/curate/targets/{target_id}/tags", data={"csrf_token": token, "tag": name}
    )
    assert again.status_code == 409
    unknown = client.post(
        f"/curate/targets/{target_id}/tags", data={"csrf_token": token, "tag": "no_such_tag"}
    )
    assert unknown.status_code == 422 and "vocabulary" in unknown.text


def test_dashboard_shows_progress_effort_and_gold_iou(live: Live) -> None:
    crowd = [live.volunteer("diligent", s) for s in range(2)]
    for _ in range(4):
        for v in crowd:
            v.step(SLUG)
    targets = triage_some(live, 2)
    client = logged_in(live, Role.CURATOR)
    token = csrf_of(client.get("/curate").text)
    for target in targets:
        client.post(f"/curate/targets/{target}/accept", data={"csrf_token": token})
    page = client.get("/curate/dashboard")
    assert page.status_code == 200
    assert page.text.count("<svg") >= 2  # IoU on gold and human-seconds
    with live.factory() as session:
        from app.models import Task, TaskState, Vote

        seconds = sum(
            ms / 1000
            for (ms,) in session.execute(
                select(func.max(Vote.elapsed_ms))
                .join(Task, Task.id == Vote.task_id)
                .where(Task.state == TaskState.SUBMITTED)
                .group_by(Task.id)
            )
        )
    shown = re.search(r'id="human-seconds">(\d+)<', page.text)
    assert shown and int(shown.group(1)) == round(seconds) > 0
    assert 'data-state="complete">2<' in page.text


def test_metrics_report_what_the_database_holds(live: Live) -> None:
    volunteer = live.volunteer()
    for _ in range(2):
        volunteer.step(SLUG)
    client = TestClient(live.app)
    body = client.get("/metrics")
    assert body.status_code == 200 and body.headers["content-type"].startswith("text/plain")
    with live.factory() as session:
        from app.models import Vote

        votes = session.scalar(select(func.count()).select_from(Vote))
    assert f'tessera_votes_total{{project="{SLUG}"}} {float(votes)}' in body.text
    assert 'tessera_open_windows{project="demo"}' in body.text
    assert 'route="/api/projects/{slug}/tasks/submit"' in body.text
    assert "tessera_targets{" in body.text


def test_metric_series_are_one_per_route_whatever_the_paths(live: Live) -> None:
    volunteer = live.volunteer()
    task = volunteer.next_task(SLUG)
    assert task is not None
    client = volunteer.client
    # A task id equal to a tile position once made the label /api/tasks/{position}/tiles/...
    for position in range(9):
        client.get(f"/api/tasks/{task['id']}/tiles/{position}")
        client.get(f"/api/tasks/{position + 1}/tiles/{position}")
    for n in range(30):  # probes and typos: every path a new series, once
        client.get(f"/no/such/page/{n}")
        client.get(f"/static/missing-{n}.js")
    body = client.get("/metrics").text
    routes = set(re.findall(r'tessera_http_requests_total\{[^}]*route="([^"]*)"', body))
    assert "/api/tasks/{task_id}/tiles/{position}" in routes
    assert "unmatched" in routes and "/static" in routes
    assert not any(r.startswith("/no/") or r[-1].isdigit() for r in routes), routes
    assert len(routes) <= 6, routes


def test_metrics_can_ask_for_a_token(live: Live) -> None:
    live.app.state.settings = live.settings.model_copy(update={"metrics_token": "s3cret"})
    client = TestClient(live.app)
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"authorization": "Bearer nope"}).status_code == 401
    ok = client.get("/metrics", headers={"authorization": "Bearer s3cret"})
    assert ok.status_code == 200


def fake_tagger_embeddings(live: Live, *, dim: int = 32, noise: float = 0.05) -> None:
    """A tagger version whose embedding of an image is the sum of its tags' vectors + noise."""
    from app.models import Image, ImageEmbedding, ModelKind, ModelVersion, Tag

    rng = np.random.default_rng(0)
    with live.factory() as session:
        project = session.scalar(select(Project).where(Project.slug == SLUG))
        assert project is not None
        version = ModelVersion(
            project_id=project.id, kind=ModelKind.TAGGER, version=1, path="x", active=True
        )
        session.add(version)
        session.flush()
        basis = {t.id: rng.normal(size=dim) for t in session.scalars(select(Tag))}
        for image in session.scalars(select(Image)):
            tags = session.scalars(select(ImageTag.tag_id).where(ImageTag.image_id == image.id))
            vector = sum((basis[t] for t in tags), rng.normal(scale=noise, size=dim))
            session.add(
                ImageEmbedding(
                    image_id=image.id,
                    model_version_id=version.id,
                    dim=dim,
                    vector=np.asarray(vector, dtype=np.float32).tobytes(),
                )
            )
        session.commit()


def test_find_similar_with_a_tag_swapped() -> None:
    from app.services.similar import EmbeddingIndex, nearest

    rng = np.random.default_rng(1)
    red, blue, circle, square = (rng.normal(size=16) for _ in range(4))
    rows = [red + circle, blue + circle, red + square, blue + square]
    vectors = np.stack(rows).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = EmbeddingIndex(
        image_ids=[1, 2, 3, 4],
        vectors=vectors,
        tags={"red": {0, 2}, "blue": {1, 3}, "circle": {0, 1}, "square": {2, 3}},
        version=1,
    )
    assert 1 not in [i for i, _ in nearest(index, 1, k=3)]  # never the query itself
    assert nearest(index, 1, k=1, swap=("red", "blue"))[0][0] == 2  # a blue circle
    assert nearest(index, 1, k=1, swap=("circle", "square"))[0][0] == 3  # a red square
    with pytest.raises(InvalidInputError, match="no embedded image carries"):
        nearest(index, 1, swap=("red", "green"))


def test_the_similar_page_searches_the_stored_embeddings(live: Live) -> None:
    client = logged_in(live, Role.CURATOR)
    with live.factory() as session:
        image_id = session.scalar(select(ImageTag.image_id).limit(1))
    assert client.get(f"/curate/similar/{image_id}").status_code == 404  # nothing embedded yet
    fake_tagger_embeddings(live)
    page = client.get(f"/curate/similar/{image_id}")
    assert page.status_code == 200
    shown = [int(i) for i in re.findall(r'<li data-image="(\d+)"', page.text)]
    assert shown and image_id not in shown
    with live.factory() as session:
        from app.models import Tag

        mine = set(
            session.scalars(select(Tag.name).join(ImageTag).where(ImageTag.image_id == image_id))
        )
        other = session.scalar(select(Tag.name).where(Tag.name.not_in(mine)).limit(1))
    swapped = client.get(
        f"/curate/similar/{image_id}", params={"swap_from": sorted(mine)[0], "swap_to": other}
    )
    assert swapped.status_code == 200
    top = int(re.findall(r'<li data-image="(\d+)"', swapped.text)[0])
    with live.factory() as session:
        from app.models import Tag

        top_tags = set(
            session.scalars(select(Tag.name).join(ImageTag).where(ImageTag.image_id == top))
        )
    assert other in top_tags  # the swap found an image that has the new tag


def test_open_targets_with_disagreement_or_a_doubtful_tag_are_queued(live: Live) -> None:
    from app.models import Consensus, ImageTagSource
    from app.services.curation.triage import DISAGREE, TAGGER_UNSURE, triage_queue

    with live.factory() as session:
        open_targets = session.scalars(
            select(Target)
            .where(
                Target.state == TargetState.COLLECTING,
                Target.control.is_(False),
                HAS_PYRAMID,
            )
            .order_by(Target.id)
            .limit(2)
        ).all()
        split, doubtful = open_targets
        cell = session.scalar(select(Cell).where(Cell.target_id == split.id, Cell.level == 1))
        assert cell is not None
        consensus = session.get(Consensus, cell.id)
        assert consensus is not None
        consensus.n_votes, consensus.n_yes, consensus.posterior = 6, 3, 0.5
        tag = session.scalar(
            select(ImageTag).where(
                ImageTag.image_id == doubtful.image_id, ImageTag.tag_id == doubtful.tag_id
            )
        )
        assert tag is not None
        tag.source, tag.probability = ImageTagSource.CLASSIFIER, 0.41
        session.commit()
        project = session.scalar(select(Project).where(Project.slug == SLUG))
        assert project is not None
        reasons = {i.target_id: i.reason for i in triage_queue(session, project=project)}
        assert reasons[split.id] == DISAGREE and reasons[doubtful.id] == TAGGER_UNSURE
        only = triage_queue(session, project=project, reason=TAGGER_UNSURE)
        assert [i.target_id for i in only] == [doubtful.id]
    client = logged_in(live, Role.CURATOR)
    page = client.get("/curate", params={"reason": DISAGREE})
    assert f"/curate/targets/{split.id}" in page.text
    assert f"/curate/targets/{doubtful.id}" not in page.text


def test_the_target_view_shows_any_level(live: Live) -> None:
    (target_id,) = triage_some(live, 1)
    client = logged_in(live, Role.CURATOR)
    page = client.get(f"/curate/targets/{target_id}", params={"level": 1})
    assert page.status_code == 200 and page.text.count('data-cell="1,') == 9
    assert client.get(f"/curate/targets/{target_id}", params={"level": 7}).status_code == 422


def test_the_current_mask_is_composed_now(live: Live) -> None:
    (target_id,) = triage_some(live, 1)
    url = f"/curate/targets/{target_id}/current.png"
    assert logged_in(live, None).get(url).status_code == 401
    assert logged_in(live, Role.VOLUNTEER).get(url).status_code == 403
    client = logged_in(live, Role.CURATOR)
    page = client.get(f"/curate/targets/{target_id}")
    assert "current mask (composed now)" in page.text and f'src="{url}"' in page.text
    token = csrf_of(page.text)
    with live.factory() as session:
        target = session.get(Target, target_id)
        assert target is not None
        from app.models import Image

        image = session.get(Image, target.image_id)
        assert image is not None
        size = (image.width, image.height)
        cells = session.scalars(
            select(Cell).where(Cell.target_id == target_id, Cell.level == 1).order_by(Cell.id)
        ).all()

    def current(**params: str) -> PILImage.Image:
        response = client.get(url, params=params)
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        assert response.headers["cache-control"] == "no-store"
        png = PILImage.open(io.BytesIO(response.content))
        assert png.size == size
        return png

    assert current().mode == "1" and current(soft="true").mode == "L"
    for cell in cells:  # every square "no": nothing of the tag, now
        client.post(
            f"/curate/targets/{target_id}/cells/{cell.id}",
            data={"label": "no", "csrf_token": token},
        )
    assert not np.asarray(current()).any()
    yes = cells[4]
    client.post(
        f"/curate/targets/{target_id}/cells/{yes.id}", data={"label": "yes", "csrf_token": token}
    )
    from ml.aggregation import grid

    coverage = grid.level_coverage(np.asarray(current()), 1, square=True).ravel()
    assert coverage[yes.row * 3 + yes.col] > 0 and coverage.sum() == coverage[yes.row * 3 + yes.col]

    client.post(f"/curate/targets/{target_id}/accept", data={"csrf_token": token})
    assert "current mask (composed now)" not in client.get(f"/curate/targets/{target_id}").text


def test_the_targets_browser_filters_sorts_and_pages(live: Live) -> None:
    from app.services.curation.browse import PAGE_SIZE, browse_targets

    for seed in range(3):
        live.volunteer(seed=seed).step(SLUG)  # some answered cells, so that uncertainty varies
    with live.factory() as session:
        project = session.scalar(select(Project).where(Project.slug == SLUG))
        assert project is not None
        everything = session.scalar(
            select(func.count()).select_from(Target).where(Target.project_id == project.id)
        )
        first = browse_targets(session, project=project)
        assert first.total == everything and len(first.rows) == min(everything, PAGE_SIZE)
        assert first.pages == -(-everything // PAGE_SIZE)
        uncertainties = [-1.0 if r.uncertainty is None else r.uncertainty for r in first.rows]
        assert uncertainties == sorted(uncertainties, reverse=True)
        assert any(r.uncertainty is not None and r.uncertainty < 1.0 for r in first.rows)
        by_id = browse_targets(session, project=project, sort="id")
        ids = [r.target_id for r in by_id.rows]
        assert ids == sorted(ids)
        if by_id.pages > 1:
            second = browse_targets(session, project=project, sort="id", page=2)
            assert second.rows[0].target_id > ids[-1]
        row = first.rows[0]
        one_tag = browse_targets(session, project=project, tag=row.tag, state=row.state)
        assert one_tag.total >= 1
        assert {(r.tag, r.state) for r in one_tag.rows} == {(row.tag, row.state)}
        named = browse_targets(session, project=project, image=row.image_name[2:-2].upper())
        assert row.image_name in {r.image_name for r in named.rows}
        assert browse_targets(session, project=project, image="no such file").total == 0
        # Past the last page, the last page (2**62 overflowed SQLite's integers: a 500).
        last = browse_targets(session, project=project, sort="id", page=2**62)
        assert last.page == by_id.pages and last.rows
        for bad in ({"state": "sleeping"}, {"sort": "colour"}, {"page": 0}):
            with pytest.raises(InvalidInputError):
                browse_targets(session, project=project, **bad)  # type: ignore[arg-type]


def test_the_targets_page_and_curator_errors_are_pages(live: Live) -> None:
    add_account(live, "cora", Role.CURATOR)
    client = logged_in(live, Role.CURATOR)
    html = {"accept": "text/html"}
    page = client.get("/curate/targets", params={"state": "collecting"}, headers=html)
    assert page.status_code == 200
    assert "least certain first" in page.text and "/curate/targets/" in page.text
    assert 'href="/curate/targets"' in client.get("/curate", headers=html).text  # the nav
    for url, params, status in [
        ("/curate/targets", {"state": "sleeping"}, 422),
        ("/curate/targets", {"page": "two"}, 422),
        ("/curate/targets/999999", {}, 404),
    ]:
        shown = client.get(url, params=params, headers=html)
        assert shown.status_code == status
        assert shown.headers["content-type"].startswith("text/html"), shown.text
        assert "Back to the curator" in shown.text
    # Scripts and the API keep their JSON.
    assert client.get("/curate/targets/999999").json()["detail"]
    api = client.get("/api/projects/no-such-project/tasks/next", headers=html)
    assert api.status_code == 404 and api.json()["detail"]


def test_mask_quality_against_human_seconds_is_recorded_per_tag_and_charted(live: Live) -> None:
    from app.models import QualitySnapshot
    from app.services.curation.quality import (
        evaluation_targets,
        quality_series,
        record_quality,
    )

    with live.factory() as session:
        project = session.scalar(select(Project).where(Project.slug == SLUG))
        assert project is not None
        before = record_quality(session, settings=live.settings, project=project)
        session.commit()
    crowd = [live.volunteer("diligent", s) for s in range(3)]
    for _ in range(5):
        for v in crowd:
            v.step(SLUG)
    with live.factory() as session:
        project = session.scalar(select(Project).where(Project.slug == SLUG))
        assert project is not None
        after = record_quality(session, settings=live.settings, project=project)
        session.commit()
        n_eval = len(evaluation_targets(session, project=project))
        rows = session.scalars(select(QualitySnapshot)).all()
        series = quality_series(session, project=project)
    assert before is not None and after is not None and n_eval > 0
    assert before.human_seconds == 0.0 < after.human_seconds
    assert sum(n for n, _ in after.by_tag.values()) == n_eval
    # One row over all tags and one per tag, each reading.
    assert len(rows) == 2 * (1 + len(after.by_tag))
    assert next(iter(series)) == "all tags"
    assert series["all tags"] == [
        (before.human_seconds, before.mean_iou),
        (after.human_seconds, after.mean_iou),
    ]
    page = logged_in(live, Role.CURATOR).get("/curate/dashboard")
    assert "Mask quality against human effort" in page.text
