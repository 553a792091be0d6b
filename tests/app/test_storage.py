"""The two file storages, the data folder and S3-compatible object storage, under the same tests.

The object store is a real S3-protocol server on loopback (moto's, started by .ci/run or by the
``s3_endpoint`` fixture); each test gets a bucket of its own."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import boto3
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.config import Settings, SettingsError
from app.db import make_engine, make_session_factory
from app.main import create_app
from app.models import ModelVersion
from app.storage import FileStore, LocalCache, LocalStorage, S3Storage, Storage, open_storage
from ml.demo.dataset import write_demo_dataset
from tests.app.browser import tessera_env
from tests.builders import files_under


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "data")
    url = request.getfixturevalue("s3_bucket")
    return S3Storage(url, tmp_path / "cache", cache_bytes=10**6)


def test_a_key_holds_whole_bytes_and_lists_under_its_folder(storage: Storage) -> None:
    assert not storage.exists("masks/ab/cd/x.png")
    storage.write_bytes("masks/ab/cd/x.png", b"first")
    storage.write_bytes("masks/ef/01/y.png", b"second file")
    storage.write_bytes("images/00/00/z.jpg", b"an image")
    assert storage.exists("masks/ab/cd/x.png")
    assert storage.read_bytes("masks/ef/01/y.png") == b"second file"
    assert storage.local_path("images/00/00/z.jpg").read_bytes() == b"an image"

    listed = {f.key: f for f in storage.files("masks/")}
    assert set(listed) == {"masks/ab/cd/x.png", "masks/ef/01/y.png"}
    assert listed["masks/ef/01/y.png"].size == len(b"second file")
    assert abs(listed["masks/ab/cd/x.png"].mtime - time.time()) < 120

    storage.delete("masks/ab/cd/x.png")
    storage.delete("masks/ab/cd/x.png")  # gone already: not an error
    assert not storage.exists("masks/ab/cd/x.png")
    assert [f.key for f in storage.files("masks/")] == ["masks/ef/01/y.png"]


def test_a_missing_key_is_a_file_not_found(storage: Storage) -> None:
    with pytest.raises(FileNotFoundError):
        storage.local_path("images/no/ne/missing.png")
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("images/no/ne/missing.png")
    assert list(storage.files("images/")) == []


def test_a_local_file_is_uploaded_whole(storage: Storage, tmp_path: Path) -> None:
    source = tmp_path / "checkpoint.pt"
    source.write_bytes(os.urandom(3 * 1024 * 1024 + 17))  # past one read chunk
    storage.upload("models/demo/segmenter-1.pt", source)
    assert storage.read_bytes("models/demo/segmenter-1.pt") == source.read_bytes()
    with pytest.raises(FileNotFoundError):
        storage.upload("models/demo/segmenter-2.pt", tmp_path / "not-there.pt")
    assert not storage.exists("models/demo/segmenter-2.pt")
    assert [f.key for f in storage.files("models/")] == ["models/demo/segmenter-1.pt"]


def test_content_is_stored_once_under_its_hash_and_a_repeat_renews_it(storage: Storage) -> None:
    store = FileStore(storage, "images")
    data = b"\x89PNG some image bytes"
    sha = hashlib.sha256(data).hexdigest()
    key, created = store.put(data, "png")
    assert created and key == f"images/{sha[:2]}/{sha[2:4]}/{sha}.png"
    (before,) = storage.files("images/")
    time.sleep(1.1)  # S3's LastModified has whole seconds
    again, created = store.put(data, "png")
    assert (again, created) == (key, False)
    (after,) = storage.files("images/")
    assert after.mtime > before.mtime  # `doctor --repair` spares it: in use again
    assert store.path(sha, "png").read_bytes() == data


def test_object_reads_are_cached_locally(s3_bucket: str, tmp_path: Path) -> None:
    storage = S3Storage(s3_bucket, tmp_path / "cache", cache_bytes=10**6)
    storage.write_bytes("images/aa/bb/one.jpg", b"pixels")
    first = storage.local_path("images/aa/bb/one.jpg")
    assert first.is_relative_to(tmp_path / "cache") and first.read_bytes() == b"pixels"
    # Keys never change content, so the copy serves later reads without the server.
    bucket, _, prefix = s3_bucket.removeprefix("s3://").partition("/")
    boto3.client("s3").delete_object(Bucket=bucket, Key=f"{prefix}/images/aa/bb/one.jpg")
    assert storage.local_path("images/aa/bb/one.jpg").read_bytes() == b"pixels"
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "cache").rglob("*"))


def test_the_cache_keeps_the_most_recently_used_within_its_size(tmp_path: Path) -> None:
    cache = LocalCache(tmp_path / "cache", max_bytes=2500)
    paths = []
    for i in range(5):
        path = cache.path(f"images/{i}.jpg")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 1000)
        os.utime(path, (1000.0 + i, 1000.0 + i))
        if i == 1:
            os.utime(paths[0], (2000.0, 2000.0))  # the first read again: recently used
        paths.append(path)
        cache.added(path)
    kept = sorted(p.name for p in (tmp_path / "cache").rglob("*.jpg"))
    assert sum(p.stat().st_size for p in (tmp_path / "cache").rglob("*.jpg")) <= 2500
    assert "0.jpg" in kept and "4.jpg" in kept and "1.jpg" not in kept


def test_the_setting_names_the_storage(tmp_path: Path, s3_bucket: str) -> None:
    local = open_storage(Settings(data_dir=tmp_path / "a"))
    assert isinstance(local, LocalStorage) and local.root == tmp_path / "a"
    remote = open_storage(Settings(data_dir=tmp_path / "b", storage_url=s3_bucket))
    assert isinstance(remote, S3Storage) and remote.prefix == "instance/"
    assert open_storage(Settings(data_dir=tmp_path / "b", storage_url=s3_bucket)) is remote
    for bad in ("s3://", "file:///srv/x", "s3://Bad_Bucket/x", "gs://bucket"):
        with pytest.raises(SettingsError, match="TESSERA_STORAGE_URL"):
            Settings(data_dir=tmp_path / "c", storage_url=bad)


def _instance(tmp_path: Path, name: str, database_url: str, storage_url: str) -> Settings:
    return Settings(
        environment="test",
        data_dir=tmp_path / name,
        database_url=database_url,
        storage_url=storage_url,
        secret_key="test-secret-key-that-is-long-enough-for-anything",
        consensus_interval_s=0,
        fusion="inline",
        rate_limit_volunteer_per_minute=0,
        rate_limit_address_per_minute=0,
    )


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = tessera_env(settings.data_dir, settings.database_url, storage_url=settings.storage_url)
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_an_instance_imports_serves_exports_checks_and_backs_up_on_either_storage(
    backend: str,
    tmp_path: Path,
    fresh_database_url: str,
    other_database_url: str,
    request: pytest.FixtureRequest,
) -> None:
    def url() -> str:
        return request.getfixturevalue("s3_bucket") if backend == "s3" else ""

    settings = _instance(tmp_path, "data", fresh_database_url, url())
    write_demo_dataset(tmp_path / "demo", seed=3, n_images=3)
    for args in (("db", "upgrade"), ("import", str(tmp_path / "demo"), "--project", "demo")):
        done = _cli(settings, *args)
        assert done.returncode == 0, done.stderr
    storage = open_storage(settings)
    images = sorted(f.key for f in storage.files("images/"))
    assert len(images) == 3 and list(storage.files("masks/"))  # the demo's ground truth
    if backend == "s3":  # nothing of the project's files in the data folder, only the cache
        assert files_under(settings.data_dir / "images") == []
        assert files_under(settings.data_dir / "masks") == []

    # A volunteer's grid: its tiles are cut from the stored image.
    app = create_app(settings)
    with TestClient(app) as client:
        task = client.get("/api/projects/demo/tasks/next").json()["task"]
        assert task is not None
        tile = client.get(task["tiles"][0]["url"])
        assert tile.status_code == 200 and tile.content[:3] == b"\xff\xd8\xff"  # a JPEG
    app.state.engine.dispose()

    # A model job: its checkpoint goes to the storage, the row names its key; predict reads it.
    done = _cli(settings, "train", "segmenter", "--steps", "2", "--size", "64", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    (checkpoint,) = storage.files("models/")
    with make_session_factory(make_engine(fresh_database_url))() as session:
        assert session.scalars(select(ModelVersion.path)).all() == [checkpoint.key]
    if backend == "s3":
        assert files_under(settings.data_dir / "models") == []
    done = _cli(settings, "predict", "--device", "cpu")
    assert done.returncode == 0, done.stderr

    out = tmp_path / "export.zip"
    done = _cli(settings, "export", "--out", str(out), "--include-unfinished")
    assert done.returncode == 0, done.stderr
    with zipfile.ZipFile(out) as archive:
        assert sum(n.endswith(".png") for n in archive.namelist()) >= 3

    assert _cli(settings, "doctor").returncode == 0
    # Damage: an image lost, an object nobody names; doctor finds both, repairs the debris.
    lost = storage.read_bytes(images[0])
    storage.delete(images[0])
    storage.write_bytes("masks/zz/zz/orphan.png", b"no row names this")
    found = _cli(settings, "doctor")
    assert found.returncode == 1
    assert f"{images[0]} is missing" in found.stderr and "orphan.png" in found.stderr
    fixed = _cli(settings, "doctor", "--repair", "--grace", "0")
    assert fixed.returncode == 1 and "removed orphan file masks/zz/zz/orphan.png" in fixed.stdout
    assert not storage.exists("masks/zz/zz/orphan.png")
    storage.write_bytes(images[0], lost)
    assert _cli(settings, "doctor").returncode == 0

    # A backup restores into another instance on another bucket (or data folder).
    backup = tmp_path / "backup.tar"
    done = _cli(settings, "backup", str(backup))
    assert done.returncode == 0, done.stderr
    copy = _instance(tmp_path, "copy", other_database_url, url())
    assert _cli(copy, "db", "upgrade").returncode == 0
    done = _cli(copy, "restore", str(backup))
    assert done.returncode == 0, done.stderr
    restored = open_storage(copy)
    for folder in ("images/", "masks/", "models/"):
        keys = sorted(f.key for f in storage.files(folder))
        assert sorted(f.key for f in restored.files(folder)) == keys
        assert all(restored.read_bytes(k) == storage.read_bytes(k) for k in keys)
    assert _cli(copy, "doctor").returncode == 0


def test_another_node_of_a_torchrun_launch_fetches_the_files_rank_zero_names(
    s3_bucket: str, tmp_path: Path
) -> None:
    from app.jobs.train import _on_this_node
    from ml.data import SegmenterItem

    node = Settings(data_dir=tmp_path / "node-1", storage_url=s3_bucket)
    storage = open_storage(node)
    storage.write_bytes("images/aa/bb/x.jpg", b"an image")
    storage.write_bytes("masks/cc/dd/m.png", b"a mask")
    cache = node.storage_cache_dir  # where rank 0's paths point, on every node
    item = SegmenterItem(
        image=cache / "images/aa/bb/x.jpg", masks=[None, cache / "masks/cc/dd/m.png"]
    )
    assert not item.image.exists()
    assert _on_this_node(node, [item], lambda: "trained") == "trained"
    assert item.image.read_bytes() == b"an image"
    assert (cache / "masks/cc/dd/m.png").read_bytes() == b"a mask"


def test_a_jobs_files_stay_whole_whatever_the_cache_evicts(s3_bucket: str, tmp_path: Path) -> None:
    from app.services.files import held_files, key_of_local

    settings = Settings(data_dir=tmp_path / "data", storage_url=s3_bucket)
    storage = open_storage(settings)
    storage.write_bytes("images/aa/bb/x.jpg", b"an image")
    with held_files(settings):
        held = storage.local_path("images/aa/bb/x.jpg")
        assert held.is_relative_to(settings.scratch_dir)
        assert key_of_local(settings, held) == "images/aa/bb/x.jpg"
        # Another process evicts the cached copy: the job's file is still there, whole.
        storage.cache.path("images/aa/bb/x.jpg").unlink()
        assert held.read_bytes() == b"an image"
    assert not held.exists()  # the job's links go with the job
    assert storage.local_path("images/aa/bb/x.jpg").read_bytes() == b"an image"
