"""Fusion off the request path (``app.services.crowd.fuser``): answers are stored at once and
folded into the consensus by a background fuser, each exactly once, after a crash too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from app.config import Settings
from app.main import create_app
from app.models import Cell, CellStatus, Consensus, Credibility, Task, TaskState, Vote
from app.services.crowd import fuser as fuser_module
from app.services.crowd.fuser import fuse_pending
from ml.aggregation.simulate import PROFILES
from tests.app.conftest import Live
from tests.app.crowd import SimulatedVolunteer, stored_and_counted

SLUG = "demo"


def _counted_equals_stored(live: Live) -> None:
    """Every voted unknown cell's consensus counts exactly the votes stored on it."""
    with live.factory() as session:
        votes, counted = stored_and_counted(session)
    assert votes and counted == votes


def _credibility(live: Live) -> list[tuple[int, float, float]]:
    with live.factory() as session:
        rows = session.execute(
            select(Credibility.volunteer_id, Credibility.pos_yes, Credibility.neg_no)
        )
        return sorted((int(v), float(a), float(b)) for v, a, b in rows)


def _waiting(live: Live) -> int:
    with live.factory() as session:
        return (
            session.scalar(
                select(func.count()).where(
                    Task.state == TaskState.SUBMITTED, Task.fused_at.is_(None)
                )
            )
            or 0
        )


def test_answers_are_acknowledged_at_once_and_fused_in_the_background(live: Live) -> None:
    settings = live.settings.model_copy(update={"fusion": "background", "fusion_interval_s": 0.05})
    app = create_app(settings)
    with TestClient(app):  # the lifespan starts the fuser; each volunteer a client of its own
        crowd = [
            SimulatedVolunteer(
                TestClient(app), PROFILES["diligent"], np.random.default_rng(i), live.truths
            )
            for i in range(4)
        ]
        results = []
        for _ in range(15):
            for volunteer in crowd:
                task = volunteer.next_task(SLUG)
                if task is not None:
                    results.append(volunteer.answer(SLUG, task))
        # Acknowledged once stored: what fusing did is not known yet.
        assert results and all(r["retired_cells"] is None for r in results)
        deadline = time.monotonic() + 30
        while _waiting(live) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _waiting(live) == 0
    app.state.engine.dispose()
    _counted_equals_stored(live)
    with live.factory() as session:
        retired = session.scalar(
            select(func.count()).select_from(Cell).where(Cell.status == CellStatus.RETIRED)
        )
        credible = session.scalar(select(func.count()).select_from(Credibility))
    assert retired and credible  # fusion settled cells and learned about the volunteers


def test_a_crash_before_fusion_loses_nothing_and_nothing_is_fused_twice(live: Live) -> None:
    # Stored but never fused: the answers of a server that died before its fuser ran.
    settings = live.settings.model_copy(update={"fusion": "background", "fusion_max_lag_s": 3600.0})
    app = create_app(settings)  # no lifespan: no fuser
    crowd = [
        SimulatedVolunteer(
            TestClient(app), PROFILES["diligent"], np.random.default_rng(i), live.truths
        )
        for i in range(3)
    ]
    for _ in range(8):
        for volunteer in crowd:
            volunteer.step(SLUG)
    waiting = _waiting(live)
    assert waiting == live.count(Vote) // 9 > 0
    with live.factory() as session:
        assert not session.scalar(select(func.sum(Consensus.n_votes)))
    # The next server's fuser takes them in batches, oldest first.
    write = app.state.write_session_factory
    assert fuse_pending(write, settings, limit=5) == 5
    while fuse_pending(write, settings, limit=5):
        pass
    assert _waiting(live) == 0
    _counted_equals_stored(live)
    with live.factory() as session:
        before = sorted(
            tuple(r)
            for r in session.execute(
                select(Credibility.volunteer_id, Credibility.pos_yes, Credibility.neg_no)
            )
        )
    assert fuse_pending(write, settings) == 0  # nothing twice
    with live.factory() as session:
        after = sorted(
            tuple(r)
            for r in session.execute(
                select(Credibility.volunteer_id, Credibility.pos_yes, Credibility.neg_no)
            )
        )
    assert after == before
    app.state.engine.dispose()


def test_tessera_fuse_folds_in_what_external_fusion_servers_store(live: Live) -> None:
    # Web workers with fusion "external" store answers and fuse nothing ...
    settings = live.settings.model_copy(update={"fusion": "external", "fusion_max_lag_s": 3600.0})
    app = create_app(settings)
    with TestClient(app):
        volunteer = SimulatedVolunteer(
            TestClient(app), PROFILES["diligent"], np.random.default_rng(0), live.truths
        )
        for _ in range(6):
            volunteer.step(SLUG)
        time.sleep(0.3)
        assert _waiting(live) == 6
    app.state.engine.dispose()
    # ... and `tessera fuse` (a process of its own) folds them in.
    env = {
        **os.environ,
        "TESSERA_DATA_DIR": str(live.settings.data_dir),
        "TESSERA_DATABASE_URL": live.settings.resolved_database_url,
        "TESSERA_SECRET_KEY": live.settings.secret_key,
    }
    fuser = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "fuse", "--poll", "0.05"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while _waiting(live) and time.monotonic() < deadline and fuser.poll() is None:
            time.sleep(0.1)
    finally:
        fuser.send_signal(signal.SIGTERM)  # as a service manager stops it
        out, _ = fuser.communicate(timeout=60)
    assert _waiting(live) == 0, out
    assert "6 answers fused" in out
    _counted_equals_stored(live)


def test_requests_are_held_while_the_fuser_is_behind(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fuser_module, "PAUSE_MAX_S", 0.6)
    paused: list[float] = []  # what each request was held for, as the fuser module says
    hold = fuser_module.pause_while_behind

    async def recorded(probe: fuser_module.LagProbe, settings: Settings) -> float:
        paused.append(await hold(probe, settings))
        return paused[-1]

    monkeypatch.setattr(fuser_module, "pause_while_behind", recorded)
    settings = live.settings.model_copy(update={"fusion": "external", "fusion_max_lag_s": 0.3})
    app = create_app(settings)  # and no fuser runs at all: the worst case of falling behind
    volunteer = SimulatedVolunteer(
        TestClient(app), PROFILES["diligent"], np.random.default_rng(0), live.truths
    )
    assert volunteer.step(SLUG) is not None
    assert paused == [0.0]  # nobody waits yet (not a wall-clock bound: CI machines vary)
    time.sleep(0.4)  # the first answer now waits longer than the lag allowed
    start = time.monotonic()
    late = volunteer.step(SLUG)
    assert len(paused) == 2 and paused[1] >= 0.6 - 1e-9  # held as long as allowed
    assert time.monotonic() - start >= 0.6  # and the client really waited
    assert late is not None and late["votes"] == 9 and live.count(Vote) == 18
    assert _waiting(live) == 2
    app.state.engine.dispose()


def test_a_server_stopped_gracefully_leaves_no_answer_waiting(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A woken fuser gathers answers for GATHER_S before it fuses: long here, so that answers
    # surely wait when the server stops, however slow the machine (with the default 0.2 s, a
    # CI run beside other work had fused all three before the check).
    monkeypatch.setattr(fuser_module, "GATHER_S", 30.0)
    settings = live.settings.model_copy(update={"fusion": "background"})
    app = create_app(settings)
    with TestClient(app):
        volunteer = SimulatedVolunteer(
            TestClient(app), PROFILES["diligent"], np.random.default_rng(0), live.truths
        )
        for _ in range(3):
            volunteer.step(SLUG)
        # The fuser gathers answers once woken: these still wait as it stops ...
        assert _waiting(live) > 0
    # ... and the shutdown fused them.
    assert _waiting(live) == 0
    app.state.engine.dispose()
    _counted_equals_stored(live)


def test_held_requests_share_one_reading_of_the_lag(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    """However many requests are held, the lag is read from the database at most once per
    step (each held request used to query it every 50 ms)."""
    readings: list[float] = []
    real = fuser_module.lag_s

    def counted(session: Session) -> float:
        readings.append(time.monotonic())
        return real(session)

    monkeypatch.setattr(fuser_module, "lag_s", counted)
    probe = fuser_module.LagProbe(live.factory, every_s=1.0)
    threads = [threading.Thread(target=lambda: [probe.read() for _ in range(50)]) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(readings) == 1  # 400 reads within the step: one query
    time.sleep(1.05)
    assert probe.fresh() is None  # stale once the step is over: the next read queries again
    probe.read()
    assert len(readings) == 2


def test_one_fuser_fuses_a_project_at_a_time(live: Live) -> None:
    """On PostgreSQL a second fuser leaves a project alone while another fuses it (its batches
    stay whole, and the two do not wait on each other's target locks); SQLite has one writer."""
    settings = live.settings.model_copy(update={"fusion": "background", "fusion_max_lag_s": 3600.0})
    app = create_app(settings)  # no lifespan: no fuser of its own
    volunteer = SimulatedVolunteer(
        TestClient(app), PROFILES["diligent"], np.random.default_rng(0), live.truths
    )
    for _ in range(4):
        volunteer.step(SLUG)
    write = app.state.write_session_factory
    postgres = app.state.engine.dialect.name == "postgresql"
    if postgres:
        with live.factory() as other:  # another fuser, in the middle of the project's batch
            project_id = other.scalar(select(Task.project_id).limit(1))
            assert project_id is not None
            key = fuser_module.fusing_key(project_id)
            assert other.scalar(text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": key})
            assert fuse_pending(write, settings) == 0
            assert _waiting(live) == 4
        # Its transaction over, the turn is free again.
    assert fuse_pending(write, settings) == 4
    assert _waiting(live) == 0
    _counted_equals_stored(live)
    app.state.engine.dispose()
