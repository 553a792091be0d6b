"""``bench/adversarial.py``, bounded: one seed on two demo images, both arms to the end.

The IoU target is the benchmark's, over five seeds (one seed moves by a point or two from run
to run); this run checks what must hold in any run: both campaigns end, the bad actors leave the
final masks close to the honest crowd's, and every bad actor is learned for what it is."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TEST_DATABASE_URL

BENCH = Path(__file__).resolve().parents[2] / "bench" / "adversarial.py"
BOUNDED = ["--quick", "--answers", "8000", "--measure-every", "500"]
# One seed on two images has about 8 evaluation targets: one object that one arm finds and the
# other loses (a different stream of tasks refines other cells) moves the mean by 12 points, so
# a single run's IoU only says that no more than one object went. What bad actors must not move
# is the crowd's answers: the clear-cut cells they retire wrong (0/669 honest, 1/564 adversarial
# when this was written), against the honest crowd's, in points.
ONE_SEED_POINTS = 15.0  # the five-seed target is 2
WRONG_CELL_POINTS = 1.0

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(TEST_DATABASE_URL), reason="the bench runs on SQLite files: in the SQLite pass only"
    ),
]


def _row(output: str, arm: str, kind: str) -> tuple[int, float, float, int, int]:
    """(votes, sensitivity, specificity, flagged, people) of one kind in one arm's table."""
    table = output.split(f"\n{arm} crowd:")[1].split("\n\n")[0]
    found = re.search(
        rf"^ *{kind} +(\d+) +(\d+) +[\d.]+% +([\d.]+) +([\d.]+) +(\d+)/(\d+)$",
        table,
        flags=re.MULTILINE,
    )
    assert found is not None, output
    people, votes, sens, spec, flagged, of = found.groups()
    assert people == of
    return int(votes), float(sens), float(spec), int(flagged), int(people)


def test_both_crowds_run_out_of_work_and_every_bad_actor_is_found_out() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), *BOUNDED], capture_output=True, text=True, timeout=600
    )
    output = f"{done.stdout}\n{done.stderr}"
    assert done.returncode in (0, 1), output  # 1: this seed missed the five-seed target
    assert re.search(r"honest [\d.]+ \(out of work after \d+ answers\)", output), output
    assert re.search(r"adversarial [\d.]+ \(out of work after \d+ answers\)", output), output
    final = re.search(r"final masks: delta ([+-][\d.]+) ± nan IoU points.*: (PASS|FAIL) ", output)
    assert final is not None, output  # not INCOMPLETE: both campaigns ended under the cap
    assert abs(float(final.group(1))) <= ONE_SEED_POINTS, output
    cells = re.search(r"retired wrong: honest (\d+)/(\d+), adversarial (\d+)/(\d+)", output)
    assert cells is not None, output
    honest_wrong, honest_all, bad_wrong, bad_all = (int(g) for g in cells.groups())
    assert honest_all > 100 and bad_all > 100, output
    assert 100 * (bad_wrong / bad_all - honest_wrong / honest_all) <= WRONG_CELL_POINTS, output
    for kind in ("adversary", "random_clicker"):
        votes, sens, spec, flagged, people = _row(output, "adversarial", kind)
        assert votes > 0 and flagged == people, output
        if kind == "adversary":
            assert sens < 0.4 and spec < 0.4, output
        else:
            assert abs(sens + spec - 1.0) < 0.25, output  # a coin: Youden's J near 0
    for kind in ("diligent", "sloppy"):
        _, sens, spec, flagged, _ = _row(output, "honest", kind)
        assert flagged == 0 and sens > 0.6 and spec > 0.7, output
