"""kill -9 in the middle of an import and of a storm of submissions, in real processes: the
database stays consistent, every acknowledged vote is stored, and `tessera doctor` finds and
clears what the crash left (the retrain kill is in test_retrain)."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from sqlalchemy import Select, func, select

from app.db import make_engine
from app.models import Image, Project, Task, TaskState, Vote
from tests.app.browser import UNLIMITED, _tessera, demo_env, serve, tessera_env
from tests.app.crowd import stored_and_counted
from tests.builders import files_under, write_image

TESSERA = [sys.executable, "-m", "app.cli"]


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TESSERA, *args], env=env, capture_output=True, text=True, timeout=300)


def _count(url: str, model: type) -> int:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(model)).scalar_one()
    finally:
        engine.dispose()


def test_an_import_killed_mid_way_stores_nothing_and_doctor_clears_its_files(
    tmp_path: Path, fresh_database_url: str
) -> None:
    n = 600
    src = tmp_path / "many"
    for i in range(n):
        write_image(src / f"{i:04d}.png", 48, 40, seed=i)
    (src / "tags.txt").write_text("".join(f"{i:04d}.png cat\n" for i in range(n)))
    env = tessera_env(tmp_path / "data", fresh_database_url)
    _tessera(env, "db", "upgrade")
    images = tmp_path / "data" / "images"

    victim = subprocess.Popen([*TESSERA, "import", str(src), "--project", "many"], env=env)
    deadline = time.monotonic() + 120
    while len(files_under(images)) < 40:  # well into writing files, far from done
        assert victim.poll() is None, "the import finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    written = len(files_under(images))
    assert 40 <= written < n

    # Nothing was committed; the files it wrote are whole but named by no row.
    assert _count(fresh_database_url, Project) == 0 and _count(fresh_database_url, Image) == 0
    found = _run(env, "doctor")
    assert found.returncode == 1, found.stdout + found.stderr
    partial = sum(p.name.endswith(".tmp") for p in files_under(images))  # caught mid-write
    assert f"{partial} temporary and {written - partial} orphan files" in found.stdout
    young = _run(env, "doctor", "--repair")  # a running import's files are spared for an hour
    assert young.returncode == 1 and len(files_under(images)) == written
    fixed = _run(env, "doctor", "--repair", "--grace", "0")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert files_under(images) == []

    again = _run(env, "import", str(src), "--project", "many")
    assert again.returncode == 0, again.stderr
    assert _count(fresh_database_url, Image) == n
    assert _run(env, "doctor").returncode == 0


def _volunteer(url: str, stop: threading.Event, acked: list[tuple[int, int]], seed: int) -> None:
    """Answer tasks until told to stop or the server dies; record every acknowledged answer."""
    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=10) as client:
        while not stop.is_set():
            try:
                offer = client.get("/api/projects/demo/tasks/next").json()["task"]
                if offer is None:
                    time.sleep(0.05)
                    continue
                selected = [p for p in range(len(offer["tiles"])) if rng.random() < 0.3]
                response = client.post(
                    "/api/projects/demo/tasks/submit",
                    json={"token": offer["token"], "selected": selected, "elapsed_ms": 3000},
                )
            except httpx.TransportError:
                return  # the server is gone
            if response.status_code == 200:
                body = response.json()
                acked.append((body["task_id"], body["votes"]))


def test_a_server_killed_in_a_storm_of_submissions_keeps_every_acknowledged_vote(
    tmp_path: Path, fresh_database_url: str
) -> None:
    env = demo_env(tmp_path / "data", fresh_database_url, images=6, **UNLIMITED)
    acked: list[tuple[int, int]] = []
    stop = threading.Event()
    with serve(env) as (server, proc):
        crowd = [
            threading.Thread(target=_volunteer, args=(server.url, stop, acked, i)) for i in range(6)
        ]
        for thread in crowd:
            thread.start()
        deadline = time.monotonic() + 60
        while len(acked) < 40 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # mid-storm: requests are in flight
        proc.wait()
        stop.set()
        for thread in crowd:
            thread.join(timeout=30)
    assert len(acked) >= 40

    engine = make_engine(fresh_database_url)
    with engine.connect() as conn:
        stored = dict(conn.execute(select(Vote.task_id, func.count()).group_by(Vote.task_id)).all())
        submitted = set(
            conn.execute(select(Task.id).where(Task.state == TaskState.SUBMITTED)).scalars()
        )
    engine.dispose()
    for task_id, votes in acked:  # every acknowledged answer is there, in full
        assert stored.get(task_id) == votes, (task_id, votes, stored.get(task_id))
    # ... and nothing half-stored: a task has all of its votes or none, and votes only if submitted.
    assert set(stored) == submitted
    assert len(stored) >= len(acked)  # answers in flight at the kill may have landed unacknowledged

    assert _run(env, "doctor").returncode == 0
    # It starts again on the same data and serves; the fuser folds in every answer the crash
    # left unfused, each once: every cell's consensus counts exactly the votes stored on it.
    with serve(env) as (server, _proc), httpx.Client(base_url=server.url, timeout=10) as client:
        offer = client.get("/api/projects/demo/tasks/next").json()["task"]
        assert offer is not None
        body = {"token": offer["token"], "selected": [0], "elapsed_ms": 2500}
        assert client.post("/api/projects/demo/tasks/submit", json=body).status_code == 200
        waiting = select(func.count()).where(
            Task.state == TaskState.SUBMITTED, Task.fused_at.is_(None)
        )
        assert _wait_for(fresh_database_url, waiting, 0, timeout_s=60)
    with engine.connect() as conn:
        votes, counted = stored_and_counted(conn)
    engine.dispose()
    assert counted == votes


def _wait_for(url: str, query: Select[tuple[int]], value: int, timeout_s: float) -> bool:
    engine = make_engine(url)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            with engine.connect() as conn:
                if conn.execute(query).scalar_one() == value:
                    return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
    finally:
        engine.dispose()
