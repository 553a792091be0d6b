"""The `tessera` command in real processes, on the embedded default (SQLite in the data folder)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from tests.builders import files_under, write_image

TESSERA = [sys.executable, "-m", "app.cli"]


def _env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    env["TESSERA_DATA_DIR"] = str(data_dir)
    return env


def run(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TESSERA, *args], env=_env(data_dir), capture_output=True, text=True, timeout=120
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_import_reports_and_names_bad_files(tmp_path: Path) -> None:
    src = tmp_path / "pets"
    write_image(src / "a.png", seed=1)
    (src / "b.png").write_text("not an image")
    (src / "tags.txt").write_text("a.png cat\nb.png dog\n")
    result = run(tmp_path / "data", "import", str(src))
    assert result.returncode == 0, result.stderr
    assert "images added" in result.stdout and "1" in result.stdout
    assert "skipped b.png: not an image" in result.stderr

    listing = run(tmp_path / "data", "project", "list")
    assert "pets" in listing.stdout


def test_import_of_unknown_format_fails_with_exit_2_and_writes_nothing(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_image(src / "a.png")
    (src / "labels.yaml").write_text("a.png: [cat]")
    result = run(tmp_path / "data", "import", str(src), "--tags", str(src / "labels.yaml"))
    assert result.returncode == 2
    assert "unknown tag file format" in result.stderr and "nothing was imported" in result.stderr
    assert files_under(tmp_path / "data" / "images") == []


def test_import_of_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    result = run(tmp_path / "data", "import", str(tmp_path / "nope"))
    assert result.returncode == 2
    assert "does not exist" in result.stderr


def test_serve_upgrades_sqlite_by_itself_and_answers(tmp_path: Path) -> None:
    port = _free_port()
    proc = subprocess.Popen(
        [*TESSERA, "serve", "--port", str(port)],
        env=_env(tmp_path / "data"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    output = proc.stdout.read() if proc.stdout else "no output"
                    raise AssertionError(output) from None
                time.sleep(0.2)
        assert response.json()["database"] == "sqlite"
        assert "Tessera" in httpx.get(f"http://127.0.0.1:{port}/").text
        assert (tmp_path / "data" / "tessera.db").exists()
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_every_command_takes_the_data_folder_says_which_and_reading_creates_none(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}

    def tessera(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*TESSERA, *args], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path
        )

    missing = tmp_path / "typo"
    for command in (["project", "list"], ["doctor"], ["model", "list"], ["user", "list"]):
        result = tessera("--data-dir", str(missing), *command)
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        assert "there is no Tessera data" in result.stderr and "created nothing" in result.stderr
        assert not missing.exists()
    data = tmp_path / "here"
    made = tessera("--data-dir", str(data), "db", "upgrade")
    assert made.returncode == 0, made.stderr
    assert f"data folder {data.resolve()}" in made.stderr
    listed = tessera("--data-dir", str(data), "project", "list")
    assert listed.returncode == 0, listed.stderr
    assert not (tmp_path / "tessera-data").exists()  # nothing fell back to the default


def test_serve_refuses_a_port_that_does_not_exist(tmp_path: Path) -> None:
    for port in ("80000", "0", "-1"):
        result = run(tmp_path / "data", "serve", "--port", port)
        assert result.returncode == 2, result.stdout
        assert "Invalid value for '--port'" in result.stderr, result.stderr
    env = _env(tmp_path / "data") | {"TESSERA_PORT": "80000"}
    result = subprocess.run(
        [*TESSERA, "serve"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "port" in result.stderr.lower(), result.stderr
    assert "serving" not in result.stdout


def test_serve_in_production_without_secret_refuses(tmp_path: Path) -> None:
    env = _env(tmp_path / "data") | {"TESSERA_ENVIRONMENT": "production"}
    result = subprocess.run(
        [*TESSERA, "serve"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "TESSERA_SECRET_KEY is required" in result.stderr


def test_demo_builds_a_project_with_ground_truth_once(tmp_path: Path) -> None:
    from sqlalchemy import create_engine, text

    data = tmp_path / "data"
    first = run(data, "demo", "--no-serve", "--images", "6", "--seed", "3")
    assert first.returncode == 0, first.stderr
    assert "images added" in first.stdout

    engine = create_engine(f"sqlite:///{data / 'tessera.db'}")
    with engine.connect() as conn:
        images = conn.execute(text("SELECT count(*) FROM images")).scalar_one()
        targets = conn.execute(text("SELECT count(*) FROM targets")).scalar_one()
        truths = conn.execute(
            text("SELECT count(*) FROM mask_versions WHERE source = 'ground_truth'")
        ).scalar_one()
        parents = conn.execute(text("SELECT count(*) FROM tags WHERE parent_id IS NOT NULL"))
        aliases = conn.execute(text("SELECT count(*) FROM tag_aliases")).scalar_one()
        assert images == 6 and targets > 12 and truths == targets
        assert parents.scalar_one() >= 5 and aliases >= 3
    engine.dispose()

    again = run(data, "demo", "--no-serve", "--images", "6", "--seed", "3")
    assert again.returncode == 0 and "exists already" in again.stdout


def test_aggregate_command_writes_posteriors_and_names_bad_rows(tmp_path: Path) -> None:
    votes = tmp_path / "votes.csv"
    rows = ["worker,task,label"]
    for worker in ("w1", "w2", "w3"):
        rows += [f"{worker},t1,1", f"{worker},t2,0"]
    votes.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out.csv"
    result = run(tmp_path / "data", "aggregate", str(votes), "--out", str(out))
    assert result.returncode == 0, result.stderr
    lines = out.read_text().splitlines()
    assert lines[0].startswith("task,posterior,label")
    labels = {line.split(",")[0]: line.split(",")[2] for line in lines[1:]}
    assert labels == {"t1": "1", "t2": "0"}

    votes.write_text("worker,task,label\nw1,t1,maybe\n")
    bad = run(tmp_path / "data", "aggregate", str(votes), "--out", str(out))
    assert bad.returncode == 2 and "line 2" in bad.stderr and "maybe" in bad.stderr

    votes.write_text("\n".join(rows) + "\n")
    unknown = run(tmp_path / "data", "aggregate", str(votes), "--out", str(out), "--method", "x")
    assert unknown.returncode == 2 and "dawid_skene" in unknown.stderr


def test_aggregate_command_fuses_masks_with_the_image(tmp_path: Path) -> None:
    import cv2

    from ml.aggregation.simulate import photo_like_scene, simulate_annotators

    rng = np.random.default_rng(11)
    scene = photo_like_scene(rng)
    np.savez(tmp_path / "m.npz", masks=simulate_annotators(rng, scene, k=5).masks)
    cv2.imwrite(str(tmp_path / "photo.png"), scene.image[..., ::-1])
    cv2.imwrite(str(tmp_path / "truth.png"), scene.truth.astype(np.uint8) * 255)
    out = tmp_path / "fused.npz"
    args = ["aggregate", str(tmp_path / "m.npz"), "--out", str(out)]
    result = run(
        tmp_path / "data",
        *args,
        "--image",
        str(tmp_path / "photo.png"),
        "--truth",
        str(tmp_path / "truth.png"),
    )
    assert result.returncode == 0, result.stderr
    assert "redrawn from the image" in result.stdout and "ECE" in result.stdout
    with np.load(out) as z:
        assert z["hard"].shape == scene.truth.shape
    cv2.imwrite(str(tmp_path / "small.png"), np.zeros((10, 20, 3), np.uint8))
    bad = run(tmp_path / "data", *args, "--image", str(tmp_path / "small.png"))
    assert bad.returncode == 2 and "20x10" in bad.stderr


def test_consensus_recompute_command(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert run(data, "demo", "--no-serve", "--images", "2", "--seed", "1").returncode == 0
    result = run(data, "consensus", "recompute")
    assert result.returncode == 0, result.stderr
    assert "demo: 0 votes" in result.stdout
    missing = run(data, "consensus", "recompute", "--project", "nope")
    assert missing.returncode == 2 and "no project 'nope'" in missing.stderr


def test_model_commands_train_seed_list_export_and_refuse_bad_input(tmp_path: Path) -> None:
    src = tmp_path / "pets"
    for i in range(4):
        write_image(src / f"{i}.png", seed=i)
    (src / "tags.txt").write_text("0.png cat\n1.png dog\n2.png cat\n3.png dog cat\n")
    data = tmp_path / "data"
    assert run(data, "import", str(src)).returncode == 0

    none_yet = run(data, "seed", "--project", "pets", "--device", "cpu")
    assert none_yet.returncode == 2 and "no active tagger" in none_yet.stderr

    small = ["--project", "pets", "--epochs", "1", "--size", "64", "--device", "cpu"]
    trained = run(data, "train", "tagger", *small, "--backbone", "resnet10t")
    assert trained.returncode == 0, trained.stderr
    assert "tagger version 1" in trained.stdout and "promoted" in trained.stdout

    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not torch")
    refused = run(data, "train", "tagger", *small, "--init-weights", str(bad))
    assert refused.returncode == 2 and "--init-weights" in refused.stderr

    seeded = run(data, "seed", "--project", "pets", "--device", "cpu")
    assert seeded.returncode == 0, seeded.stderr

    listing = run(data, "model", "list", "--project", "pets")
    assert listing.returncode == 0 and "tagger" in listing.stdout

    out = tmp_path / "onnx" / "tagger.onnx"
    exported = run(data, "export-model", "tagger", "--project", "pets", "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    assert [p.name for p in out.parent.iterdir()] == ["tagger.onnx"]  # no temporary left

    no_segmenter = run(data, "predict", "--project", "pets", "--device", "cpu")
    assert no_segmenter.returncode == 2 and "segmenter" in no_segmenter.stderr


def test_project_settings_and_schedule_commands_check_their_input(tmp_path: Path) -> None:
    src = tmp_path / "pets"
    write_image(src / "a.png", seed=1)
    (src / "tags.txt").write_text("a.png cat\n")
    data = tmp_path / "data"
    assert run(data, "import", str(src)).returncode == 0

    nothing = run(data, "schedule")
    assert nothing.returncode == 2 and "no project has a retrain schedule" in nothing.stderr
    unknown = run(data, "project", "set", "pets", "colour", '"red"')
    assert unknown.returncode == 2 and "unknown setting 'colour'" in unknown.stderr
    not_json = run(data, "project", "set", "pets", "acquisition", "random")
    assert not_json.returncode == 2 and "not JSON" in not_json.stderr
    bad_plan = run(data, "project", "set", "pets", "retrain", '{"every": "soon"}')
    assert bad_plan.returncode == 2 and "not a duration" in bad_plan.stderr
    good = run(data, "project", "set", "pets", "acquisition", '"random"')
    assert good.returncode == 0 and 'acquisition = "random"' in good.stdout
    # The frame of a project's cells is fixed once it has images: its votes name cells.
    frame = run(data, "project", "set", "pets", "square_cells", "false")
    assert frame.returncode == 2 and "fixed once a project has images" in frame.stderr


def test_user_set_changes_an_account_and_ends_its_sessions(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert run(data, "db", "upgrade").returncode == 0
    added = subprocess.run(
        [*TESSERA, "user", "add", "ada", "--password-stdin"],
        env=_env(data),
        input="a long password\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert added.returncode == 0, added.stderr
    changed = run(data, "user", "set", "ada", "--role", "admin", "--disable")
    assert changed.returncode == 0 and "sessions have ended" in changed.stdout, changed.stderr
    listed = run(data, "user", "list")
    assert "admin" in listed.stdout
    for args, message in (
        (["nobody", "--logout"], "no account 'nobody'"),
        (["ada", "--role", "king"], "unknown role 'king'"),
        (["ada"], "nothing to change"),
    ):
        refused = run(data, "user", "set", *args)
        assert refused.returncode != 0 and message in refused.stderr, refused.stderr


def _serving(data: Path, port: int, **env: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [*TESSERA, "serve", "--port", str(port)],
        env=_env(data) | env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
            return proc
        except httpx.TransportError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                output = proc.stdout.read() if proc.stdout else "no output"
                raise AssertionError(output) from None
            time.sleep(0.2)


def test_a_forwarded_address_is_believed_only_from_a_trusted_proxy(tmp_path: Path) -> None:
    """The address limit counts the connection's address: a client on this machine cannot pick
    a new one per request with X-Forwarded-For (uvicorn believed 127.0.0.1 by default)."""
    limit = {"TESSERA_RATE_LIMIT_ADDRESS_PER_MINUTE": "2"}
    for trusted, expected in (("", [404, 404, 429]), ("127.0.0.1", [404, 404, 404])):
        port = _free_port()
        proc = _serving(tmp_path / "data", port, TESSERA_TRUSTED_PROXIES=trusted, **limit)
        try:
            statuses = [
                httpx.get(
                    f"http://127.0.0.1:{port}/api/projects/none/tasks/next",
                    headers={"X-Forwarded-For": f"203.0.113.{i}"},
                    timeout=10,
                ).status_code
                for i in range(3)
            ]
        finally:
            proc.terminate()
            proc.wait(timeout=20)
        assert statuses == expected, (trusted, statuses)


def test_help_imports_no_command_s_dependencies() -> None:
    # `tessera --help` took 0.9-1.2 s: every command module imported the database layer,
    # alembic, numpy and the services before typer knew which command was asked for. Each
    # command now imports what it uses when it runs (`tessera --help`: 0.15 s).
    heavy = ("sqlalchemy", "numpy", "alembic", "PIL", "app.config", "app.db", "app.services")
    probe = f"import sys, app.cli; print(' '.join(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == ""
    shown = subprocess.run(
        [sys.executable, "-m", "app.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("import", "export", "serve", "demo", "doctor", "retrain", "aggregate"):
        assert command in shown
