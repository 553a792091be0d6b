"""A whole simulated campaign: mean mask IoU against human-seconds per evaluation target, with
and without the learning loop, over paired seeds.

Usage: ``python bench/campaign.py [--quick] [--images N] [--seeds S ...] [--arms A ...]
[--crowd realistic|harsh] [--scenes demo|photo] [--device cpu|cuda|auto] [--workers N]
[--keep DIR]``

Per seed a demo project of ``--images`` images (384-1024 px, COCO-like object sizes) is generated
and imported once; each arm runs on its own copy of it, with the same volunteers answering from
the same random streams (paired seeds):

- ``crowd``: simulated volunteers only (no model);
- ``loop-random``: the same crowd, and a round of ``tessera retrain`` (segmenter on control truth
  and complete masks, its calibrated prior on open cells, its probability in the composition,
  re-tagging) at each of ``--retrain-at`` human-seconds per target, random acquisition;
- ``loop-uncertainty``: the same with uncertainty acquisition.

``--scenes photo`` uses photograph-like scenes instead (``write_photo_dataset``: shaded,
textured objects in clutter, one to outline per image), so that the yardstick is not the demo's
flat shapes alone.

Crowds (``ml.aggregation.simulate`` profiles): ``realistic`` is 80% diligent, 15% sloppy and 5%
random clickers (20 volunteers); ``harsh`` (the stress arm) is 60% diligent, 20% sloppy, 10%
random clickers and 10% adversaries; ``oracle`` is 20 volunteers who are never wrong and see
any part of the object: what the protocol itself (votes per square, picker, refinement rules)
allows at each budget, the ceiling a real crowd's curve sits under. They answer real tasks
through the HTTP API in-process, from the demo's ground truth. Every random generator is
seeded from the seed: numpy's per volunteer, Python's (the picker's choices) per arm; SQLite's
``random()`` (which known window a volunteer is shown) cannot be seeded, so a seed's numbers
still move a little between runs.
The full EM pass runs as often as the served product runs it (every ``consensus_interval_s``)
at the crowd's pace of one grid per volunteer every 10.3 s.

Cost: every submitted grid is 10.3 human-seconds (the measured mean time of a reCAPTCHA image
grid), whatever it asked: window or mosaic, evaluation, control or tagger-added target. Human-
seconds per target = all answers x 10.3 / evaluation targets (the targets with frozen ground
truth, never served as gold nor trained on: only they are measured). An arm stops once it has
spent the largest budget, or when the crowd finds nothing more to answer (its masks no longer
change, so larger budgets read its final IoU).

The mask of a target is the product's composition (``app.services.masks.composition``: the
finest cells per pixel, the image deciding inside border cells, the model's probability where
there is one); an empty truth and an empty mask count as IoU 1. ``ceiling`` is the same
composition fed perfect answers on every window the refinement rules open (``bench/ceiling.py``).
Intervals are 95% t-intervals over seeds. Composing the measured masks (GrabCut) is most of an
arm's cost: ``--workers`` processes compose them from the answers as they stood at each
measurement while the crowd goes on (``bench.composer``), and the curve is measured at
``MEASURE_AT`` only.

Each arm ends with one line for scripts:
``campaign: arm=... seeds=... iou@10=... iou@20=... iou@40=... iou@80=... iou@160=... ceiling=...``

Targets (issue 16): loop-uncertainty >= 0.85 at <= 40 s; crowd >= 0.75 at <= 80 s; uncertainty
reaches random's IoU at 40 s in <= 0.7x the human-seconds; ceiling >= 0.95.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import random
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image as PILImage
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the simulated crowd of the tests
from app.cli.serve import DEMO_SETTINGS
from app.config import Settings
from app.db import as_utc, make_engine, make_session_factory
from app.jobs.retrain import RetrainOptions, run_retrain
from app.jobs.train import TrainOptions
from app.main import create_app, recompute_all
from app.migrate import upgrade_to_head
from app.models import (
    DEFAULT_PROJECT_SETTINGS,
    Cell,
    Consensus,
    Gold,
    Image,
    ImageTag,
    ImageTagSource,
    MaskSource,
    MaskVersion,
    Project,
    Target,
    Task,
    TaskKind,
    TaskState,
    TaskTile,
    Window,
)
from app.security import VOLUNTEER_COOKIE
from app.services.crowd.opening import load_truth, refinement_config
from app.services.image import image_path
from app.services.importer import run_import
from app.services.masks.composition import MaskInputs, mask_inputs
from app.services.project import create_project, square_cells
from app.services.target import child_targets, is_union
from bench.ceiling import perfect_levels
from bench.composer import Composer, Hard, composer, default_workers
from ml.aggregation.simulate import PROFILES
from ml.aggregation.simulate.masks import photo_like_scene
from ml.demo.dataset import encode_mask, write_demo_dataset
from tests.app.crowd import SimulatedVolunteer, Truths

SECONDS_PER_GRID = 10.3
SLUG = "campaign"
REALISTIC = ["diligent"] * 16 + ["sloppy"] * 3 + ["random_clicker"]
HARSH = ["diligent"] * 6 + ["sloppy"] * 2 + ["random_clicker", "adversary"]
ORACLE = ["oracle"] * 20  # never wrong: the ceiling of the protocol (votes, picker, rules)
# People's boundary errors: no sharp threshold for what they see, and "yes" to empty tiles
# beside the object (``ml.aggregation.simulate`` profiles ``careful`` and ``hasty``).
HUMAN = ["careful"] * 14 + ["hasty"] * 5 + ["random_clicker"]
CROWDS = {"realistic": REALISTIC, "harsh": HARSH, "oracle": ORACLE, "human": HUMAN}
CROWD = HARSH  # bench/adversarial.py builds its own mixes; this is run_arm's default
BUDGETS = (10.0, 20.0, 40.0, 80.0, 160.0)  # human-seconds per evaluation target
# Where the curve is measured: the budgets, and between them where ``to_reach`` interpolates
# (each measurement recomposes every target whose answers changed: most of an arm's time).
MEASURE_AT = (0.0, 5.0, 10.0, 20.0, 30.0, 40.0, 60.0, 80.0, 120.0, 160.0)
ARMS = ("crowd", "loop-random", "loop-uncertainty")
QUALITY_SAMPLE = 8  # evaluation targets a loop round's own quality reading composes
# Of the images without control truth, the share whose truth the product holds: its frozen
# evaluation set (``hide_truth``). The rest is the benchmark's alone.
FROZEN_SHARE = 0.3
HIDDEN_TRUTH = "hidden-truth.npz"  # in an arm's folder: the truth the product does not hold


# Where grids go (``Measurer.spent``).
SPENT = ("evaluation", "control", "tagger", "other", "known")

# COCO's object sizes, in pixels of area: small < 32^2 <= medium < 96^2 <= large.
SIZES = (("small", 32**2), ("medium", 96**2), ("large", math.inf))


def size_class(truth: np.ndarray) -> str:
    """COCO's size of a target's object (``SIZES``), or ``absent`` for an empty truth (a tag
    the image does not have)."""
    area = int(truth.sum())
    if area == 0:
        return "absent"
    return next(name for name, below in SIZES if area < below)


@dataclass(frozen=True)
class SizeShare:
    """What the evaluation targets of one size class got: their mean IoU, and the grids
    answered on their first windows (the whole image) and on finer ones."""

    targets: int
    mean_iou: float
    first: int
    finer: int


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
        fusion="inline",  # each answer fused as it is taken: results at once, in order
        rate_limit_volunteer_per_minute=0,  # simulated volunteers answer at machine speed
        rate_limit_address_per_minute=0,
        rate_limit_new_volunteers_per_hour=0,
    )


def project_setting(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` (the value as JSON, else as text) for one of the project's settings."""
    key, sep, value = text.partition("=")
    if not sep or key not in DEFAULT_PROJECT_SETTINGS:
        known = ", ".join(sorted(DEFAULT_PROJECT_SETTINGS))
        raise argparse.ArgumentTypeError(f"{text!r}: want KEY=VALUE with KEY one of {known}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


PHOTO_TAG = "thing"  # the one tag of ``--scenes photo``: each scene's object to outline


def write_photo_dataset(out_dir: Path, *, seed: int, n_images: int) -> None:
    """Photograph-like scenes (``ml.aggregation.simulate.masks.photo_like_scene``: shaded,
    textured objects in clutter, a lighting gradient, blur and noise, 480x640) as a folder the
    importer reads, like the demo's (``ml.demo.dataset``): one tag per image, its object's mask
    as the COCO truth. The other objects of a scene are clutter nobody asks about."""
    (out_dir / "images").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    images, annotations, lines = [], [], []
    for image_id in range(1, n_images + 1):
        scene = photo_like_scene(rng)
        name = f"photo_{image_id:04d}.png"
        PILImage.fromarray(scene.image).save(out_dir / "images" / name, compress_level=1)
        h, w = scene.truth.shape
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        annotations.append(
            {
                "id": image_id,
                "image_id": image_id,
                "category_id": 1,
                **encode_mask(scene.truth),
                "iscrowd": 1,
            }
        )
        lines.append(f"{name} {PHOTO_TAG}")
    (out_dir / "tags.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    vocabulary = {
        "tags": [
            {
                "name": PHOTO_TAG,
                "display_name": "Thing",
                "category": "general",
                "parent": None,
                "aliases": [],
                "description": "the object to outline",
                "exhaustive": True,
            }
        ]
    }
    (out_dir / "vocabulary.json").write_text(json.dumps(vocabulary), encoding="utf-8")
    coco = {
        "images": images,
        "categories": [{"id": 1, "name": PHOTO_TAG, "supercategory": PHOTO_TAG}],
        "annotations": annotations,
    }
    (out_dir / "annotations.json").write_text(json.dumps(coco), encoding="utf-8")


def build(
    folder: Path,
    images: int,
    seed: int,
    overrides: dict[str, object] | None = None,
    *,
    scenes: str = "demo",
) -> None:
    folder.mkdir(parents=True)
    settings = _settings(folder)
    engine = make_engine(settings.resolved_database_url)
    upgrade_to_head(engine)
    source = folder.parent / "demo-source"
    if scenes == "photo":
        write_photo_dataset(source, seed=seed, n_images=images)
    else:
        write_demo_dataset(source, seed=seed, n_images=images)
    with make_session_factory(engine)() as session:
        project = create_project(session, slug=SLUG)
        project.settings = {**project.settings, **DEMO_SETTINGS, **(overrides or {})}
        run_import(session, settings=settings, project_slug=SLUG, path=source, tag_file=None)
    engine.dispose()


def frozen_images(image_ids: Sequence[int], share: float) -> set[int]:
    """``share`` of ``image_ids`` (at least one while there are any), chosen by a hash of the
    id, well spread and the same in every arm and run."""
    ranked = sorted(image_ids, key=lambda i: ((i * 2246822519) % 2**32, i))
    return set(ranked[: max(1, round(share * len(ranked)))] if ranked else [])


def hide_truth(folder: Path, share: float) -> int:
    """Leave the project the ground truth a real one holds: its control images' and a frozen
    evaluation set's (``share`` of the other images, ``frozen_images``). The truth of every
    other target moves into the benchmark's own file (``HIDDEN_TRUTH``), which the simulated
    volunteers answer from and the measurement scores against. With every measured image
    frozen, the loop's segmenter could only ever learn from the control images (7 of 24: an
    image with frozen truth is never trained on), whatever the crowd did on the others.
    Returns how many targets' truth moved."""
    settings = _settings(folder)
    engine = make_engine(settings.resolved_database_url)
    hidden: dict[int, np.ndarray] = {}
    factory = make_session_factory(engine)
    with factory() as session:
        targets = Measurer(settings, factory).evaluation_targets(session)
        frozen = frozen_images(sorted({t.image_id for t in targets}), share)
        for target in targets:
            truth = None if target.image_id in frozen else load_truth(session, settings, target)
            if truth is None:
                continue
            hidden[target.id] = truth
            session.execute(
                delete(MaskVersion).where(
                    MaskVersion.target_id == target.id,
                    MaskVersion.source == MaskSource.GROUND_TRUTH,
                )
            )
            cells = select(Cell.id).where(Cell.target_id == target.id)
            session.execute(delete(Gold).where(Gold.cell_id.in_(cells)))
        session.commit()
    engine.dispose()
    # Positional arrays: the target ids first, then each one's truth in that order.
    ids = np.asarray(sorted(hidden), dtype=np.int64)
    np.savez_compressed(folder / HIDDEN_TRUTH, ids, *(hidden[int(i)] for i in ids))
    return len(hidden)


def hidden_truth(folder: Path) -> dict[int, np.ndarray]:
    """The truth ``hide_truth`` took out of the project in ``folder``, by target id."""
    path = folder / HIDDEN_TRUTH
    if not path.exists():
        return {}
    with np.load(path) as held:
        arrays = [held[f"arr_{k}"] for k in range(len(held.files))]
    return {int(i): truth for i, truth in zip(arrays[0], arrays[1:], strict=True)}


@dataclass
class Measurement:
    """One measurement's masks (being composed or composed) and their truths."""

    masks: list[tuple[Hard, np.ndarray]]
    complete: int

    def ready(self) -> bool:
        return all(hard.ready() for hard, _ in self.masks)

    def result(self) -> tuple[float, int]:
        """Mean IoU (waiting for the masks) and the targets complete when it was taken."""
        ious = [iou(hard(), truth) for hard, truth in self.masks]
        return float(np.mean(ious)) if ious else float("nan"), self.complete


class Measurer:
    """Mean IoU of the evaluation targets' composed masks against their frozen truth.

    A target's mask is recomposed only when its cells, posteriors or model prediction changed
    since the last measurement (most do not between two measurements), by ``composer``'s
    processes where it has some (``bench.composer``): the inputs are read when the measurement
    is taken.
    """

    def __init__(
        self, settings: Settings, factory: sessionmaker[Session], composer: Composer | None = None
    ) -> None:
        self.settings, self.factory = settings, factory
        self.composer = composer or Composer()
        self.truths: dict[int, np.ndarray] = {}
        self.masks: dict[int, tuple[tuple[object, ...], Hard]] = {}

    def evaluation_targets(self, session: Session) -> list[Target]:
        return list(
            session.scalars(
                select(Target)
                .join(Project)
                .where(Project.slug == SLUG, Target.control.is_(False))
                .order_by(Target.id)
            )
        )

    def _truth(self, session: Session, target: Target) -> np.ndarray | None:
        if target.id not in self.truths:
            truth = load_truth(session, self.settings, target)
            if truth is None:
                return None
            self.truths[target.id] = truth
        return self.truths[target.id]

    def _state(self, session: Session, target: Target, cells: list[Cell]) -> tuple[object, ...]:
        """What the target's composed mask depends on (a target with cells of its own)."""
        posteriors = dict(
            session.execute(
                select(Consensus.cell_id, Consensus.posterior).where(
                    Consensus.cell_id.in_([c.id for c in cells])
                )
            ).all()
        )
        model = session.scalar(
            select(MaskVersion.id)
            .where(MaskVersion.target_id == target.id, MaskVersion.source == MaskSource.MODEL)
            .order_by(MaskVersion.version.desc())
            .limit(1)
        )
        cells_state = tuple((c.id, c.label, c.retire_reason, posteriors.get(c.id)) for c in cells)
        return (model, cells_state)

    @staticmethod
    def _cells(session: Session, target: Target) -> list[Cell]:
        return list(session.scalars(select(Cell).where(Cell.target_id == target.id)))

    def _hard(self, session: Session, target: Target) -> Hard:
        """The target's composed hard mask, composed again only when its state changed; a
        union's is the union of its children's (composing a union composes every child, and
        a campaign measures the children too)."""
        image = session.get(Image, target.image_id)
        assert image is not None
        if is_union(session, target=target):
            parts = [self._hard(session, c) for c in child_targets(session, target=target)]
            return Hard.union(parts, (image.height, image.width))
        cells = self._cells(session, target)
        state = self._state(session, target, cells)
        if target.id not in self.masks or self.masks[target.id][0] != state:
            inputs = mask_inputs(session, settings=self.settings, target=target, cells=cells)
            path = image_path(self.settings, image)
            self.masks[target.id] = (state, self.composer.submit(target.id, path, inputs))
        return self.masks[target.id][1]

    def measure(self) -> Measurement:
        """The masks as the answers stand now (``Measurement.result`` waits for them)."""
        masks, complete = [], 0
        with self.factory() as session:
            for target in self.evaluation_targets(session):
                truth = self._truth(session, target)
                if truth is None:
                    continue  # added by the tagger: no ground truth to measure against
                masks.append((self._hard(session, target), truth))
                complete += target.state == "complete"
        return Measurement(masks, complete)

    def by_size(self) -> dict[str, SizeShare]:
        """Where the answers went and what they bought, per object size (``size_class``):
        a benchmark's mean hides which objects the budget does not reach."""
        ious: dict[str, list[float]] = defaultdict(list)
        grids: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # first windows, finer ones
        with self.factory() as session:
            levels: dict[int, list[int]] = defaultdict(list)
            for target_id, level in session.execute(
                select(Window.target_id, Window.level)
                .join(Task, Task.window_id == Window.id)
                .where(Task.state == TaskState.SUBMITTED, Window.known.is_(False))
            ):
                levels[target_id].append(level)
            for target in self.evaluation_targets(session):
                truth = self._truth(session, target)
                if truth is None:
                    continue
                name = size_class(truth)
                ious[name].append(iou(self._hard(session, target)(), truth))
                grids[name][0] += sum(level == 0 for level in levels[target.id])
                grids[name][1] += sum(level > 0 for level in levels[target.id])
        return {
            name: SizeShare(len(v), float(np.mean(v)), grids[name][0], grids[name][1])
            for name, v in ious.items()
        }

    def spent(self) -> dict[str, int]:
        """Where the submitted grids went (``SPENT``): evaluation targets, control targets,
        targets of tags only the tagger gave (in the demo every such tag is wrong: people gave
        every tag an image has), other targets, and known tasks (all-gold windows, mosaics).
        Every grid counts in the budget, so a share that is not ``evaluation`` is overhead."""
        with self.factory() as session:
            evaluation = {t.id for t in self.evaluation_targets(session)}
            sources: dict[tuple[int, int], set[ImageTagSource]] = defaultdict(set)
            for image_id, tag_id, source in session.execute(
                select(ImageTag.image_id, ImageTag.tag_id, ImageTag.source)
            ):
                sources[image_id, tag_id].add(source)
            spent = dict.fromkeys(SPENT, 0)
            for known, target_id, control, image_id, tag_id in session.execute(
                select(Window.known, Target.id, Target.control, Target.image_id, Target.tag_id)
                .select_from(Task)
                .outerjoin(Window, Window.id == Task.window_id)
                .outerjoin(Target, Target.id == Window.target_id)
                .where(Task.state == TaskState.SUBMITTED)
            ):
                if known or target_id is None:
                    spent["known"] += 1
                elif sources[image_id, tag_id] == {ImageTagSource.CLASSIFIER}:
                    spent["tagger"] += 1  # a loop's re-tagging opens them: not measured
                elif target_id in evaluation:
                    spent["evaluation"] += 1
                elif control:
                    spent["control"] += 1
                else:
                    spent["other"] += 1
        return spent

    def settled_tiles(self) -> tuple[int, int]:
        """(tiles already settled when shown, tiles shown) over the submitted window tasks of
        unknown windows: a window is served until its last square settles, and each grid of it
        asks again about the squares that already have. A cell opened again since counts as
        it is now."""
        with self.factory() as session:
            rows = session.execute(
                select(Task.issued_at, Cell.retired_at)
                .join(TaskTile, TaskTile.task_id == Task.id)
                .join(Cell, Cell.id == TaskTile.cell_id)
                .join(Window, Window.id == Task.window_id)
                .where(
                    Task.state == TaskState.SUBMITTED,
                    Task.kind == TaskKind.WINDOW,
                    Window.known.is_(False),
                )
            ).all()
        settled = sum(1 for issued, retired in rows if retired and as_utc(retired) < as_utc(issued))
        return settled, len(rows)

    def ceiling(self) -> Callable[[], float]:
        """Mean IoU of the composition fed perfect answers on every window the rules open
        (being composed: call the result for the number)."""
        masks: list[tuple[Hard, np.ndarray]] = []
        with self.factory() as session:
            project = session.scalar(select(Project).where(Project.slug == SLUG))
            assert project is not None
            config = refinement_config(project)
            method = str(project.setting("composition"))
            for target in self.evaluation_targets(session):
                truth = self._truth(session, target)
                image = session.get(Image, target.image_id)
                if truth is None or image is None:
                    continue
                _, answered = perfect_levels(truth, config)[-1]
                cells, labels = [c for c, _ in answered], [float(y) for _, y in answered]
                inputs = MaskInputs(cells, labels, None, method, config.square)
                path = image_path(self.settings, image)
                masks.append((self.composer.submit(target.id, path, inputs), truth))
        return lambda: Measurement(masks, 0).result()[0]


def iou(mask: np.ndarray, truth: np.ndarray) -> float:
    union = np.logical_or(mask, truth).sum()
    return 1.0 if union == 0 else float(np.logical_and(mask, truth).sum() / union)


@dataclass(frozen=True)
class Arm:
    """One arm's measurements, and where its database stays until the work folder goes."""

    points: list[Point]
    settings: Settings
    volunteers: list[tuple[str, str]]  # (kind, public id) of each simulated volunteer
    ceiling: float = float("nan")
    ran_out: bool = False  # the crowd found nothing more to answer before the cap
    sizes: dict[str, SizeShare] = field(default_factory=dict)  # at the end, by object size
    spent: dict[str, int] = field(default_factory=dict)  # grids, by where they went
    settled: tuple[int, int] = (0, 0)  # window tiles shown already settled, of all shown

    def at(self, seconds: float) -> float:
        return at_budget(self.points, seconds, ran_out=self.ran_out)


def answers_for(seconds: float, n_eval: int) -> int:
    """Answers that make ``seconds`` human-seconds per evaluation target."""
    return math.ceil(seconds * n_eval / SECONDS_PER_GRID)


def run_arm(
    name: str,
    template: Path,
    work: Path,
    args: argparse.Namespace,
    *,
    kinds: Sequence[str] = CROWD,
) -> Arm:
    """Run one arm on its own copy of ``template``: volunteers of ``kinds`` (one each) answer
    until ``args.answers`` grids are submitted (or the largest of ``args.budgets`` is spent)
    or nobody finds a task. Measured every ``args.measure_every`` answers, or at each of
    ``args.measure_at`` human-seconds per target, the masks composed by ``args.workers``
    processes (0: in this one) while the crowd goes on; ``args.retrain_at`` (human-seconds per
    target) says when a loop arm retrains (else every ``args.retrain_every`` answers)."""
    workers = getattr(args, "workers", None)
    with composer(default_workers() if workers is None else workers) as masks:
        return _run_arm(name, template, work, args, kinds, masks)


def _run_arm(
    name: str,
    template: Path,
    work: Path,
    args: argparse.Namespace,
    kinds: Sequence[str],
    masks: Composer,
) -> Arm:
    folder = work / name
    shutil.copytree(template, folder)
    settings = _settings(folder)
    engine = make_engine(settings.resolved_database_url)
    factory = make_session_factory(engine)
    loop = name.startswith("loop-")
    measurer = Measurer(settings, factory, masks)
    hidden = hidden_truth(folder)
    measurer.truths.update(hidden)
    with factory() as session:
        project = session.scalar(select(Project).where(Project.slug == SLUG))
        assert project is not None
        square = square_cells(project)
        if loop:
            project.settings = {**project.settings, "acquisition": name.split("-")[1]}
        n_eval = len(measurer.evaluation_targets(session)) or 1
        session.commit()
    ceiling = measurer.ceiling() if getattr(args, "ceiling", False) else lambda: float("nan")
    measure_at = getattr(args, "measure_at", None)
    checkpoints = {answers_for(s, n_eval) for s in measure_at} if measure_at is not None else set()
    cap = args.answers
    if getattr(args, "budgets", None):
        cap = answers_for(max(args.budgets), n_eval)
    retrain_at = {answers_for(s, n_eval) for s in getattr(args, "retrain_at", None) or []}
    app = create_app(settings)
    truths = Truths(settings, factory, absent_is_empty=True)
    truths.masks.update(hidden)
    truths.square.update(dict.fromkeys(hidden, square))
    rng = np.random.default_rng(args.seed)
    random.seed(f"{args.seed}-{name.split('-seed')[0]}")  # the picker's choices, per arm
    crowd = [
        # Volunteer i answers from its own stream of the seed: the same in every arm.
        SimulatedVolunteer(
            TestClient(app), PROFILES[k], np.random.default_rng((args.seed, i)), truths
        )
        for i, k in enumerate(kinds)
    ]
    options = RetrainOptions(
        segmenter=TrainOptions(steps=getattr(args, "steps", 200), size=args.size, batch_size=8),
        tagger=TrainOptions(steps=max(1, getattr(args, "steps", 200) // 4), batch_size=8),
        device=args.device,
        # The round's own mask-quality reading composes up to 300 targets one by one (141 s of
        # a 460 s demo round); the campaign measures every target itself, so a sample will do.
        quality_targets=QUALITY_SAMPLE,
    )
    em_every = em_cadence(len(crowd), getattr(args, "em_every", None))
    points: list[Point] = []
    pending: list[tuple[int, float, Measurement]] = []  # answers, seconds taken, masks
    measured_at: list[int] = []
    answers, idle, retrained = 0, 0, -1
    started = time.perf_counter()

    def drain(*, wait: bool) -> None:
        """Report the measurements whose masks are composed, in order (all of them: ``wait``)."""
        while pending and (wait or pending[0][2].ready() or len(pending) > 2):
            at, taken, measured = pending.pop(0)
            mean_iou, complete = measured.result()
            per_target = at * SECONDS_PER_GRID / n_eval
            print(
                f"  {name:24s} answers {at:5d}  {per_target:6.1f} s/target  "
                f"IoU {mean_iou:.3f}  complete {complete}  (taken at {taken:.0f} s, "
                f"measured by {time.perf_counter() - started:.0f} s)",
                flush=True,
            )
            points.append(Point(per_target, mean_iou, complete, at))

    def point() -> None:
        pending.append((answers, time.perf_counter() - started, measurer.measure()))
        measured_at.append(answers)
        drain(wait=False)

    def due(every: int, at: set[int]) -> bool:
        return answers in at if at else bool(every) and answers % every == 0

    while answers < cap and idle < len(crowd):
        if loop and retrained != answers and due(getattr(args, "retrain_every", 0), retrain_at):
            # Training takes every core: the measurements composing beside it slowed it 6x.
            drain(wait=True)
            ceiling()
            run_retrain(factory, settings, slug=SLUG, options=options)
            retrained = answers  # not again while volunteers find no task at this count
        if answers == 0 and not measured_at:
            point()
        volunteer = crowd[int(rng.integers(len(crowd)))]
        if volunteer.step(SLUG) is None:
            idle += 1
            continue
        idle, answers = 0, answers + 1
        if em_every and answers % em_every == 0:
            recompute_all(factory, settings)
        if due(getattr(args, "measure_every", 0), checkpoints) or answers == cap:
            point()
    ran_out = answers < cap
    if answers and measured_at[-1] != answers:  # the crowd ran out of work
        point()
    drain(wait=True)
    sizes, spent, settled = measurer.by_size(), measurer.spent(), measurer.settled_tiles()
    print(f"  {name:24s} {size_line(sizes)}", flush=True)
    print(f"  {name:24s} {spent_line(spent)}; {settled_line(settled)}", flush=True)
    engine.dispose()
    signer = app.state.signer
    ids = [
        (k, signer.read_volunteer_cookie(v.client.cookies.get(VOLUNTEER_COOKIE)) or "")
        for k, v in zip(kinds, crowd, strict=True)
    ]
    return Arm(points, settings, ids, ceiling(), ran_out, sizes, spent, settled)


def em_cadence(volunteers: int, every: int | None) -> int:
    """Answers between two full EM passes: ``every`` if given (0: never), else the served
    product's (one pass per ``consensus_interval_s``) at this crowd's pace, every volunteer
    submitting a grid each ``SECONDS_PER_GRID``."""
    if every is not None:
        return every
    interval = float(Settings.model_fields["consensus_interval_s"].default)
    return max(1, round(interval * volunteers / SECONDS_PER_GRID))


def at_budget(points: list[Point], seconds: float, *, ran_out: bool = False) -> float:
    """Mean IoU at ``seconds`` per target, interpolated; past the last point the final IoU if
    the crowd ran out of work (the masks no longer change), else NaN (not measured)."""
    xs = [p.seconds_per_object for p in points]
    if not points or seconds < xs[0] or (seconds > xs[-1] and not ran_out):
        return float("nan")
    return float(np.interp(seconds, xs, [p.mean_iou for p in points]))


def to_reach(points: list[Point], target_iou: float) -> float | None:
    """Human-seconds per target at which the curve first reaches ``target_iou`` (interpolated
    between the two points around it), or None."""
    for a, b in itertools.pairwise(points):
        if b.mean_iou >= target_iou:
            if a.mean_iou >= target_iou:
                return a.seconds_per_object
            t = (target_iou - a.mean_iou) / (b.mean_iou - a.mean_iou)
            return a.seconds_per_object + t * (b.seconds_per_object - a.seconds_per_object)
    return None


def interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% t-interval (0 for one value; NaNs dropped)."""
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    if v.size == 1:
        return float(v[0]), 0.0
    t95 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57}.get(int(v.size), 2.45)
    return float(v.mean()), float(t95 * v.std(ddof=1) / math.sqrt(v.size))


def size_line(sizes: dict[str, SizeShare]) -> str:
    """One line: per object size, the targets, their mean IoU and the grids each got (first
    windows + finer ones)."""
    order = [name for name, _ in SIZES] + ["absent"]
    return " | ".join(
        f"{name} n={s.targets} IoU {s.mean_iou:.3f} grids {s.first / s.targets:.1f}"
        f"+{s.finer / s.targets:.1f}"
        for name in order
        if (s := sizes.get(name)) is not None
    )


def spent_line(spent: dict[str, int]) -> str:
    """One line: the share of the submitted grids that went where (``Measurer.spent``)."""
    total = sum(spent.values()) or 1
    return "grids to " + ", ".join(
        f"{name} {100 * spent.get(name, 0) / total:.0f}%" for name in SPENT
    )


def settled_line(settled: tuple[int, int]) -> str:
    """How much of what window grids asked was settled already (``Measurer.settled_tiles``)."""
    return f"window tiles already settled when shown {100 * settled[0] / max(settled[1], 1):.0f}%"


def summary_line(arm: str, seeds: Sequence[int], runs: Sequence[Arm]) -> str:
    parts = [f"campaign: arm={arm} seeds={','.join(str(s) for s in seeds)}"]
    for budget in BUDGETS:
        mean, _ = interval([r.at(budget) for r in runs])
        parts.append(f"iou@{budget:g}={mean:.3f}")
    parts.append(f"ceiling={interval([r.ceiling for r in runs])[0]:.3f}")
    return " ".join(parts)


def report(results: dict[str, list[Arm]], seeds: Sequence[int]) -> None:
    print("\nmean IoU (95% interval over seeds) at human-seconds per evaluation target")
    print(f"{'arm':18s} " + " ".join(f"{f'@{b:g}s':>14s}" for b in BUDGETS))
    for arm, runs in results.items():
        cells = []
        for budget in BUDGETS:
            mean, half = interval([r.at(budget) for r in runs])
            cells.append(f"{mean:.3f}±{half:.3f}".rjust(14))
        print(f"{arm:18s} " + " ".join(cells))
    if "loop-random" in results and "loop-uncertainty" in results:
        ratios = []
        for rand, unc in zip(results["loop-random"], results["loop-uncertainty"], strict=True):
            goal = rand.at(40.0)
            reach = to_reach(unc.points, goal)
            ratios.append(float("nan") if reach is None else reach / 40.0)
        mean, half = interval(ratios)
        print(
            f"uncertainty reaches random's IoU at 40 s in {mean:.2f}±{half:.2f} x the "
            f"human-seconds (target <= 0.7); per seed {[round(r, 2) for r in ratios]}"
        )
    print("\nat the end, by COCO object size: targets, mean IoU (over seeds), grids answered on")
    print("first windows (the whole image) + finer windows, per target")
    for arm, runs in results.items():
        parts = []
        for name in [n for n, _ in SIZES] + ["absent"]:
            shares = [r.sizes[name] for r in runs if name in r.sizes]
            if shares:
                n = sum(s.targets for s in shares)
                mean, half = interval([s.mean_iou for s in shares])
                first, finer = sum(s.first for s in shares) / n, sum(s.finer for s in shares) / n
                parts.append(f"{name} {n} IoU {mean:.3f}±{half:.3f} grids {first:.1f}+{finer:.1f}")
        print(f"{arm:18s} " + " | ".join(parts))
    print("\nwhere the grids went (all seeds): every grid counts in the budget")
    for arm, runs in results.items():
        total = {name: sum(r.spent.get(name, 0) for r in runs) for name in SPENT}
        settled = (sum(r.settled[0] for r in runs), sum(r.settled[1] for r in runs))
        print(f"{arm:18s} {spent_line(total)}; {settled_line(settled)}")
    for arm, runs in results.items():
        print(summary_line(arm, seeds, runs))


def plot(results: dict[str, list[Arm]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    xs = np.asarray(MEASURE_AT[1:])
    for arm, runs in results.items():
        stats = [interval([r.at(x) for r in runs]) for x in xs]
        mean = np.asarray([s[0] for s in stats])
        half = np.asarray([s[1] for s in stats])
        ax.plot(xs, mean, label=arm)
        ax.fill_between(xs, mean - half, mean + half, alpha=0.2)
    ceiling = interval([r.ceiling for runs in results.values() for r in runs])[0]
    ax.axhline(ceiling, color="black", linestyle="--", label=f"ceiling {ceiling:.2f}")
    ax.set_xscale("log")
    ax.set_xlabel("human-seconds per evaluation target")
    ax.set_ylabel("mean mask IoU (evaluation targets)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot: {path}")


@contextlib.contextmanager
def _work_folder(keep: Path | None) -> Iterator[str]:
    """Where the arms' projects are made: ``keep`` (left in place), else a temporary folder."""
    if keep is None:
        with tempfile.TemporaryDirectory() as tmp:
            yield tmp
        return
    keep.mkdir(parents=True)
    yield str(keep)
    print(f"kept every arm's project under {keep}", flush=True)


def main(argv: Sequence[str] | None = None) -> dict[str, list[Arm]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a bounded run for the test suite")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=None)
    parser.add_argument("--crowd", choices=sorted(CROWDS), default="realistic")
    parser.add_argument(
        "--scenes",
        choices=("demo", "photo"),
        default="demo",
        help="demo: the demo's procedural images (many tags each); photo: photograph-like "
        "scenes, one object to outline in each (write_photo_dataset)",
    )
    parser.add_argument("--budget", type=float, default=None, help="largest s/target to spend")
    parser.add_argument("--retrain-at", type=float, nargs="+", default=None)
    parser.add_argument("--steps", type=int, default=None, help="segmenter steps per round")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help="processes that compose the measured masks while the crowd answers (0: none, "
        "compose in the crowd's process; default: one per core)",
    )
    parser.add_argument(
        "--em-every", type=int, default=None, help="answers between EM passes (0: never)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        type=project_setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a project setting for every arm (e.g. min_votes=2); may be repeated",
    )
    parser.add_argument(
        "--frozen-share",
        type=float,
        default=FROZEN_SHARE,
        help="of the images without control truth, the share whose truth the project holds as "
        "its frozen evaluation set (never trained on); the others' is the benchmark's alone "
        "(1: the project holds all of it)",
    )
    parser.add_argument("--plot", type=Path, default=Path("artifacts/campaign.png"))
    parser.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="keep every arm's project (database, images, masks) in this new folder, to study "
        "its votes afterwards (default: a temporary folder, removed at the end)",
    )
    args = parser.parse_args(argv)
    if not 0.0 <= args.frozen_share <= 1.0:
        parser.error(f"--frozen-share {args.frozen_share}: want a share between 0 and 1")
    if args.keep is not None and args.keep.exists():
        parser.error(f"--keep {args.keep}: the folder exists; name a new one")
    q = args.quick
    args.images = args.images or (4 if q else 24)
    seeds = args.seeds or ([0] if q else [0, 1, 2])
    arms = args.arms or (["crowd"] if q else list(ARMS))
    budget = args.budget or (10.0 if q else max(BUDGETS))
    args.budgets = [b for b in BUDGETS if b < budget] + [budget]
    args.measure_at = [m for m in MEASURE_AT if m <= budget]
    args.retrain_at = args.retrain_at or [0.0, 20.0, 60.0]
    args.steps = args.steps or (20 if q else 150)
    args.answers, args.ceiling = 0, True
    print(
        f"{args.scenes} images {args.images}, seeds {seeds}, arms {arms}, crowd {args.crowd} "
        f"({len(CROWDS[args.crowd])} volunteers), up to {budget:g} s/target; loop: retrain at "
        f"{args.retrain_at} s/target, segmenter {args.steps} steps on {args.device}"
        + "".join(f"; {k}={v!r}" for k, v in args.overrides),
        flush=True,
    )
    results: dict[str, list[Arm]] = {arm: [] for arm in arms}
    with _work_folder(args.keep) as tmp:
        for seed in seeds:
            template = Path(tmp) / f"seed-{seed}" / "template"
            build(template, args.images, seed, dict(args.overrides), scenes=args.scenes)
            hidden = hide_truth(template, args.frozen_share)
            print(f"  seed {seed}: the truth of {hidden} targets is the benchmark's", flush=True)
            for arm in arms:
                arm_args = argparse.Namespace(**{**vars(args), "seed": seed})
                results[arm].append(
                    run_arm(
                        f"{arm}-seed{seed}", template, Path(tmp), arm_args, kinds=CROWDS[args.crowd]
                    )
                )
    report(results, seeds)
    plot(results, args.plot)
    return results


if __name__ == "__main__":
    main()
