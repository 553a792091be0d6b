"""A whole simulated campaign: mean mask IoU against human-seconds per object, with and
without the learning loop.

Usage: ``python bench/campaign.py [--quick] [--images N] [--device cpu|cuda|auto]``

A demo project is generated and imported once; each arm runs on its own copy of it:

- ``crowd``: simulated volunteers only (no model);
- ``loop-random``: the same crowd, and every ``--retrain-every`` answers a round of
  ``tessera retrain`` (segmenter priors on open cells, re-tagging) with random acquisition;
- ``loop-uncertainty``: the same with uncertainty acquisition.

Volunteers (60% diligent, 20% sloppy, 10% random clickers, 10% adversaries; ``ml.aggregation.
simulate``; ``run_arm(kinds=...)`` takes another mix, as ``bench/adversarial.py`` does) answer
real tasks through the HTTP API in-process, from the demo's ground truth; volunteer ``i`` draws
its answers from its own random stream of ``--seed``. The full EM pass runs every
``--em-every`` answers: by default as often as the served product runs it (every
``consensus_interval_s``, 300 s) at the crowd's pace of one grid per volunteer every 10.3 s.
An arm stops after ``--answers`` answers or when the crowd finds nothing more to answer (then
it is measured once more). Every
submitted grid costs 10.3 human-seconds (the measured mean time of a reCAPTCHA image grid).
Human-seconds per object = answers x 10.3 / targets imported (evaluation and control). Targets
that the loop's tagger adds later are served to the crowd (their cost counts) but are not in the
denominator nor measured (they have no ground truth).

The mask of an object at any point of the campaign is the composition of its finest cells
(gold as 0/1, every other cell its current posterior, which includes the model's prior in the loop
arms), above 0.5: an undecided cell is not claimed. IoU is measured against the ground truth of
the evaluation targets (never served as gold, never trained on); an empty truth and an empty mask
count as IoU 1. "IoU at 20 s/object" is interpolated linearly between the two measurements
around that budget; "s/object to IoU x" is the first measurement at or above x.

Targets: the full loop reaches mean IoU >= 0.85 at <= 20 human-seconds per object, and
uncertainty acquisition needs at most half the human-seconds of random for the same IoU.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.cli.serve import DEMO_SETTINGS
from app.config import Settings
from app.db import make_engine, make_session_factory
from app.jobs.retrain import RetrainOptions, run_retrain
from app.jobs.train import TrainOptions
from app.main import create_app, recompute_all
from app.migrate import upgrade_to_head
from app.models import Cell, Image, Project, Target
from app.security import VOLUNTEER_COOKIE
from app.services.campaign import load_truth
from app.services.importer import run_import
from app.services.masks.composition import compose_target
from app.services.project import create_project
from ml.aggregation.simulate import PROFILES
from ml.demo.dataset import write_demo_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the simulated crowd of the tests
from tests.app.crowd import SimulatedVolunteer, Truths

SECONDS_PER_GRID = 10.3
SLUG = "campaign"
CROWD = ["diligent"] * 6 + ["sloppy"] * 2 + ["random_clicker", "adversary"]


@dataclass(frozen=True)
class Point:
    seconds_per_object: float
    mean_iou: float
    complete: int
    answers: int


def _settings(folder: Path) -> Settings:
    return Settings(
        environment="test",
        data_dir=folder,
        database_url=f"sqlite:///{folder / 'tessera.db'}",
        secret_key="benchmark-secret-key-long-enough-for-signing",
        consensus_interval_s=0,
        rate_limit_volunteer_per_minute=0,  # simulated volunteers answer at machine speed
        rate_limit_address_per_minute=0,
    )


def build(folder: Path, images: int, seed: int) -> None:
    folder.mkdir(parents=True)
    settings = _settings(folder)
    engine = make_engine(settings.resolved_database_url)
    upgrade_to_head(engine)
    source = folder.parent / "demo-source"
    write_demo_dataset(source, seed=seed, n_images=images)
    with make_session_factory(engine)() as session:
        project = create_project(session, slug=SLUG)
        project.settings = dict(DEMO_SETTINGS)
        run_import(session, settings=settings, project_slug=SLUG, path=source, tag_file=None)
    engine.dispose()


def measure(
    settings: Settings, factory: sessionmaker[Session], truths: dict[int, np.ndarray]
) -> tuple[float, int]:
    ious, complete = [], 0
    with factory() as session:
        targets = session.scalars(
            select(Target).join(Project).where(Project.slug == SLUG, Target.control.is_(False))
        ).all()
        for target in targets:
            if target.id not in truths:
                truth = load_truth(session, settings, target)
                if truth is None:
                    continue
                truths[target.id] = truth
            image = session.get(Image, target.image_id)
            cells = list(session.scalars(select(Cell).where(Cell.target_id == target.id)))
            if image is None or not cells:
                continue
            hard = compose_target(
                session, settings=settings, target=target, image=image, cells=cells
            ).hard
            truth = truths[target.id]
            union = np.logical_or(hard, truth).sum()
            ious.append(1.0 if union == 0 else np.logical_and(hard, truth).sum() / union)
            complete += target.state == "complete"
    return float(np.mean(ious)) if ious else float("nan"), complete


def _point(
    name: str,
    answers: int,
    n_targets: int,
    settings: Settings,
    factory: sessionmaker[Session],
    masks: dict[int, np.ndarray],
    started: float,
) -> Point:
    iou, complete = measure(settings, factory, masks)
    per_object = answers * SECONDS_PER_GRID / n_targets
    print(
        f"  {name:17s} answers {answers:5d}  {per_object:6.1f} s/object  "
        f"IoU {iou:.3f}  complete {complete}  ({time.perf_counter() - started:.0f} s)",
        flush=True,
    )
    return Point(per_object, iou, complete, answers)


@dataclass(frozen=True)
class Arm:
    """One arm's measurements, and where its database stays until the work folder goes."""

    points: list[Point]
    settings: Settings
    volunteers: list[tuple[str, str]]  # (kind, public id) of each simulated volunteer


def run_arm(
    name: str,
    template: Path,
    work: Path,
    args: argparse.Namespace,
    *,
    kinds: Sequence[str] = CROWD,
) -> Arm:
    """Run one arm on its own copy of ``template``: volunteers of ``kinds`` (one each) answer
    until ``args.answers`` grids are submitted or nobody finds a task."""
    folder = work / name
    shutil.copytree(template, folder)
    settings = _settings(folder)
    engine = make_engine(settings.resolved_database_url)
    factory = make_session_factory(engine)
    loop = name.startswith("loop-")
    with factory() as session:
        project = session.scalar(select(Project).where(Project.slug == SLUG))
        assert project is not None
        if loop:
            project.settings = {**project.settings, "acquisition": name.split("-")[1]}
        n_targets = session.scalar(select(func.count()).select_from(Target)) or 1
        session.commit()
    app = create_app(settings)
    truths = Truths(settings, factory, absent_is_empty=True)
    rng = np.random.default_rng(args.seed)
    crowd = [
        # Volunteer i answers from its own stream of the seed: the same in every arm.
        SimulatedVolunteer(
            TestClient(app), PROFILES[k], np.random.default_rng((args.seed, i)), truths
        )
        for i, k in enumerate(kinds)
    ]
    options = RetrainOptions(
        segmenter=TrainOptions(epochs=args.epochs, size=args.size, batch_size=8),
        tagger=TrainOptions(epochs=max(1, args.epochs // 3), size=args.size, batch_size=8),
        device=args.device,
    )
    em_every = em_cadence(len(crowd), getattr(args, "em_every", None))
    masks: dict[int, np.ndarray] = {}
    points: list[Point] = []
    answers, idle, retrained = 0, 0, -1
    started = time.perf_counter()
    while answers < args.answers and idle < len(crowd):
        if loop and answers % args.retrain_every == 0 and retrained != answers:
            run_retrain(factory, settings, slug=SLUG, options=options)
            retrained = answers  # not again while volunteers find no task at this count
        volunteer = crowd[int(rng.integers(len(crowd)))]
        if volunteer.step(SLUG) is None:
            idle += 1
            continue
        idle, answers = 0, answers + 1
        if em_every and answers % em_every == 0:
            recompute_all(factory, settings)
        if answers % args.measure_every == 0 or answers == args.answers:
            points.append(_point(name, answers, n_targets, settings, factory, masks, started))
    if answers and (not points or points[-1].answers != answers):  # the crowd ran out of work
        points.append(_point(name, answers, n_targets, settings, factory, masks, started))
    engine.dispose()
    signer = app.state.signer
    ids = [
        (k, signer.read_volunteer_cookie(v.client.cookies.get(VOLUNTEER_COOKIE)) or "")
        for k, v in zip(kinds, crowd, strict=True)
    ]
    return Arm(points, settings, ids)


def em_cadence(volunteers: int, every: int | None) -> int:
    """Answers between two full EM passes: ``every`` if given (0: never), else the served
    product's (one pass per ``consensus_interval_s``) at this crowd's pace, every volunteer
    submitting a grid each ``SECONDS_PER_GRID``."""
    if every is not None:
        return every
    interval = float(Settings.model_fields["consensus_interval_s"].default)
    return max(1, round(interval * volunteers / SECONDS_PER_GRID))


def at_budget(points: list[Point], seconds: float) -> float:
    """Mean IoU at ``seconds`` per object, interpolated; NaN outside the measured range."""
    xs = [p.seconds_per_object for p in points]
    if not points or not xs[0] <= seconds <= xs[-1]:
        return float("nan")
    return float(np.interp(seconds, xs, [p.mean_iou for p in points]))


def to_reach(points: list[Point], iou: float) -> float | None:
    return next((p.seconds_per_object for p in points if p.mean_iou >= iou), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small project for a 2-core CPU")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--answers", type=int, default=None, help="grid answers per arm")
    parser.add_argument("--retrain-every", type=int, default=None)
    parser.add_argument("--measure-every", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None, help="segmenter epochs per round")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--em-every", type=int, default=None, help="answers between EM passes (0: never)"
    )
    parser.add_argument("--plot", type=Path, default=Path("artifacts/campaign.png"))
    args = parser.parse_args()
    q = args.quick
    args.images = args.images or (12 if q else 120)
    args.answers = args.answers or (300 if q else 6000)
    args.retrain_every = args.retrain_every or (100 if q else 1000)
    args.measure_every = args.measure_every or (50 if q else 250)
    args.epochs = args.epochs or (4 if q else 20)
    args.size = args.size or (64 if q else 256)
    print(
        f"demo images {args.images}, {args.answers} answers per arm, retrain every "
        f"{args.retrain_every}, segmenter {args.epochs} epochs at {args.size}px on {args.device}"
    )
    curves: dict[str, list[Point]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        template = work / "template"
        build(template, args.images, args.seed)
        for arm in ("crowd", "loop-random", "loop-uncertainty"):
            curves[arm] = run_arm(arm, template, work, args).points
    print("\narm                IoU at 20 s/object   s/object to IoU 0.85   final IoU")
    for arm, points in curves.items():
        reach = to_reach(points, 0.85)
        final = points[-1].mean_iou if points else float("nan")
        reach_text = f"{reach:.1f}" if reach is not None else "not reached"
        print(f"{arm:18s} {at_budget(points, 20.0):18.3f}   {reach_text:>20s}   {final:9.3f}")
    full = curves["loop-uncertainty"]
    met = at_budget(full, 20.0) >= 0.85
    print(
        f"target IoU >= 0.85 at <= 20 s/object (loop, uncertainty): {'met' if met else 'NOT met'}"
    )
    best = max((p.mean_iou for p in curves["loop-random"]), default=float("nan"))
    r_random, r_unc = to_reach(curves["loop-random"], best), to_reach(full, best)
    if r_random and r_unc:
        ratio = r_unc / r_random
        print(
            f"s/object to reach random's best IoU {best:.3f}: uncertainty/random = "
            f"{ratio:.2f}; target <= 0.5: {'met' if ratio <= 0.5 else 'NOT met'}"
        )
    else:
        print(
            f"uncertainty never reached random's best IoU {best:.3f}: "
            "target (<= half the human-seconds of random) NOT met"
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, points in curves.items():
        ax.plot([p.seconds_per_object for p in points], [p.mean_iou for p in points], label=arm)
    ax.axhline(0.85, color="grey", linestyle=":")
    ax.axvline(20, color="grey", linestyle=":")
    ax.set_xlabel("human-seconds per object")
    ax.set_ylabel("mean mask IoU (evaluation targets)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
