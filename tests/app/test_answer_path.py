"""One request per grid (``POST /api/projects/{slug}/tasks/answer``): the answer to the task in
hand and the next lease, in one transaction."""

from __future__ import annotations

from typing import Any

import numpy as np
from sqlalchemy import select

from app.models import Project, Task, TaskState, Vote
from ml.aggregation.simulate import answer
from tests.app.conftest import Live
from tests.app.crowd import SimulatedVolunteer

SLUG = "demo"
URL = f"/api/projects/{SLUG}/tasks/answer"


def _answers(volunteer: SimulatedVolunteer, task: dict[str, Any]) -> dict[str, Any]:
    labels, seconds = answer(
        volunteer.profile, volunteer.truths.coverage(task["id"]), volunteer.rng
    )
    return {
        "token": task["token"],
        "selected": [int(p) for p in np.flatnonzero(labels)],
        "elapsed_ms": int(seconds.sum() * 1000),
    }


def test_each_answer_returns_the_next_task_and_every_vote_is_stored(live: Live) -> None:
    volunteer = live.volunteer()
    first = volunteer.client.post(URL, json={}).json()  # no task in hand yet: only the next
    assert first["submission"] is None and first["task"] is not None
    task, seen, votes = first["task"], {first["task"]["id"]}, 0
    for _ in range(12):
        response = volunteer.client.post(URL, json={"submit": _answers(volunteer, task)})
        assert response.status_code == 200, response.text
        data = response.json()
        assert data["submission"]["task_id"] == task["id"]
        votes += data["submission"]["votes"]
        if data["task"] is None:
            break
        task = data["task"]
        assert task["id"] not in seen, "a task was served twice"
        seen.add(task["id"])
    assert votes == live.count(Vote) > 0
    with live.factory() as session:
        states = dict(session.execute(select(Task.id, Task.state)).all())
    # Every task answered is stored as submitted; only the last one served is still leased.
    assert sorted(states.values()).count(TaskState.LEASED) == 1
    assert states[task["id"]] == TaskState.LEASED


def test_a_refused_answer_leases_nothing_and_stores_nothing(live: Live) -> None:
    with live.factory() as session:
        project = session.scalar(select(Project).where(Project.slug == SLUG))
        assert project is not None
        project.settings = {**project.settings, "lease_seconds": 0}
        session.commit()
    volunteer = live.volunteer()
    task = volunteer.client.post(URL, json={}).json()["task"]
    tasks = live.count(Task)
    body = {"submit": {"token": task["token"], "selected": [0], "elapsed_ms": 900}}
    response = volunteer.client.post(URL, json=body)
    assert response.status_code == 410 and "expired" in response.text
    assert live.count(Task) == tasks and live.count(Vote) == 0
    forged = {"submit": {**body["submit"], "token": task["token"][:-4] + "AAAA"}}
    assert volunteer.client.post(URL, json=forged).status_code == 400
    both = {**body, "skip": {"token": task["token"]}}
    response = volunteer.client.post(URL, json=both)
    assert response.status_code == 422 and "not both" in response.text
    assert live.count(Task) == tasks and live.count(Vote) == 0


def test_skip_and_next_and_an_answer_without_a_next_lease(live: Live) -> None:
    volunteer = live.volunteer()
    task = volunteer.client.post(URL, json={}).json()["task"]
    data = volunteer.client.post(URL, json={"skip": {"token": task["token"]}}).json()
    assert data["submission"] is None and data["task"]["id"] != task["id"]
    with live.factory() as session:
        assert session.get(Task, task["id"]).state == TaskState.SKIPPED  # type: ignore[union-attr]
    held = data["task"]
    tasks = live.count(Task)
    data = volunteer.client.post(
        URL, json={"submit": _answers(volunteer, held), "next": False}
    ).json()
    assert data["submission"]["votes"] == 9 and data["task"] is None and data["message"] is None
    assert live.count(Task) == tasks
    # The same answer again (a retry after a lost response) stores nothing more.
    again = volunteer.client.post(URL, json={"submit": _answers(volunteer, held), "next": False})
    assert again.json()["submission"] == data["submission"]
    assert live.count(Vote) == 9
