"""``bench/soak.py``, bounded: a real server under simulated volunteers for 15 s on the run's
backend (a fresh database of its own on the run's PostgreSQL server in that pass)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parents[2] / "bench" / "soak.py"
# Three windows of 5 s after 2 s of warm-up, on a small demo project: about 30 s in all.
BOUNDED = ["--seconds", "15", "--interval", "5", "--warmup", "2", "--images", "6"]

pytestmark = pytest.mark.slow


def test_soak_has_no_errors_and_stores_every_acknowledged_vote(fresh_database_url: str) -> None:
    backend = "sqlite" if fresh_database_url.startswith("sqlite") else "postgres"
    args = ["--backend", backend, "--database-url", fresh_database_url, *BOUNDED]
    done = subprocess.run(
        [sys.executable, str(SOAK), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = f"{done.stdout}\n{done.stderr}"
    assert done.returncode == 0, output
    votes = re.search(rf"{backend}: votes acknowledged (\d+), stored (\d+) \(ok\)", output)
    assert votes is not None, output
    assert int(votes[1]) == int(votes[2]) > 0, output
    assert re.search(r"requests \d+, submissions \d+ .*, errors 0\n", output), output
    windows = re.findall(r"^ +\d+\.\d +\d+ ", output, flags=re.MULTILINE)
    assert len(windows) == 3, output
