"""Fixtures of the app tests that need a whole demo project in a database of their own."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from app.cli import run_import
from app.config import Settings
from app.db import make_engine, make_session_factory
from app.migrate import upgrade_to_head
from ml.demo.dataset import write_demo_dataset

SLUG = "demo"


def app_settings(data_dir: Path, database_url: str) -> Settings:
    """Settings of an app under test: its own data folder and database, consensus at once."""
    return Settings(
        environment="test",
        data_dir=data_dir,
        database_url=database_url,
        secret_key="test-secret-key-that-is-long-enough-for-anything",
        consensus_interval_s=0,
    )


@dataclass
class World:
    settings: Settings
    factory: sessionmaker[Session]


@pytest.fixture
def world(
    request: pytest.FixtureRequest, fresh_database_url: str, tmp_path: Path
) -> Iterator[World]:
    """A migrated database with a demo project of ``request.param`` images (10 by default)."""
    settings = app_settings(tmp_path / "data", fresh_database_url)
    engine = make_engine(fresh_database_url)
    upgrade_to_head(engine)
    write_demo_dataset(tmp_path / "demo", seed=11, n_images=getattr(request, "param", 10))
    factory = make_session_factory(engine)
    with factory() as session:
        run_import(
            session, settings=settings, project_slug=SLUG, path=tmp_path / "demo", tag_file=None
        )
    yield World(settings, factory)
    engine.dispose()
