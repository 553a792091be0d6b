"""Adversarial crowds: mean mask IoU of an honest crowd against the same crowd half diluted by
bad actors, on the same project and the same number of answers.

Usage: ``python bench/adversarial.py [--quick] [--images N] [--answers N] [--seeds 0 1 2 3 4]
[--jobs 2]``

Both arms are ``bench/campaign.py``'s ``crowd`` arm (simulated volunteers answer real tasks
through the HTTP API in-process; no model), run on copies of one generated demo project per seed
(the campaign's: the project defaults, gold rate 0.15 included, with the demo's finer cells):

- ``honest``: ``--honest`` volunteers (default 20), 75% diligent and 25% sloppy: careful people
  and people who answer fast and miss slivers; nobody who means harm or ignores the picture;
- ``adversarial``: the same volunteers (the same answer streams) plus as many bad actors, 60%
  adversaries (they answer the opposite of what they see, 85% of the time) and 40% random
  clickers (a coin per tile), i.e. 30% and 20% of the crowd. Each answer goes to a volunteer
  drawn uniformly, so about half of the answers come from bad actors.

Each arm runs until nobody is served a task any more (every cell retired: the campaign is
over) or ``--answers`` grid answers, a cap that the default leaves room under. Mean IoU of the
evaluation targets is measured every ``--measure-every`` answers and at the end
(``campaign.measure``: finest cells, posterior above 0.5, against the frozen ground truth).
After each run, per kind of volunteer: votes cast, the mean learned sensitivity and
specificity (``credibility_estimates``: the posterior means the consensus weighs votes with)
and how many the volunteer review flags.

What bad actors must not do is change the masks the campaign ends with: the target compares the
final masks of both arms. Bad actors do cost answers: half of the adversarial crowd's answers
carry no information or are lies, so it needs more answers to finish, and at an equal number of
answers it lags while both are still working (the table of IoU against answers shows both; the
summary gives the answers each arm needed). The crowd-only ceiling is the grid's: finest cells
of 6-18 px, claimed when they show any of the object, give a mean IoU of about 0.6-0.8 on the
demo's small shapes. One seed's IoU varies by up to a few points from run to run (the picker's
random choices), hence several seeds.

Target: |IoU(adversarial) - IoU(honest)| <= 2 points on the final masks (mean over seeds), every
arm having run out of work; a run in which an arm hit the ``--answers`` cap is INCOMPLETE.

Also printed, for tracking (``adversarial: seeds=... taken_away=...``): the points of mean IoU
the bad actors take away at an equal budget, the answers the honest crowd needed to finish
(``--seeds 0 1 2`` for the three-seed figure).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import func, select

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from app.db import make_engine, make_session_factory
from app.models import (
    DEFAULT_PROJECT_SETTINGS,
    Cell,
    CellStatus,
    Project,
    RetireReason,
    Target,
    Volunteer,
    Vote,
)
from app.services.crowd.consensus import credibility_estimates
from app.services.crowd.opening import load_truth
from app.services.curation.volunteer_review import review_volunteers
from app.services.project import square_cells
from bench.campaign import SLUG, Arm, Point, build, run_arm
from ml.aggregation import grid

HONEST_MIX = {"diligent": 3, "sloppy": 1}  # 75% / 25%
BAD_MIX = {"adversary": 3, "random_clicker": 2}  # 30% / 20% of the diluted crowd
ARMS = ("honest", "adversarial")
TARGET_POINTS = 2.0
# A cell is clear-cut when the object fills at least this much of it or none: everyone who
# looks answers it the same (a sloppy volunteer's threshold is 0.25), so a wrong retired label
# there is the consensus's error, not a judgement call.
CLEAR_CUT = 0.25
WIDTHS = (15, 7, 8, 6, 6, 6)  # the per-kind table's columns


def kinds_of(mix: dict[str, int], n: int) -> list[str]:
    """``n`` volunteer kinds in the proportions of ``mix`` (largest remainders)."""
    total = sum(mix.values())
    exact = {k: n * w / total for k, w in mix.items()}
    counts = {k: int(v) for k, v in exact.items()}
    for k in sorted(mix, key=lambda k: counts[k] - exact[k])[: n - sum(counts.values())]:
        counts[k] += 1
    return [k for k in mix for _ in range(counts[k])]


def crowd_of(arm: str, honest: int) -> list[str]:
    """The arm's volunteer kinds; the honest volunteers come first, so that volunteer ``i``
    answers from the same random stream in both arms."""
    kinds = kinds_of(HONEST_MIX, honest)
    return kinds if arm == "honest" else kinds + kinds_of(BAD_MIX, honest)


@dataclass(frozen=True)
class Group:
    """What one kind of volunteer did in an arm and what the service learned about them."""

    kind: str
    volunteers: int
    votes: int
    sensitivity: float  # mean over the kind's volunteers
    specificity: float
    flagged: int


def wrong_cells(arm: Arm) -> tuple[int, int]:
    """(wrong, all) clear-cut cells (``CLEAR_CUT``) that votes retired on evaluation targets.

    This is what bad actors would move if they could: the crowd's answers. The final masks'
    IoU moves with them too, but also with which cells the campaign happened to refine (a
    different stream of tasks), and on a few targets one object found or lost is many points."""
    engine = make_engine(arm.settings.resolved_database_url)
    wrong = total = 0
    with make_session_factory(engine)() as session:
        for target in session.scalars(select(Target).where(Target.control.is_(False))):
            truth = load_truth(session, arm.settings, target)
            project = session.get(Project, target.project_id)
            assert project is not None
            square = square_cells(project)
            cells = [
                c
                for c in session.scalars(select(Cell).where(Cell.target_id == target.id))
                if c.status == CellStatus.RETIRED
                and c.retire_reason not in (RetireReason.GOLD, RetireReason.CURATOR)
            ]
            if truth is None or not cells:
                continue
            addresses = [grid.Cell(c.level, c.row, c.col) for c in cells]
            cover = grid.cell_coverage(truth, addresses, square=square)
            clear = (cover == 0) | (cover >= CLEAR_CUT)
            labels = np.array([bool(c.label) for c in cells])
            wrong += int((labels != (cover >= CLEAR_CUT))[clear].sum())
            total += int(clear.sum())
    engine.dispose()
    return wrong, total


def groups(arm: Arm) -> tuple[list[Group], dict[str, int]]:
    """Per kind of volunteer, and the evaluation targets by state."""
    engine = make_engine(arm.settings.resolved_database_url)
    with make_session_factory(engine)() as session:
        project = session.scalar(select(Project).where(Project.slug == SLUG))
        assert project is not None
        states = dict(
            session.execute(
                select(Target.state, func.count())
                .where(Target.project_id == project.id, Target.control.is_(False))
                .group_by(Target.state)
            ).all()
        )
        ids = dict(session.execute(select(Volunteer.public_id, Volunteer.id)).all())
        kind_of = {ids[p]: k for k, p in arm.volunteers if p in ids}
        votes = dict(
            session.execute(
                select(Vote.volunteer_id, func.count(Vote.id)).group_by(Vote.volunteer_id)
            ).all()
        )
        estimates = credibility_estimates(session, sorted(kind_of))
        flagged = {r.id for r in review_volunteers(session, project=project) if r.flags}
    engine.dispose()
    members: dict[str, list[int]] = defaultdict(list)
    for volunteer_id, kind in kind_of.items():
        members[kind].append(volunteer_id)
    kinds = [
        Group(
            kind=kind,
            volunteers=len(vs),
            votes=sum(votes.get(v, 0) for v in vs),
            sensitivity=float(np.mean([estimates[v][0] for v in vs])),
            specificity=float(np.mean([estimates[v][1] for v in vs])),
            flagged=len(set(vs) & flagged),
        )
        for kind, vs in members.items()
    ]
    return kinds, {str(state): n for state, n in states.items()}


@dataclass(frozen=True)
class Run:
    seed: int
    arm: str
    points: list[Point]
    groups: list[Group]
    states: dict[str, int]  # evaluation targets by state at the end
    seconds: float
    cells: tuple[int, int] = (0, 0)  # (wrong, all) clear-cut retired cells (``wrong_cells``)

    @property
    def answers(self) -> int:
        """Answers the arm took: all of them if it ran out of work before the cap."""
        return self.points[-1].answers

    @property
    def final_iou(self) -> float:
        return self.points[-1].mean_iou

    def iou_at(self, answers: int) -> float:
        """IoU after ``answers`` answers, or after all of them if the crowd ran out earlier."""
        done = [p for p in self.points if p.answers <= answers]
        return done[-1].mean_iou if done else float("nan")


def run_one(seed: int, arm: str, template: Path, args: argparse.Namespace) -> Run:
    arm_args = argparse.Namespace(
        answers=args.answers,
        measure_every=args.measure_every,
        seed=seed,
        epochs=1,  # run_arm's retraining options; crowd arms never retrain
        size=64,
        device="cpu",
        retrain_every=args.answers + 1,
        em_every=args.em_every,
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = run_arm(
            f"{arm}-seed{seed}", template, Path(tmp), arm_args, kinds=crowd_of(arm, args.honest)
        )
        kinds, states = groups(result)
        cells = wrong_cells(result)
        return Run(seed, arm, result.points, kinds, states, time.perf_counter() - started, cells)


def _pm(values: list[float]) -> str:
    """Mean ± sample standard deviation, in IoU points."""
    x = 100 * np.asarray(values)
    return f"{x.mean():.1f} ± {x.std(ddof=1):.1f}" if len(x) > 1 else f"{x.mean():.1f}"


def print_curves(runs: list[Run], measure_every: int) -> None:
    """Mean IoU of both arms after each number of answers (an arm that ran out of work keeps
    its final IoU)."""
    by = {(r.seed, r.arm): r for r in runs}
    seeds = sorted({r.seed for r in runs})
    last = max(r.answers for r in runs)
    print("\nmean IoU in points (mean ± std over seeds) after each number of answers")
    print(f"{'answers':>8s} {'honest':>12s} {'adversarial':>12s} {'delta':>12s}")
    for b in [*range(measure_every, last, measure_every), last]:
        h = [by[s, "honest"].iou_at(b) for s in seeds]
        a = [by[s, "adversarial"].iou_at(b) for s in seeds]
        deltas = [y - x for x, y in zip(h, a, strict=True)]
        print(f"{b:8d} {_pm(h):>12s} {_pm(a):>12s} {_pm(deltas):>12s}")


def _ended(run: Run, cap: int) -> str:
    return f"out of work after {run.answers} answers" if run.answers < cap else "hit the cap"


def print_finals(runs: list[Run], cap: int) -> tuple[list[float], bool]:
    """Each seed's final masks; returns the deltas (IoU, not points) and whether every arm ran
    out of work before the cap."""
    by = {(r.seed, r.arm): r for r in runs}
    print("\nfinal masks (the campaign over: nobody is served a task)")
    deltas, ratios = [], []
    for s in sorted({r.seed for r in runs}):
        h, a = by[s, "honest"], by[s, "adversarial"]
        deltas.append(a.final_iou - h.final_iou)
        ratios.append(a.answers / h.answers)
        print(
            f"seed {s}: honest {100 * h.final_iou:.1f} ({_ended(h, cap)}), adversarial "
            f"{100 * a.final_iou:.1f} ({_ended(a, cap)}), delta {100 * deltas[-1]:+.1f}"
        )
        print(
            f"seed {s}: clear-cut cells retired wrong: honest {h.cells[0]}/{h.cells[1]}, "
            f"adversarial {a.cells[0]}/{a.cells[1]}"
        )
    print(
        f"answers the adversarial crowd needed to finish: {np.mean(ratios):.2f}x the honest "
        f"crowd's ({min(ratios):.2f}-{max(ratios):.2f}x)"
    )
    return deltas, all(r.answers < cap for r in runs)


def print_equal_budget(runs: list[Run], measure_every: int) -> None:
    """The figure to track: how many points of mean IoU the bad actors take away at an equal
    budget. Per seed the budget is the answers the honest crowd needed to finish, rounded down
    to a measurement (``measure_every``): both arms are measured there."""
    by = {(r.seed, r.arm): r for r in runs}
    seeds = sorted({r.seed for r in runs})
    taken, budgets = [], []
    for s in seeds:
        budget = max(measure_every, by[s, "honest"].answers // measure_every * measure_every)
        honest, adversarial = by[s, "honest"].iou_at(budget), by[s, "adversarial"].iou_at(budget)
        taken.append(100 * (honest - adversarial))
        budgets.append(budget)
        print(
            f"seed {s}: at {budget} answers honest {100 * honest:.1f}, adversarial "
            f"{100 * adversarial:.1f}: {taken[-1]:+.1f} points taken away"
        )
    points = np.asarray(taken)
    error = float(points.std(ddof=1) / np.sqrt(len(points))) if len(points) > 1 else 0.0
    print(
        f"adversarial: seeds={','.join(map(str, seeds))} budget=honest-finish "
        f"answers={','.join(map(str, budgets))} taken_away={points.mean():.1f} "
        f"stderr={error:.1f} (IoU points that 30% adversaries and 20% random clickers take "
        "away at an equal number of answers)"
    )


def print_groups(runs: list[Run]) -> None:
    for arm in ARMS:
        rows: dict[str, list[Group]] = defaultdict(list)
        for r in runs:
            if r.arm == arm:
                for g in r.groups:
                    rows[g.kind].append(g)
        total = sum(g.votes for gs in rows.values() for g in gs) or 1
        states: dict[str, int] = defaultdict(int)
        for r in runs:
            if r.arm == arm:
                for state, n in r.states.items():
                    states[state] += n
        told = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
        print(f"\n{arm} crowd: evaluation targets at the end (all seeds): {told}")
        print("(sensitivity and specificity: mean of the kind's volunteers)")
        head = ("kind", "people", "votes", "share", "sens", "spec")
        print(" ".join(f"{h:>{w}s}" for h, w in zip(head, WIDTHS, strict=True)), " flagged")
        for kind, gs in rows.items():
            people = sum(g.volunteers for g in gs)
            votes = sum(g.votes for g in gs)
            print(
                f"{kind:>15s} {people:7d} {votes:8d} {votes / total:6.1%} "
                f"{np.mean([g.sensitivity for g in gs]):6.3f} "
                f"{np.mean([g.specificity for g in gs]):6.3f}  "
                f"{sum(g.flagged for g in gs)}/{people}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed")
    parser.add_argument("--images", type=int, default=None, help="demo images per seed")
    parser.add_argument("--answers", type=int, default=None, help="grid answers per arm")
    parser.add_argument("--measure-every", type=int, default=None)
    parser.add_argument("--honest", type=int, default=20, help="honest volunteers")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument(
        "--em-every", type=int, default=None, help="answers between EM passes (0: never)"
    )
    parser.add_argument("--jobs", type=int, default=2, help="arms run at once (processes)")
    args = parser.parse_args()
    q = args.quick
    args.answers = args.answers or 20000  # a cap: the campaigns end well before (seed 2: 8-14k)
    args.images = args.images or 2  # one image alone may be held out: no gold
    args.measure_every = args.measure_every or 600
    args.seeds = args.seeds or ([0] if q else [0, 1, 2, 3, 4])
    print(
        f"demo images {args.images} per seed, up to {args.answers} answers per arm, seeds "
        f"{args.seeds}, gold rate {DEFAULT_PROJECT_SETTINGS['gold_rate']} (the project default); "
        f"honest: {args.honest} volunteers, adversarial: the same plus {args.honest} bad actors"
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(args.jobs) as pool:
        templates = {s: Path(tmp) / f"seed-{s}" / "template" for s in args.seeds}
        for seed, template in templates.items():
            build(template, args.images, seed)
        futures = [
            pool.submit(run_one, seed, arm, templates[seed], args)
            for seed in args.seeds
            for arm in ARMS
        ]
        runs = [f.result() for f in futures]
    print_curves(runs, args.measure_every)
    print_groups(runs)
    deltas, finished = print_finals(runs, args.answers)
    print("\nat an equal budget (the answers the honest crowd needed to finish)")
    print_equal_budget(runs, args.measure_every)
    points = 100 * np.asarray(deltas)
    delta = float(points.mean())
    error = float(points.std(ddof=1) / np.sqrt(len(points))) if len(points) > 1 else float("nan")
    met = finished and abs(delta) <= TARGET_POINTS
    verdict = "PASS" if met else "FAIL" if finished else "INCOMPLETE (raise --answers)"
    wall = time.perf_counter() - started
    print(
        f"\nfinal masks: delta {delta:+.1f} ± {error:.1f} IoU points (adversarial - honest, mean "
        f"± standard error over {len(points)} seeds); target |delta| <= {TARGET_POINTS:.0f}: "
        f"{verdict}  ({wall:.0f} s; arms {min(r.seconds for r in runs):.0f}-"
        f"{max(r.seconds for r in runs):.0f} s each)"
    )
    sys.exit(0 if met else 1)


if __name__ == "__main__":
    main()
