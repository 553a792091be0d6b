"""`tessera backup` and `tessera restore` in real processes: a restored instance has every row and
every file of the original, new rows get fresh ids, and a refused restore leaves nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy import Engine, select

from app.db import Base, make_engine, make_session_factory
from app.models import ModelKind, ModelVersion, Project, Role
from app.services.account import create_account
from app.services.doctor import referenced_files
from app.services.project import create_project
from app.storage import open_storage
from tests.app.browser import tessera_env
from tests.app.conftest import SLUG, Live
from tests.builders import files_under

TESSERA = [sys.executable, "-m", "app.cli"]


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TESSERA, *args], env=env, capture_output=True, text=True, timeout=300)


def _all_rows(engine: Engine) -> dict[str, list[dict[str, Any]]]:
    out = {}
    with engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            rows = conn.execute(select(table).order_by(*table.primary_key.columns)).mappings()
            out[table.name] = [dict(r) for r in rows]
    return out


def _work(live: Live) -> None:
    """Votes, a curator and a model checkpoint: something of every kind to back up."""
    for seed in range(3):
        volunteer = live.volunteer(seed=seed)
        for _ in range(4):
            volunteer.step(SLUG)
    checkpoint = live.settings.data_dir / "models" / SLUG / "segmenter-test.pt"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_bytes(b"a checkpoint's bytes")
    with live.factory() as session:
        create_account(session, name="cora", password="correct horse battery", role=Role.CURATOR)
        project = session.scalars(select(Project)).one()
        session.add(
            ModelVersion(
                project_id=project.id, kind=ModelKind.SEGMENTER, version=1, path=str(checkpoint)
            )
        )
        session.commit()


def test_a_backup_restores_every_row_and_file_into_a_fresh_instance(
    live: Live, tmp_path: Path, other_database_url: str
) -> None:
    _work(live)
    source = tessera_env(live.settings.data_dir, live.settings.database_url)
    backup = tmp_path / "backups" / "tessera.tar.gz"
    made = _run(source, "backup", str(backup))
    assert made.returncode == 0, made.stderr
    assert "backed up" in made.stdout and backup.is_file()
    assert [p.name for p in backup.parent.iterdir()] == ["tessera.tar.gz"]  # no temporary left

    restored_dir = tmp_path / "restored"
    target = tessera_env(restored_dir, other_database_url)
    assert _run(target, "db", "upgrade").returncode == 0
    done = _run(target, "restore", str(backup))
    assert done.returncode == 0, done.stderr

    original, copy = make_engine(live.settings.database_url), make_engine(other_database_url)
    before, after = _all_rows(original), _all_rows(copy)
    assert sum(map(len, before.values())) > 100 and before["votes"]
    for rows in (before["model_versions"], after["model_versions"]):
        for row in rows:  # the checkpoint moved with its data folder
            row["path"] = Path(row["path"]).name
    assert after == before
    with make_session_factory(original)() as a, make_session_factory(copy)() as b:
        old = referenced_files(a, live.settings)
        new_settings = live.settings.model_copy(update={"data_dir": restored_dir})
        new = referenced_files(b, new_settings)
        assert len(new) == len(old) > 0
        was, now = open_storage(live.settings), open_storage(new_settings)
        by_name = {PurePosixPath(key).name: key for key in new}
        for key in old:
            assert now.read_bytes(by_name[PurePosixPath(key).name]) == was.read_bytes(key)
        # New rows get new ids (PostgreSQL's sequences were moved past the restored ids).
        create_project(b, slug="after-restore")
        create_account(b, name="newbie", password="correct horse battery", role=Role.VOLUNTEER)
        b.commit()
    original.dispose()
    copy.dispose()
    assert _run(target, "doctor").returncode == 0

    again = _run(target, "restore", str(backup))
    assert again.returncode == 2 and "not empty" in again.stderr


def test_a_damaged_backup_restores_nothing(live: Live, tmp_path: Path) -> None:
    source = tessera_env(live.settings.data_dir, live.settings.database_url)
    backup = tmp_path / "tessera.tar"
    assert _run(source, "backup", str(backup)).returncode == 0
    damaged = tmp_path / "damaged.tar"
    data = backup.read_bytes()
    damaged.write_bytes(data[: len(data) * 2 // 3])  # the images and the manifest cut off

    fresh = tmp_path / "fresh"
    target = tessera_env(fresh, f"sqlite:///{tmp_path / 'empty.db'}")
    result = _run(target, "restore", str(damaged))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "not a readable backup" in result.stderr and "nothing was restored" in result.stderr
    engine = make_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    with engine.connect() as conn:
        assert conn.execute(select(Project)).first() is None
    engine.dispose()
    assert files_under(fresh / "images") == [] and files_under(fresh / "masks") == []

    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all")
    result = _run(target, "restore", str(junk))
    assert result.returncode == 2 and "nothing was restored" in result.stderr
    assert _run(source, "backup", str(tmp_path / "x.zip")).returncode == 2


def _rewritten(backup: Path, out: Path, change: dict[str, bytes | None]) -> Path:
    """A copy of ``backup`` with members replaced (bytes), removed (None) or added."""
    import io
    import tarfile

    with tarfile.open(backup) as src, tarfile.open(out, "w") as dst:
        for info in src.getmembers():
            if info.name in change:
                continue
            handle = src.extractfile(info) if info.isfile() else None
            dst.addfile(info, handle)
        for name, data in change.items():
            if data is not None:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                dst.addfile(info, io.BytesIO(data))
    return out


def test_a_backup_is_not_trusted_to_write_anywhere_or_say_anything(
    live: Live, tmp_path: Path
) -> None:
    """A hostile backup planted the signing key (``files/secret_key``), could name files
    outside the data folder in its rows, and malformed content ended in tracebacks."""
    import json
    import tarfile

    source = tessera_env(live.settings.data_dir, live.settings.database_url)
    backup = tmp_path / "tessera.tar"
    assert _run(source, "backup", str(backup)).returncode == 0
    with tarfile.open(backup) as tar:
        handle = tar.extractfile("tables/mask_versions.jsonl")
        assert handle is not None
        masks = handle.read().decode().splitlines()
    row = json.loads(masks[0])
    row["hard_path"] = "masks/../../evil.png"
    outside = "\n".join([json.dumps(row), *masks[1:]]).encode() + b"\n"
    cases = {
        "files/secret_key": (b"forged", "not a stored file"),
        "tables/mask_versions.jsonl": (outside, "outside masks/"),
        "tables/tags.jsonl": (b"{not json\n", "damaged or not restorable here"),
        "manifest.json": (b"[1, 2]", "damaged or not restorable here"),
    }
    fresh = tmp_path / "fresh"
    target = tessera_env(fresh, f"sqlite:///{tmp_path / 'empty.db'}")
    for member, (data, message) in cases.items():
        hostile = _rewritten(backup, tmp_path / "hostile.tar", {member: data})
        result = _run(target, "restore", str(hostile))
        assert result.returncode == 2, result.stdout + result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert "nothing was restored" in result.stderr
        assert (
            not (fresh / "secret_key").exists()
            or b"forged" not in (fresh / "secret_key").read_bytes()
        )
        assert files_under(fresh / "images") == [] and files_under(fresh / "masks") == []
