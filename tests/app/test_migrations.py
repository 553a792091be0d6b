"""Migrations reach head on an empty database, and match the models exactly."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect, select, text
from sqlalchemy.orm import Session

import app.models  # noqa: F401
from app.db import Base, make_engine
from app.migrate import current_revision, head_revision, is_at_head, upgrade_to_head
from app.models import Project
from app.services.project import create_project


@pytest.fixture
def empty_engine(fresh_database_url: str) -> Iterator[Engine]:
    """A brand-new empty database of the same backend as the run's."""
    engine = make_engine(fresh_database_url)
    yield engine
    engine.dispose()


def test_upgrade_empty_database_to_head(empty_engine: Engine) -> None:
    assert current_revision(empty_engine) is None
    upgrade_to_head(empty_engine)
    assert current_revision(empty_engine) == head_revision(str(empty_engine.url))
    assert is_at_head(empty_engine)
    tables = set(inspect(empty_engine).get_table_names())
    assert set(Base.metadata.tables) <= tables


def test_upgrade_is_idempotent(empty_engine: Engine) -> None:
    upgrade_to_head(empty_engine)
    upgrade_to_head(empty_engine)
    assert is_at_head(empty_engine)


def test_autogenerate_finds_no_difference(empty_engine: Engine) -> None:
    upgrade_to_head(empty_engine)
    with empty_engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)
    assert diff == []


def test_only_one_active_model_version_per_kind(empty_engine: Engine) -> None:
    upgrade_to_head(empty_engine)
    with empty_engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO projects (slug, name, description, settings, created_at) "
                "VALUES ('p', 'p', '', '{}', CURRENT_TIMESTAMP)"
            )
        )
    insert = text(
        "INSERT INTO model_versions (project_id, kind, version, path, config, data_snapshot, "
        "metrics, active, created_at) VALUES (1, 'segmenter', :v, 'x', '{}', '{}', '{}', "
        ":active, CURRENT_TIMESTAMP)"
    )
    with empty_engine.begin() as conn:
        conn.execute(insert, {"v": 1, "active": True})
        conn.execute(insert, {"v": 2, "active": False})
    with pytest.raises(Exception, match=r"(?i)unique"), empty_engine.begin() as conn:
        conn.execute(insert, {"v": 3, "active": True})


def test_projects_made_before_square_cells_keep_the_image_frame(empty_engine: Engine) -> None:
    from alembic import command

    from app.migrate import alembic_config

    config = alembic_config(empty_engine.url.render_as_string(hide_password=False))
    with empty_engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0004")
    with empty_engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO projects (slug, name, description, settings, created_at) VALUES "
                "('old', 'old', '', '{\"min_cell_px\": 8}', CURRENT_TIMESTAMP), "
                "('bare', 'bare', '', '{}', CURRENT_TIMESTAMP)"
            )
        )
    upgrade_to_head(empty_engine)
    with Session(empty_engine) as session:
        projects = {p.slug: p for p in session.scalars(select(Project))}
        # Their votes name cells of the image frame: the frame is written into their settings.
        assert projects["old"].settings == {"min_cell_px": 8, "square_cells": False}
        assert projects["bare"].setting("square_cells") is False
        made_now = create_project(session, slug="new")
        assert made_now.settings == {"square_cells": True}  # stored, not left to defaults
    # ... and a cell wholly outside its image retires for its own reason, which the check takes.
    checks = {c["name"]: c["sqltext"] for c in inspect(empty_engine).get_check_constraints("cells")}
    assert "'outside'" in str(checks["ck_cells_retirereason"])
    assert "'curator'" in str(checks["ck_cells_retirereason"])


def test_windows_left_open_on_targets_that_stopped_collecting_are_closed(
    empty_engine: Engine,
) -> None:
    from alembic import command

    from app.migrate import alembic_config
    from app.models import Image, Tag, Target, TargetState, Window, WindowState

    config = alembic_config(empty_engine.url.render_as_string(hide_password=False))
    with empty_engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0011")
    # The tables these rows go in are the same at 0011 as at head, but for the tags' columns
    # that came later (written as the rows were at 0011).
    with Session(empty_engine) as session:
        project = create_project(session, slug="p")
        image = Image(
            project_id=project.id,
            sha256="0" * 64,
            file_name="a.png",
            format="png",
            width=30,
            height=30,
            size_bytes=1,
        )
        session.add(image)
        for name in ("a", "b", "c"):
            session.execute(
                text(
                    "INSERT INTO tags (project_id, name, display_name, category, description,"
                    " exhaustive, priority, created_at)"
                    " VALUES (:p, :n, :n, 'general', '', false, 1.0, CURRENT_TIMESTAMP)"
                ),
                {"p": project.id, "n": name},
            )
        tags = session.scalars(
            select(Tag.id).where(Tag.project_id == project.id).order_by(Tag.id)
        ).all()
        session.flush()
        states = [TargetState.TRIAGE, TargetState.COMPLETE, TargetState.COLLECTING]
        targets = [
            Target(project_id=project.id, image_id=image.id, tag_id=t, state=s)
            for t, s in zip(tags, states, strict=True)
        ]
        session.add_all(targets)
        session.flush()
        for target in targets:
            session.add(
                Window(
                    project_id=project.id,
                    tag_id=target.tag_id,
                    target_id=target.id,
                    level=0,
                    row=0,
                    col=0,
                    value=0.7,
                )
            )
        session.commit()
    upgrade_to_head(empty_engine)
    with Session(empty_engine) as session:
        rows = session.execute(
            select(Target.state, Window.state, Window.value, Window.closed_at)
            .join(Window, Window.target_id == Target.id)
            .order_by(Target.id)
        ).all()
    assert [(t, w) for t, w, _, _ in rows] == [
        (TargetState.TRIAGE, WindowState.CLOSED),
        (TargetState.COMPLETE, WindowState.CLOSED),
        (TargetState.COLLECTING, WindowState.OPEN),  # still collecting: left as it was
    ]
    assert [v for _, _, v, _ in rows] == [0.0, 0.0, 0.7]
    assert rows[0][3] is not None and rows[2][3] is None
