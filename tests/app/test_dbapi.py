"""Prepared statements on the DBAPI cursor (``app.dbapi``) hand back what the session would."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import bindparam, insert, inspect, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db import utcnow
from app.dbapi import Copies, Prepared
from app.models import Project, Tag, Task, TaskKind, TaskState, Volunteer
from app.services.project import create_project
from app.services.volunteer import create_volunteer


def _tasks(session: Session, n: int) -> list[Task]:
    project = create_project(session, slug="prepared")
    tag = Tag(project_id=project.id, name="cat", display_name="cat")
    volunteer = create_volunteer(session)
    session.add(tag)
    session.flush()
    now = utcnow()
    tasks = [
        Task(
            project_id=project.id,
            volunteer_id=volunteer.id,
            tag_id=tag.id,
            kind=TaskKind.WINDOW if i % 2 else TaskKind.MOSAIC,
            nonce=f"nonce-{i}",
            state=TaskState.SUBMITTED if i % 2 else TaskState.LEASED,
            expires_at=now + timedelta(seconds=i),
            submitted_at=now if i % 2 else None,
            result={"votes": 9, "feedback": "ok"} if i % 2 else None,
        )
        for i in range(n)
    ]
    session.add_all(tasks)
    session.flush()
    return tasks


COLUMNS = (Task.id, Task.kind, Task.state, Task.expires_at, Task.submitted_at, Task.result)


def test_rows_are_typed_as_the_session_hands_them_back(session: Session) -> None:
    tasks = _tasks(session, 4)
    by_id = select(*COLUMNS).where(Task.id == bindparam("task_id"))
    prepared = Prepared(by_id)
    for task in tasks:
        expected = tuple(session.execute(by_id, {"task_id": task.id}).one())
        got = prepared.run(session, {"task_id": task.id}).first()
        assert got == expected
        assert got is not None and isinstance(got[1], TaskKind) and isinstance(got[2], TaskState)
    assert prepared.run(session, {"task_id": -1}).first() is None


def test_an_in_list_is_spelled_out_and_an_empty_one_matches_nothing(session: Session) -> None:
    tasks = _tasks(session, 5)
    some = select(Task.id).where(Task.id.in_(bindparam("ids", expanding=True))).order_by(Task.id)
    prepared = Prepared(some)
    for ids in ([tasks[0].id], [t.id for t in tasks[1:4]], []):
        assert prepared.run(session, {"ids": ids}).scalars() == sorted(ids)
    # Values written in the statement itself (a state, a list) are bound with the caller's.
    leased = Prepared(some.where(Task.state == TaskState.LEASED))
    expected = [t.id for t in tasks if t.state == TaskState.LEASED]
    assert leased.run(session, {"ids": [t.id for t in tasks]}).scalars() == expected
    listed = Prepared(some.where(Task.state.in_([TaskState.LEASED, TaskState.SKIPPED])))
    assert listed.run(session, {"ids": [t.id for t in tasks]}).scalars() == expected


def test_writes_count_their_rows_and_a_duplicate_key_raises_sqlalchemys_error(
    session: Session,
) -> None:
    tasks = _tasks(session, 3)
    mark = Prepared(
        update(Task)
        .where(Task.id == bindparam("task_id"), Task.state == TaskState.LEASED)
        .values(state=TaskState.SKIPPED)
    )
    assert mark.run(session, {"task_id": tasks[0].id}).rowcount == 1
    assert mark.run(session, {"task_id": tasks[0].id}).rowcount == 0  # no longer leased
    session.expire_all()
    assert session.get(Task, tasks[0].id).state == TaskState.SKIPPED  # type: ignore[union-attr]

    columns = ("project_id", "volunteer_id", "tag_id", "kind", "nonce", "state", "issued_at")
    add = Prepared(insert(Task).returning(Task.id), columns=(*columns, "expires_at"))
    values = {c: getattr(tasks[0], c) for c in columns} | {"expires_at": utcnow()}
    new_id = add.run(session, values | {"nonce": "fresh"}).scalar()
    assert session.get(Task, new_id) is not None
    with pytest.raises(IntegrityError):  # the nonce is unique
        add.run(session, values | {"nonce": "fresh"})


def test_one_statement_runs_for_each_set_of_values(session: Session) -> None:
    tasks = _tasks(session, 1)
    columns = ("project_id", "volunteer_id", "tag_id", "kind", "state", "issued_at", "expires_at")
    add = Prepared(insert(Task), columns=(*columns, "nonce"))
    values = {c: getattr(tasks[0], c) for c in columns}
    assert add.run(session, [values | {"nonce": n} for n in "abc"]).rowcount == 3
    nonces = session.scalars(select(Task.nonce).where(Task.tag_id == tasks[0].tag_id)).all()
    assert sorted(nonces) == ["a", "b", "c", "nonce-0"]


def test_a_statement_that_would_leave_a_default_to_the_session_is_refused(
    session: Session,
) -> None:
    project = create_project(session, slug="defaults")
    add = Prepared(insert(Tag), columns=("project_id", "name"))  # no display name...
    with pytest.raises(ValueError, match="would default"):  # ...and created_at defaults
        add.run(session, {"project_id": project.id, "name": "x"})


def test_copies_read_as_loaded_entities_and_stay_out_of_the_session(session: Session) -> None:
    tasks = _tasks(session, 2)
    copies = Copies(Task).where(Task.id == bindparam("task_id"))
    for task in tasks:
        copy = copies.first(session, {"task_id": task.id})
        assert copy is not None and copy is not task
        assert copy not in session and inspect(copy).transient
        session.refresh(task)
        for column in inspect(Task).column_attrs:
            assert getattr(copy, column.key) == getattr(task, column.key), column.key
    project = Copies(Project).where(Project.slug == "prepared").first(session)
    assert project is not None and project.setting("gold_rate") is not None
    joined = Copies(
        Volunteer,
        select(*Volunteer.__table__.c, Task.id).join(Task, Task.volunteer_id == Volunteer.id),
    )
    pairs = joined.with_extras(session)
    assert {extra for _, extra in pairs} == {(t.id,) for t in tasks}
    assert all(v.id == tasks[0].volunteer_id for v, _ in pairs)
