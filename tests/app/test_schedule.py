"""The retraining schedule: settings, the "after N complete targets" counter, and a real
APScheduler loop that starts one process at a time."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from app.db import make_engine, make_session_factory
from app.jobs.schedule import (
    RetrainSchedule,
    RetrainScheduler,
    completed_since_last_retrain,
    parse_duration,
    schedule_of,
)
from app.migrate import upgrade_to_head
from app.models import MaskSource, Project, Target, TargetState
from app.services.files import mask_store
from app.services.job import finish_job, start_job
from app.services.project import create_project
from app.services.target import add_mask_version
from tests.app.conftest import SLUG, World


def test_durations_and_schedules_are_checked() -> None:
    assert parse_duration("90") == parse_duration(90) == 90
    assert parse_duration("30m") == 1800 and parse_duration("6h") == 21600
    assert parse_duration("1d") == 86400
    for bad in ("soon", "-5m", "0"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    plan = schedule_of(
        Project(slug="p", settings={"retrain": {"every": "6h", "after_complete": 5}})
    )
    assert plan == RetrainSchedule(every_s=21600, after_complete=5)
    assert schedule_of(Project(slug="p", settings={})).empty
    with pytest.raises(ValueError, match="unknown retrain keys"):
        schedule_of(Project(slug="p", settings={"retrain": {"hourly": True}}))
    with pytest.raises(ValueError):
        schedule_of(Project(slug="p", settings={"retrain": {"cron": "every tuesday"}}))
    with pytest.raises(ValueError, match="positive integer"):
        schedule_of(Project(slug="p", settings={"retrain": {"after_complete": 0}}))


def test_the_scheduler_starts_one_retrain_process_at_a_time(
    fresh_database_url: str, tmp_path: Path
) -> None:
    engine = make_engine(fresh_database_url)
    upgrade_to_head(engine)
    factory = make_session_factory(engine)
    with factory() as session:
        project = create_project(session, slug="p")
        project.settings = {"retrain": {"every": "0.2"}}
        create_project(session, slug="quiet")  # no schedule: not scheduled
        session.commit()
    marker = tmp_path / "runs.txt"

    def command(slug: str) -> list[str]:  # stands in for `tessera retrain`: takes 1.5 s
        code = f"import time; open({str(marker)!r}, 'a').write({slug!r} + '\\n'); time.sleep(1.5)"
        return [sys.executable, "-c", code]

    scheduler = RetrainScheduler(factory, command=command)
    assert list(scheduler.add_projects()) == ["p"]
    scheduler.start()
    try:
        time.sleep(4.0)
    finally:
        scheduler.shutdown()
    runs = marker.read_text().split() if marker.exists() else []
    # fired every 0.2 s (about 20 times), but a run lasts 1.5 s and runs never overlap
    assert 1 <= len(runs) <= 3 and set(runs) == {"p"}
    assert len(scheduler.started) == len(runs)
    engine.dispose()


@pytest.mark.slow
def test_completed_targets_are_counted_since_the_last_retrain(world: World) -> None:
    with world.factory() as session:
        project = session.scalar(select(Project).where(Project.slug == SLUG))
        assert project is not None
        assert completed_since_last_retrain(session, project) == 0
        targets = session.scalars(
            select(Target).where(Target.project_id == project.id).limit(3)
        ).all()
        store = mask_store(world.settings)
        for target in targets[:2]:
            target.state = TargetState.COMPLETE
            add_mask_version(
                session,
                target=target,
                mask=np.zeros((4, 4), bool),
                source=MaskSource.CONSENSUS,
                store=store,
                written=[],
            )
        session.commit()
        assert completed_since_last_retrain(session, project) == 2
        job = start_job(session, project=project, kind="retrain", params={})
        finish_job(job, result={})
        session.commit()
        assert completed_since_last_retrain(session, project) == 0
