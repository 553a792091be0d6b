"""Fixtures of the app tests that need a whole demo project in a database of their own."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
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
from tests.conftest import Templates

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
        fusion="inline",  # each answer fused as it is taken: results at once, in order
        # Simulated crowds answer far faster than people; the limits have tests of their own.
        rate_limit_volunteer_per_minute=0,
        rate_limit_address_per_minute=0,
        rate_limit_new_volunteers_per_hour=0,
    )


@dataclass
class World:
    settings: Settings
    factory: sessionmaker[Session]


def _demo_project(
    seed: int, n_images: int, project_settings: dict[str, object] | None
) -> Callable[[str, Path], None]:
    """A builder of a template database holding the demo project, for ``Templates.copy``."""

    def build(url: str, data_dir: Path) -> None:
        engine = make_engine(url)
        upgrade_to_head(engine)
        source = data_dir.parent / "demo"
        write_demo_dataset(source, seed=seed, n_images=n_images)
        settings = app_settings(data_dir, url)
        with make_session_factory(engine)() as session:
            if project_settings is not None:
                project = create_project(session, slug=SLUG)
                project.settings = dict(project_settings)
                session.commit()
            run_import(session, settings=settings, project_slug=SLUG, path=source, tag_file=None)
        engine.dispose()

    return build


@pytest.fixture
def world(request: pytest.FixtureRequest, templates: Templates, tmp_path: Path) -> Iterator[World]:
    """A migrated database with a demo project of ``request.param`` images (10 by default),
    copied from one built once per run."""
    n_images = getattr(request, "param", 10)
    data = tmp_path / "data"
    with templates.copy(f"world-{n_images}", _demo_project(11, n_images, None), into=data) as url:
        engine = make_engine(url)
        yield World(app_settings(data, url), make_session_factory(engine))
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
def live(templates: Templates, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Live]:
    """The demo project (4 scenes) on a database of its own; ``indirect`` params set its
    settings."""
    project_settings = dict(getattr(request, "param", {}))
    key = "live-" + json.dumps(project_settings, sort_keys=True)
    data = tmp_path / "data"
    with templates.copy(key, _demo_project(3, 4, project_settings), into=data) as url:
        settings = app_settings(data, url)
        engine = make_engine(url)
        factory = make_session_factory(engine)
        app = create_app(settings)
        yield Live(app, settings, factory, Truths(settings, factory))
        app.state.engine.dispose()
        engine.dispose()
