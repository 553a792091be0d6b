"""Nothing is counted twice: a real server under a crowd that races every answer against itself,
replays old tokens and skips, and afterwards every counter agrees with the votes stored."""

from __future__ import annotations

import random
import threading
from collections import Counter
from pathlib import Path

import httpx
from sqlalchemy import func, select

from app.db import make_engine
from app.models import Consensus, Credibility, Task, TaskState, TaskTile, Volunteer, Vote
from tests.app.browser import UNLIMITED, demo_env, serve

ANSWERS_EACH = 12


def _answer_twice_at_once(client: httpx.Client, body: dict[str, object]) -> list[httpx.Response]:
    """The same answer sent twice at the same moment (a double click, a retried request)."""
    responses: list[httpx.Response] = []
    start = threading.Barrier(2)

    def send() -> None:
        start.wait()
        responses.append(client.post("/api/projects/demo/tasks/submit", json=body))

    racers = [threading.Thread(target=send) for _ in range(2)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join()
    return responses


def _volunteer(url: str, seed: int, acked: list[tuple[int, int]], problems: list[str]) -> None:
    rng = random.Random(seed)
    old_tokens: list[str] = []
    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(ANSWERS_EACH):
            offer = client.get("/api/projects/demo/tasks/next").json()["task"]
            if offer is None:
                return
            if rng.random() < 0.15:
                skipped = client.post(
                    "/api/projects/demo/tasks/skip", json={"token": offer["token"]}
                )
                if skipped.status_code != 204:
                    problems.append(f"skip: {skipped.status_code} {skipped.text}")
                continue
            selected = [p for p in range(len(offer["tiles"])) if rng.random() < 0.35]
            body = {"token": offer["token"], "selected": selected, "elapsed_ms": 2500}
            first, second = _answer_twice_at_once(client, body)
            if first.status_code != 200 or second.status_code != 200:
                problems.append(f"race: {first.status_code} {second.status_code} {first.text}")
                continue
            if first.json() != second.json():
                problems.append(f"two answers to one token: {first.json()} {second.json()}")
            acked.append((first.json()["task_id"], first.json()["votes"]))
            old_tokens.append(offer["token"])
        for token in old_tokens[:3]:  # replayed later: answered again the same, stored once
            body = {"token": token, "selected": [0, 1, 2], "elapsed_ms": 2500}
            replay = client.post("/api/projects/demo/tasks/submit", json=body)
            if replay.status_code != 200:
                problems.append(f"replay: {replay.status_code} {replay.text}")


def test_every_counter_matches_the_votes_after_racing_replayed_and_skipped_answers(
    tmp_path: Path, fresh_database_url: str
) -> None:
    env = demo_env(tmp_path / "data", fresh_database_url, images=6, **UNLIMITED)
    acked: list[tuple[int, int]] = []
    problems: list[str] = []
    with serve(env) as (server, _proc):
        crowd = [
            threading.Thread(target=_volunteer, args=(server.url, i, acked, problems))
            for i in range(4)
        ]
        for thread in crowd:
            thread.start()
        for thread in crowd:
            thread.join(timeout=240)
    assert problems == []
    assert len(acked) >= 20

    engine = make_engine(fresh_database_url)
    with engine.connect() as conn:
        votes_by_task = dict(
            conn.execute(select(Vote.task_id, func.count()).group_by(Vote.task_id)).all()
        )
        # One submission per task: as many votes as acknowledged, one per tile.
        assert votes_by_task == dict(acked)
        tiles = dict(
            conn.execute(select(TaskTile.task_id, func.count()).group_by(TaskTile.task_id)).all()
        )
        assert all(votes_by_task[t] == tiles[t] for t in votes_by_task)
        assert conn.execute(
            select(func.count()).select_from(Task).where(Task.state == TaskState.SUBMITTED)
        ).scalar_one() == len(acked)

        # Per cell: the consensus counts are the votes on it (known tiles count only towards
        # their volunteer's credibility: a gold cell's answer is known).
        votes = conn.execute(
            select(Vote.cell_id, Vote.label, Vote.volunteer_id, Vote.task_id, Vote.position)
        ).all()
        known_tiles = set(
            conn.execute(
                select(TaskTile.task_id, TaskTile.position).where(TaskTile.known.is_(True))
            ).all()
        )
        asked = [v for v in votes if (v.task_id, v.position) not in known_tiles]
        per_cell = Counter(v.cell_id for v in asked)
        yes_per_cell = Counter(v.cell_id for v in asked if v.label)
        consensus = {c.cell_id: c for c in conn.execute(select(Consensus)).all()}
        assert per_cell and len(asked) < len(votes)  # both kinds were answered
        for cell_id, n in per_cell.items():
            counts = (consensus[cell_id].n_votes, consensus[cell_id].n_yes)
            assert counts == (n, yes_per_cell[cell_id]), cell_id

        # Per volunteer: tiles served are the tiles of their tasks, gold answers their votes on
        # known tiles.
        served = dict(
            conn.execute(
                select(Task.volunteer_id, func.count())
                .join(TaskTile, TaskTile.task_id == Task.id)
                .group_by(Task.volunteer_id)
            ).all()
        )
        known = dict(
            conn.execute(
                select(Task.volunteer_id, func.count())
                .join(TaskTile, TaskTile.task_id == Task.id)
                .where(TaskTile.known.is_(True))
                .group_by(Task.volunteer_id)
            ).all()
        )
        gold_votes = Counter(
            v.volunteer_id for v in votes if (v.task_id, v.position) in known_tiles
        )
        for volunteer in conn.execute(select(Volunteer)).all():
            assert volunteer.tiles_served == served.get(volunteer.id, 0)
            assert volunteer.known_served == known.get(volunteer.id, 0)
        for cred in conn.execute(select(Credibility).where(Credibility.category == "")).all():
            answered = cred.gold_tp + cred.gold_fn + cred.gold_tn + cred.gold_fp
            assert answered == gold_votes[cred.volunteer_id], cred.volunteer_id
    engine.dispose()
