"""Shared fixtures: one database per test run (SQLite by default, PostgreSQL when
TESSERA_TEST_DATABASE_URL says so), migrated with Alembic, and a savepoint per test.

Against PostgreSQL only the tests that use the database run: every database fixture depends on
``database_url``, so a test without it (pure numpy, model training, the CLI on its own embedded
SQLite) would only repeat its SQLite run. They are reported as deselected; so are the ``bench``
tests in the pass that ``TESSERA_BENCH_PASS`` does not name."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import Base, make_engine
from app.migrate import upgrade_to_head

TEST_DATABASE_URL = os.environ.get("TESSERA_TEST_DATABASE_URL", "")
# Tests marked ``bench`` start a bench/ script that makes its own SQLite projects whatever the
# pass, so they run in one pass only: the one TESSERA_BENCH_PASS names ("sqlite" by default;
# .ci/run, which runs both passes side by side, gives them to the shorter PostgreSQL pass).
BENCH_PASS = os.environ.get("TESSERA_BENCH_PASS", "sqlite")
THIS_PASS = "postgres" if TEST_DATABASE_URL else "sqlite"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if BENCH_PASS not in ("sqlite", "postgres"):
        raise pytest.UsageError(
            f"TESSERA_BENCH_PASS must be sqlite or postgres, not {BENCH_PASS!r}"
        )
    benches = [i for i in items if i.get_closest_marker("bench") is not None]
    keep = [
        i
        for i in items
        if (i in benches and BENCH_PASS == THIS_PASS)
        or (
            i not in benches
            and (not TEST_DATABASE_URL or "database_url" in getattr(i, "fixturenames", ()))
        )
    ]
    others = [i for i in items if i not in keep]
    if others:
        config.hook.pytest_deselected(items=others)
        items[:] = keep


def run_script(args: list[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a script in a process group of its own, its output captured; past ``timeout`` the
    whole group is killed (a bench's worker processes too: left behind, they would hold the
    CPU for the rest of the run) and the test fails with what the script had printed."""
    with subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"{args[1]} ran past {timeout:.0f} s\n{out}\n{err}")
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _reset(engine: Engine) -> None:
    """Drop every table (ours and Alembic's) so the run starts from an empty database."""
    import app.models  # noqa: F401

    Base.metadata.drop_all(engine)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS alembic_version"))


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    if TEST_DATABASE_URL:
        return TEST_DATABASE_URL
    return f"sqlite:///{tmp_path_factory.mktemp('db') / 'test.db'}"


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    _reset(engine)
    upgrade_to_head(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    """A session whose commits land in a savepoint, rolled back after the test."""
    with engine.connect() as conn:
        outer = conn.begin()
        session = Session(bind=conn, join_transaction_mode="create_savepoint")
        try:
            yield session
        finally:
            session.close()
            outer.rollback()


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return Settings(
        environment="test",
        data_dir=tmp_path / "data",
        database_url=database_url,
        secret_key="test-secret-key-that-is-long-enough-for-anything",
        consensus_interval_s=0,
        fusion="inline",  # each answer fused as it is taken: results at once, in order
        rate_limit_volunteer_per_minute=0,
        rate_limit_address_per_minute=0,
    )


def _admin(database_url: str) -> Engine:
    return make_engine(database_url).execution_options(isolation_level="AUTOCOMMIT")


def _drop_database(admin: Engine, name: str) -> None:
    with admin.connect() as conn:
        conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = :name AND pid <> pg_backend_pid()"
            ),
            {"name": name},
        )
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))


@contextmanager
def _new_database(
    database_url: str, sqlite_path: Path, *, template: str | None = None
) -> Iterator[str]:
    """A brand-new database on the run's backend, dropped afterwards: empty, or a copy of
    ``template`` (a database URL of the same backend that nothing is connected to)."""
    import sqlite3
    import uuid

    from sqlalchemy import make_url

    if database_url.startswith("sqlite"):
        if template is not None:
            source = make_url(template).database
            assert source is not None
            src, dst = sqlite3.connect(source), sqlite3.connect(sqlite_path)
            try:
                src.backup(dst)
            finally:
                src.close()
                dst.close()
        yield f"sqlite:///{sqlite_path}"
        return
    name = f"tessera_t_{uuid.uuid4().hex[:10]}"
    admin = _admin(database_url)
    copy_of = f' TEMPLATE "{make_url(template).database}"' if template else ""
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"{copy_of}'))
    try:
        yield make_url(database_url).set(database=name).render_as_string(False)
    finally:
        _drop_database(admin, name)
        admin.dispose()


class Templates:
    """Databases (with their data folders) built once per run and copied for each test that
    asks: a test gets a project of its own without paying for its import every time."""

    def __init__(self, database_url: str, root: Path) -> None:
        self.database_url = database_url
        self.root = root
        self.built: dict[str, tuple[str, Path]] = {}
        self.dropped = ExitStack()

    def copy(
        self, key: str, build: Callable[[str, Path], None], *, into: Path
    ) -> AbstractContextManager[str]:
        """A new database copied from the template ``key`` (built by ``build(url, data_dir)``
        the first time) and its data folder copied to ``into``; the database is dropped when
        the returned context ends. ``build`` must leave no connection open."""
        if key not in self.built:
            folder = self.root / f"t{len(self.built)}"
            folder.mkdir()
            url = self.dropped.enter_context(
                _new_database(self.database_url, folder / "template.db")
            )
            build(url, folder / "data")
            self.built[key] = (url, folder / "data")
        url, data = self.built[key]
        if data.exists():
            shutil.copytree(data, into)
        return _new_database(self.database_url, into.parent / f"{into.name}.db", template=url)


@pytest.fixture(scope="session")
def templates(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Templates]:
    built = Templates(database_url, tmp_path_factory.mktemp("templates"))
    yield built
    built.dropped.close()


@pytest.fixture
def fresh_database_url(database_url: str, tmp_path: Path) -> Iterator[str]:
    """A brand-new empty database of the run's backend, for tests that commit for real."""
    with _new_database(database_url, tmp_path / "fresh.db") as url:
        yield url


@pytest.fixture
def other_database_url(database_url: str, tmp_path: Path) -> Iterator[str]:
    """A second brand-new database, e.g. to restore a backup of the first into."""
    with _new_database(database_url, tmp_path / "other.db") as url:
        yield url


# An S3-protocol server on loopback for the object-storage backend: the one .ci/run started
# (TESSERA_TEST_S3_ENDPOINT), or moto's standalone server started here for the run.
S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "tessera-test",
    "AWS_SECRET_ACCESS_KEY": "tessera-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _wait_for_http(url: str, proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"the S3 server exited ({proc.returncode})") from None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    given = os.environ.get("TESSERA_TEST_S3_ENDPOINT")
    if given:
        _wait_for_http(given, None, 30)
        yield given
        return
    import socket
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_http(url, proc, 60)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def s3_bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """A new empty bucket on the loopback S3 server, its client settings in the environment;
    returns ``s3://bucket/prefix`` for TESSERA_STORAGE_URL."""
    import uuid

    import boto3

    env = S3_CREDENTIALS | {"AWS_ENDPOINT_URL": s3_endpoint}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    bucket = f"tessera-{uuid.uuid4().hex[:16]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/instance"
