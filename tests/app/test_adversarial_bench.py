"""``bench/adversarial.py``, bounded: two seeds on two demo images each, both arms to the end.

The IoU target is the benchmark's, over five seeds; this run checks what must hold in any run:
both campaigns end, the bad actors leave the final masks close to the honest crowd's, and every
bad actor is learned for what it is."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from tests.conftest import run_script

BENCH = Path(__file__).resolve().parents[2] / "bench" / "adversarial.py"
BOUNDED = ["--answers", "8000", "--measure-every", "500", "--seeds", "0", "1"]
# One seed on two images has about 8 evaluation targets: one object that one arm finds and the
# other loses (a different stream of tasks refines other cells) moves that seed's mean by 12
# points, the mean of two seeds by 6. Measured with one seed alone, a better search for small
# objects (which the honest crowd profits from first) moved seed 0 from -13.3 to -15.4 and seed 1
# from +8.5 to +5.1: one seed says little, so two are run, and their mean may be an object and a
# few points off. What bad actors must not move is the crowd's answers: the clear-cut cells
# they retire wrong (0/617 honest, 1/555 adversarial on seed 0 when this was written), against
# the honest crowd's, in points.
TWO_SEED_POINTS = 9.0  # the five-seed target is 2
WRONG_CELL_POINTS = 1.0

pytestmark = [pytest.mark.slow, pytest.mark.bench]


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
    # Alone on 2 cores about 7 minutes; far longer beside the other pass of .ci/run.
    done = run_script([sys.executable, str(BENCH), *BOUNDED], timeout=2400)
    output = f"{done.stdout}\n{done.stderr}"
    assert done.returncode in (0, 1), output  # 1: this seed missed the five-seed target
    ended = r"honest [\d.]+ \(out of work after \d+ answers\), adversarial [\d.]+ \(out of work"
    assert len(re.findall(ended, output)) == 2, output
    final = re.search(
        r"final masks: delta ([+-][\d.]+) ± [\d.]+ IoU points.*: (PASS|FAIL) ", output
    )
    assert final is not None, output  # not INCOMPLETE: both campaigns ended under the cap
    assert abs(float(final.group(1))) <= TWO_SEED_POINTS, output
    # The tracked figure: points taken away at the honest crowd's budget, one line for scripts.
    tracked = re.search(
        r"adversarial: seeds=0,1 budget=honest-finish .*taken_away=-?[\d.]+", output
    )
    assert tracked is not None, output
    cells = re.findall(r"retired wrong: honest (\d+)/(\d+), adversarial (\d+)/(\d+)", output)
    assert len(cells) == 2, output
    honest_wrong, honest_all, bad_wrong, bad_all = (sum(int(c[i]) for c in cells) for i in range(4))
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
