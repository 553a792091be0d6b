"""``bench/similar.py``, bounded: a few demo images, a tagger trained for one epoch.

The targets are the benchmark's (120 images, seed 0 and 1); this run checks what must hold in
any run: the script runs end to end, every baseline is scored on the same queries, and it ends
with its line for scripts."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from tests.conftest import run_script

BENCH = Path(__file__).resolve().parents[2] / "bench" / "similar.py"

pytestmark = [pytest.mark.slow, pytest.mark.bench]


def test_the_similar_bench_runs_and_reports_its_line() -> None:
    done = run_script(
        [
            *(sys.executable, str(BENCH), "--images", "16", "--epochs", "1"),
            *("--steps", "60", "--holdout", "0.4", "--speed-objects", "5000"),
        ],
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    line = re.search(
        r"^similar: p@10=([\d.]+) random_p@10=([\d.]+) tagset_p@10=([\d.]+) r@10=([\d.]+) "
        r"plain_r@1=([\d.]+) ms_per_query=([\d.]+)$",
        done.stdout,
        flags=re.MULTILINE,
    )
    assert line, done.stdout
    values = [float(v) for v in line.groups()]
    assert all(0.0 <= v <= 1.0 for v in values[:5]) and values[5] > 0
    searches = re.findall(r"^(\S+(?: \S+)?)\s+(\d+)\s+[\d.]+\s+[\d.]+\s+[\d.]+$", done.stdout, re.M)
    counts = {name: int(n) for name, n in searches}
    for name in ("learned", "prototype", "plain object", "tag-set filter", "random"):
        assert counts[name] == counts["learned"] > 0, counts  # the same queries for each
