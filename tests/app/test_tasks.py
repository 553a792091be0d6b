"""Grid tasks over HTTP on a real, committed database: the whole volunteer path."""

from __future__ import annotations

import io
import random
import threading

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import func, or_, select

from app.models import (
    Cell,
    CellStatus,
    Consensus,
    Gold,
    MaskSource,
    MaskVersion,
    Project,
    RetireReason,
    Target,
    TargetState,
    TaskTile,
    Volunteer,
    Vote,
    Window,
)
from app.services.crowd.opening import load_truth
from app.services.crowd.picker import next_task
from app.services.recompute import recompute_project
from app.services.volunteer import ban_volunteer
from app.storage import decode_mask_png
from ml.aggregation import grid
from ml.aggregation.rules import leaf_cells
from ml.aggregation.simulate import PROFILES
from tests.app.conftest import Live

SLUG = "demo"


def test_first_request_gets_an_anonymous_identity_and_a_task(live: Live) -> None:
    volunteer = live.volunteer()
    task = volunteer.next_task(SLUG)
    assert task is not None and len(task["tiles"]) == 9
    assert task["prompt"].startswith("Select all squares with ")
    assert "tessera_volunteer" in volunteer.client.cookies
    assert live.count(Volunteer) == 1
    # The same cookie keeps the same identity.
    volunteer.next_task(SLUG)
    assert live.count(Volunteer) == 1


def test_tiles_are_jpegs_with_the_cells_aspect_and_only_for_their_volunteer(live: Live) -> None:
    volunteer = live.volunteer()
    task = volunteer.next_task(SLUG)
    assert task is not None
    tile = task["tiles"][4]
    response = volunteer.client.get(tile["url"])
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    assert "max-age" in response.headers["cache-control"]
    image = PILImage.open(io.BytesIO(response.content))
    assert image.size == (tile["width"], tile["height"])
    assert live.volunteer().client.get(tile["url"]).status_code == 404


def _oracle_iou(cells: list[Cell], truth: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """IoU of the crowd's mask and of a perfect crowd's mask on the same cells, vs the truth.

    A grid mask cannot be sharper than its finest cells, so the crowd is judged against what
    perfect answers (select a tile when any of the object shows) would give on the same cells.
    """
    h, w = truth.shape
    addresses = [grid.Cell(c.level, c.row, c.col) for c in cells]
    leaves = [a for a, leaf in zip(addresses, leaf_cells(addresses), strict=True) if leaf]
    perfect = (
        grid.cell_coverage(truth, leaves, square=True) >= PROFILES["diligent"].coverage_threshold
    )
    _, oracle = grid.compose(leaves, perfect.astype(float), h, w)

    def iou(a: np.ndarray) -> float:
        return float((a & truth).sum() / max((a | truth).sum(), 1))

    return iou(mask), iou(oracle)


def test_a_diligent_crowd_completes_targets_as_well_as_the_grid_allows(live: Live) -> None:
    # More volunteers than the vote budget, so that no cell waits for a volunteer who is not there.
    crowd = [live.volunteer("diligent", seed) for seed in range(8)]
    # One tag, so that its targets finish within the test's time; one with a pyramid of its
    # own (every image has a triangle; "shape" and "polygon" are unions of their children).
    for _ in range(150):
        if not any([v.step(SLUG, tag="triangle", kind="window") for v in crowd]):
            break
    with live.factory() as session:
        done = session.execute(
            select(Target, MaskVersion)
            .join(MaskVersion, MaskVersion.target_id == Target.id)
            .where(
                # Finished: complete, or in triage because border cells stayed uncertain after
                # their budget (partly covered cells split diligent volunteers too); both get
                # the consensus mask.
                Target.state.in_([TargetState.COMPLETE, TargetState.TRIAGE]),
                MaskVersion.source == MaskSource.CONSENSUS,
            )
        ).all()
        assert done, "no target finished"
        scores = []
        for target, version in done:
            cells = list(session.scalars(select(Cell).where(Cell.target_id == target.id)))
            truth = load_truth(session, live.settings, target)
            assert truth is not None and version.soft_path is not None
            mask = decode_mask_png(live.settings.data_dir / version.hard_path)
            scores.append(_oracle_iou(cells, truth, mask))
            assert all(c.status == CellStatus.RETIRED for c in cells)
    crowd_iou, oracle_iou = np.mean(scores, axis=0)
    assert crowd_iou >= oracle_iou - 0.05, scores


def test_every_bad_token_is_refused_and_nothing_is_stored(live: Live) -> None:
    alice, bob = live.volunteer(seed=1), live.volunteer(seed=2)
    task = alice.next_task(SLUG)
    assert task is not None
    url = f"/api/projects/{SLUG}/tasks/submit"
    good = {"token": task["token"], "selected": [0], "elapsed_ms": 1000}
    cases = [
        (alice, {**good, "token": task["token"][:-4] + "AAAA"}, 400, "not one this server issued"),
        (alice, {**good, "token": "garbage"}, 400, "not one this server issued"),
        (bob, good, 403, "another volunteer"),
        (alice, {**good, "selected": [9]}, 422, "between 0 and 8"),
        (alice, {**good, "selected": [-1]}, 422, "between 0 and 8"),
        (alice, {**good, "elapsed_ms": -5}, 422, "elapsed_ms"),
    ]
    for client_of, body, status, message in cases:
        response = client_of.client.post(url, json=body)
        assert response.status_code == status, (body, response.text)
        assert message in response.text
    assert live.count(Vote) == 0
    assert alice.client.post(url, json=good).status_code == 200
    assert live.count(Vote) == 9


def test_an_expired_task_is_refused(live: Live) -> None:
    with live.factory() as session:
        project = session.scalar(select(Project).where(Project.slug == SLUG))
        assert project is not None
        project.settings = {**project.settings, "lease_seconds": 0}
        session.commit()
    volunteer = live.volunteer()
    task = volunteer.next_task(SLUG)
    assert task is not None
    response = volunteer.client.post(
        f"/api/projects/{SLUG}/tasks/submit",
        json={"token": task["token"], "selected": [], "elapsed_ms": 10},
    )
    assert response.status_code == 410 and "expired" in response.text
    assert live.count(Vote) == 0


def test_submitting_the_same_token_twice_stores_once_and_answers_the_same(live: Live) -> None:
    volunteer = live.volunteer()
    task = volunteer.next_task(SLUG)
    assert task is not None
    body = {"token": task["token"], "selected": [1, 4], "elapsed_ms": 2000}
    url = f"/api/projects/{SLUG}/tasks/submit"
    first = volunteer.client.post(url, json=body)
    second = volunteer.client.post(url, json=body)
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    assert live.count(Vote) == 9
    with live.factory() as session:
        labels = dict(session.execute(select(Vote.position, Vote.label)).all())
    assert [p for p, y in sorted(labels.items()) if y] == [1, 4]


def test_concurrent_pickers_never_share_leased_cells(live: Live) -> None:
    crowd = [live.volunteer(seed=s) for s in range(8)]
    tasks: list[dict[str, object] | None] = [None] * len(crowd)
    barrier = threading.Barrier(len(crowd))

    def pick(i: int) -> None:
        barrier.wait()
        tasks[i] = crowd[i].next_task(SLUG, kind="window")

    threads = [threading.Thread(target=pick, args=(i,)) for i in range(len(crowd))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [int(t["id"]) for t in tasks if t is not None]  # type: ignore[call-overload]
    assert len(ids) == len(crowd)
    with live.factory() as session:
        rows = session.execute(
            select(TaskTile.task_id, TaskTile.cell_id, TaskTile.known)
            .join(Cell, Cell.id == TaskTile.cell_id)
            .where(
                TaskTile.task_id.in_(ids),
                # A known window's squares outside its image are neither known nor asked.
                or_(Cell.retire_reason.is_(None), Cell.retire_reason != RetireReason.OUTSIDE),
            )
        ).all()
    unknown = [cell for _, cell, known in rows if not known]
    assert len(unknown) == len(set(unknown)), "two volunteers leased the same cell"


# Enough control images that this volunteer never runs out of unseen gold in 20 tasks (with
# the default share, a 4-image project sometimes had too little, and the rate then dipped).
@pytest.mark.parametrize("live", [{"control_share": 0.75}], indirect=True)
def test_known_tiles_make_up_at_least_the_gold_rate(live: Live) -> None:
    volunteer = live.volunteer()
    for _ in range(20):
        volunteer.step(SLUG)
    with live.factory() as session:
        known = session.scalars(select(TaskTile.known)).all()
    assert np.mean(known) >= 0.15


@pytest.mark.parametrize("live", [{"control_share": 1.0}], indirect=True)
def test_a_newcomers_known_window_checks_both_kinds_of_error(live: Live) -> None:
    """A known window with known-true and known-false cells comes before one of a single kind."""

    def labels(window_id: int) -> set[bool]:
        with live.factory() as session:
            return set(
                session.scalars(
                    select(Gold.label)
                    .join(Cell, Cell.id == Gold.cell_id)
                    .where(Cell.window_id == window_id)
                )
            )

    with live.factory() as session:
        known = session.scalars(select(Window.id).where(Window.known.is_(True))).all()
    kinds = [labels(w) for w in known]
    assert {True, False} in kinds and any(len(k) == 1 for k in kinds)  # both sorts exist
    # One mixed known window among every single-kind one: chance alone would rarely pick it.
    mixed = [w for w, k in zip(known, kinds, strict=True) if k == {True, False}]
    with live.factory() as session:
        for window in session.scalars(select(Window).where(Window.id.in_(mixed[1:]))):
            window.known = False
        session.commit()
    for seed in range(6):
        volunteer = live.volunteer(seed=seed)
        task = volunteer.next_task(SLUG, kind="window")
        assert task is not None
        with live.factory() as session:
            window_id = session.scalar(
                select(Cell.window_id)
                .join(TaskTile, TaskTile.cell_id == Cell.id)
                .where(TaskTile.task_id == task["id"], TaskTile.known.is_(True))
                .limit(1)
            )
        assert window_id is not None, "a newcomer's first task is known"
        assert labels(window_id) == {True, False}


@pytest.mark.parametrize("live", [{"control_share": 1.0}], indirect=True)
def test_mosaic_mixes_three_known_true_five_known_false_and_one_unknown(live: Live) -> None:
    volunteer = live.volunteer()
    task = volunteer.next_task(SLUG, kind="mosaic", tag="shape")
    assert task is not None and task["kind"] == "mosaic", task["fallback_reason"]
    with live.factory() as session:
        rows = session.execute(
            select(TaskTile.known, Gold.label, Cell.target_id)
            .join(Cell, Cell.id == TaskTile.cell_id)
            .outerjoin(Gold, Gold.cell_id == Cell.id)
            .where(TaskTile.task_id == task["id"])
        ).all()
    known = [label for is_known, label, _ in rows if is_known]
    assert sorted(known) == [False] * 5 + [True] * 3
    assert sum(not is_known for is_known, _, _ in rows) == 1
    assert len({target for _, _, target in rows}) > 1  # tiles from different targets
    volunteer.answer(SLUG, task)


@pytest.mark.parametrize("live", [{"control_share": 0.0}], indirect=True)
def test_mosaic_without_enough_gold_says_so_and_serves_a_window(live: Live) -> None:
    task = live.volunteer().next_task(SLUG, kind="mosaic")
    assert task is not None and task["kind"] == "window"
    assert "not enough gold" in task["fallback_reason"]


def test_a_banned_volunteers_votes_stop_counting_after_recomputation(live: Live) -> None:
    honest = [live.volunteer("diligent", s) for s in range(3)]
    adversary = live.volunteer("adversary", 99)
    for _ in range(8):
        for v in [*honest, adversary]:
            v.step(SLUG)
    with live.factory() as session:
        project = session.scalar(select(Project).where(Project.slug == SLUG))
        assert project is not None
        recompute_project(session, settings=live.settings, project=project)
        session.commit()
        before = dict(session.execute(select(Consensus.cell_id, Consensus.n_votes)).all())
        bad = session.scalar(select(Volunteer).order_by(Volunteer.id.desc()).limit(1))
        assert bad is not None
        touched = set(session.scalars(select(Vote.cell_id).where(Vote.volunteer_id == bad.id)))
        ban_volunteer(session, volunteer=bad, reason="adversarial answers")
        recompute_project(session, settings=live.settings, project=project)
        session.commit()
        after = dict(session.execute(select(Consensus.cell_id, Consensus.n_votes)).all())
        counted = dict(
            session.execute(
                select(Vote.cell_id, func.count())
                .join(Volunteer, Volunteer.id == Vote.volunteer_id)
                .where(Volunteer.banned.is_(False))
                .group_by(Vote.cell_id)
            ).all()
        )
        assert live.count(Vote) > 0  # nothing deleted
    assert touched
    for cell in touched:
        assert after[cell] == counted.get(cell, 0) < before[cell]


def test_volunteer_stats_are_coarse(live: Live) -> None:
    volunteer = live.volunteer()
    for _ in range(3):
        volunteer.step(SLUG)
    stats = volunteer.client.get("/api/volunteers/me").json()
    assert stats["answers"] == 27 and stats["tasks"] == 3
    assert stats["quality"] in {"new", "learning", "fair", "good", "excellent"}


def _first_windows(live: Live, draws: int) -> list[int]:
    """The window each of ``draws`` new volunteers is first leased (every lease given back
    before the next draw), with one window worth far more than the rest."""
    with live.factory() as session:
        project = session.scalars(select(Project).where(Project.slug == SLUG)).one()
        open_ids = session.scalars(
            select(Window.id).where(Window.known.is_(False), Window.state == "open")
        ).all()
        assert len(open_ids) >= 4
        for window in session.scalars(select(Window).where(Window.id.in_(open_ids))):
            window.value = 100.0 if window.id == open_ids[-1] else 0.01
        session.commit()
        first = []
        for k in range(draws):
            volunteer = Volunteer(public_id=f"acquisition-{k}")
            session.add(volunteer)
            session.flush()
            offer = next_task(session, project=project, volunteer=volunteer, kind="window")
            assert offer is not None
            assert offer.window is not None
            first.append(offer.window.id)
            session.rollback()  # the lease and the task are given back
    return first


@pytest.mark.parametrize("live", [{"gold_rate": 0.0}], indirect=True)
def test_the_picker_serves_the_window_worth_most(live: Live) -> None:
    draws = _first_windows(live, 6)
    assert len(set(draws)) == 1


@pytest.mark.parametrize("live", [{"gold_rate": 0.0, "acquisition": "random"}], indirect=True)
def test_random_acquisition_draws_any_open_window_whatever_its_value(live: Live) -> None:
    """The baseline that measures what choosing the questions is worth: its draws ignore the
    windows' values (their expected gain), not only the targets' priorities."""
    random.seed(0)
    draws = _first_windows(live, 30)
    assert len(set(draws)) >= 5
    assert max(draws.count(w) for w in set(draws)) < 15
    # A control target's squares (their truth is known) only once no other target has any.
    with live.factory() as session:
        control = set(
            session.scalars(
                select(Window.id)
                .join(Target, Target.id == Window.target_id)
                .where(Target.control.is_(True), Window.known.is_(False), Window.state == "open")
            )
        )
    assert control and not control & set(draws)
