"""Fixtures of the app tests that need a whole demo project in a database of their own."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db import make_engine, make_session_factory
from app.main import create_app
from app.migrate import upgrade_to_head
from app.models import Target, Window
from app.services.importer import run_import
from app.services.project import create_project
from ml.aggregation.simulate import PROFILES
from ml.demo.dataset import write_demo_dataset
from tests.app.crowd import SimulatedVolunteer, Truths

SLUG = "demo"
# Targets with a pyramid of their own (the union of its children's targets has none).
HAS_PYRAMID = select(Window.id).where(Window.target_id == Target.id).exists()


def app_settings(data_dir: Path, database_url: str) -> Settings:
    """Settings of an app under test: its own data folder and database, consensus at once."""
    return Settings(
        environment="test",
        data_dir=data_dir,
        database_url=database_url,
        secret_key="test-secret-key-that-is-long-enough-for-anything",
        consensus_interval_s=0,
        # Simulated crowds answer far faster than people; the limits have tests of their own.
        rate_limit_volunteer_per_minute=0,
        rate_limit_address_per_minute=0,
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


@dataclass
class Live:
    app: FastAPI
    settings: Settings
    factory: sessionmaker[Session]
    truths: Truths

    def volunteer(self, kind: str = "diligent", seed: int = 0) -> SimulatedVolunteer:
        client = TestClient(self.app)
        rng = np.random.default_rng(seed)
        return SimulatedVolunteer(client, PROFILES[kind], rng, self.truths)

    def count(self, model: type) -> int:
        with self.factory() as session:
            return session.scalar(select(func.count()).select_from(model)) or 0


@pytest.fixture
def live(fresh_database_url: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Live]:
    """The demo project (4 scenes) on a fresh database; ``indirect`` params set its settings."""
    settings = app_settings(tmp_path / "data", fresh_database_url)
    engine = make_engine(fresh_database_url)
    upgrade_to_head(engine)
    write_demo_dataset(tmp_path / "demo", seed=3, n_images=4)
    factory = make_session_factory(engine)
    with factory() as session:
        project = create_project(session, slug=SLUG)
        project.settings = dict(getattr(request, "param", {}))
        session.commit()
        run_import(
            session, settings=settings, project_slug=SLUG, path=tmp_path / "demo", tag_file=None
        )
    app = create_app(settings)
    yield Live(app, settings, factory, Truths(settings, factory))
    app.state.engine.dispose()
    engine.dispose()
