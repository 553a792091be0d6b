"""One round of the learning loop: ``tessera retrain``.

Under the project's model-job lock (``app.jobs.lock``), as one recorded job:

1. the training data is read from the database: complete masks (soft masks weigh their pixels by
   confidence) and control ground truth; the frozen gold set is never trained on;
2. the segmenter is trained, and the tagger fine-tuned from the active one;
3. each candidate is scored next to the active model on the same frozen data and promoted only
   if it beats it (``app.jobs.train``; promotion is one transaction, old versions stay);
4. the active segmenter looks at every open target: its coverage of each open cell becomes the
   cell's prior, calibrated on served gold (Platt: the slope is the weight the model earns as a
   pseudo-voter), the posteriors are recomputed, and a cell whose prior is sure retires after a
   small confirmation sample (``model_confirm_votes``);
5. the active tagger re-tags the images it has not seen (new tags seed targets with their
   Grad-CAM, ``app.jobs.seed``); a classifier tag the new tagger no longer predicts, and a complete
   target whose mask came out empty, go to triage;
6. open targets are re-ranked by the project's acquisition function: ``uncertainty`` (of the
   fused posterior, raised where model and crowd disagree), ``disagreement`` or ``random``.

A crash or kill at any step leaves the active models, votes and masks as they were: steps
commit on their own, a checkpoint is complete before it is registered, and the next job run on
the project marks the killed job failed (``app.jobs.lock``).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import Row, select
from sqlalchemy.orm import Session, sessionmaker
from torch.nn import functional as F

from app.config import Settings
from app.jobs.lock import project_lock
from app.jobs.seed import run_seed
from app.jobs.train import (
    NotEnoughDataError,
    TrainOptions,
    TrainOutcome,
    run_train_segmenter,
    run_train_tagger,
)
from app.models import (
    Cell,
    CellStatus,
    Consensus,
    Gold,
    Image,
    ImageTag,
    ImageTagSource,
    ImageTagStatus,
    MaskSource,
    MaskVersion,
    ModelKind,
    Project,
    Tag,
    Target,
    TargetState,
)
from app.services.campaign import uncertainty
from app.services.consensus import refresh_cells
from app.services.image import image_path
from app.services.job import finish_job, job_run, log_job
from app.services.model_version import active_model
from app.services.project import get_project
from app.services.settle import settle_targets
from ml.aggregation import grid
from ml.calibration import Calibrator, fit_calibrator
from ml.checkpoints import load_checkpoint
from ml.data import load_images
from ml.segmenter import Segmenter, predict_masks
from ml.train import resolve_device

ACQUISITIONS = ("uncertainty", "disagreement", "random")
MIN_GOLD_FOR_CALIBRATION = 20
BATCH = 8


@dataclass(frozen=True)
class RetrainOptions:
    segmenter: TrainOptions = field(default_factory=lambda: TrainOptions(epochs=20))
    tagger: TrainOptions = field(default_factory=lambda: TrainOptions(epochs=5))
    device: str = "auto"


@dataclass
class RetrainReport:
    job_id: int = 0
    segmenter: TrainOutcome | None = None
    tagger: TrainOutcome | None = None
    priors_set: int = 0
    model_weight: float | None = None  # Platt slope of the model's coverage on served gold
    cells_retired: int = 0
    images_retagged: int = 0
    targets_created: int = 0
    triaged: int = 0
    reranked: int = 0


def run_retrain(
    factory: sessionmaker[Session],
    settings: Settings,
    *,
    slug: str,
    options: RetrainOptions,
    on_step: Callable[[str], None] | None = None,
) -> RetrainReport:
    """Run one round of the loop (see the module docstring); returns what each step did."""
    with factory() as session:
        project = get_project(session, slug=slug)
        params = {"device": options.device, "segmenter": vars(options.segmenter).copy()}
        with (
            project_lock(session, settings, project),
            job_run(session, project=project, kind="retrain", params=params) as job,
        ):
            report = RetrainReport(job_id=job.id)

            def step(message: str, progress: float) -> None:
                log_job(job, message, progress=progress)
                session.commit()
                if on_step is not None:
                    on_step(message)

            _train_models(factory, settings, session, project, options, report, step)
            step("model priors on open cells", 0.6)
            _model_priors(session, settings, project, options.device, report)
            session.commit()
            step("re-tagging images with the active tagger", 0.75)
            _retag(factory, settings, session, project, options.device, report)
            step("re-ranking targets", 0.9)
            report.reranked = rerank(session, project=project)
            finish_job(job, result=_summary(report))
            session.commit()
    return report


def _summary(report: RetrainReport) -> dict[str, object]:
    out = {k: v for k, v in vars(report).items() if k not in ("segmenter", "tagger")}
    for kind in ("segmenter", "tagger"):
        outcome = getattr(report, kind)
        out[kind] = dataclasses.asdict(outcome) if outcome else None
    return out


def _train_models(
    factory: sessionmaker[Session],
    settings: Settings,
    session: Session,
    project: Project,
    options: RetrainOptions,
    report: RetrainReport,
    step: Callable[[str, float], None],
) -> None:
    step("training the segmenter", 0.05)
    try:
        report.segmenter = run_train_segmenter(
            factory, settings, slug=project.slug, options=_on(options.segmenter, options.device)
        )
        step(_verdict("segmenter", report.segmenter), 0.3)
    except NotEnoughDataError as exc:
        step(f"segmenter skipped: {exc}", 0.3)
    tagger_options = _on(options.tagger, options.device)
    active = active_model(session, project=project, kind=ModelKind.TAGGER)
    if active is not None and tagger_options.init_weights is None:
        tagger_options = dataclasses.replace(
            tagger_options,
            init_weights=active.path,
            backbone=str(active.config.get("backbone", tagger_options.backbone)),
        )
    step("fine-tuning the tagger" if active else "training the tagger", 0.35)
    try:
        report.tagger = run_train_tagger(
            factory, settings, slug=project.slug, options=tagger_options
        )
        step(_verdict("tagger", report.tagger), 0.55)
    except NotEnoughDataError as exc:
        step(f"tagger skipped: {exc}", 0.55)


def _on(options: TrainOptions, device: str) -> TrainOptions:
    return dataclasses.replace(options, device=device)


def _verdict(kind: str, outcome: TrainOutcome) -> str:
    verdict = "promoted" if outcome.promoted else f"refused (active: {outcome.active_score})"
    return f"{kind} v{outcome.version}: {outcome.metric} {outcome.score} -> {verdict}"


def _cells(session: Session, target: Target, *, open_only: bool) -> list[Cell]:
    query = select(Cell).where(Cell.target_id == target.id)
    if open_only:
        query = query.where(Cell.status == CellStatus.OPEN)
    return list(session.scalars(query.order_by(Cell.id)))


def _cell_coverage(soft: np.ndarray, cells: list[Cell]) -> np.ndarray:
    """The model's mean probability over each cell. Shape: soft ``(H, W)``; ``(n_cells,)``."""
    by_level = {level: grid.level_coverage(soft, level) for level in {c.level for c in cells}}
    return np.array([by_level[c.level][c.row, c.col] for c in cells], dtype=np.float64)


def _model_priors(
    session: Session, settings: Settings, project: Project, device: str, report: RetrainReport
) -> None:
    version = active_model(session, project=project, kind=ModelKind.SEGMENTER)
    if version is None:
        return
    model = load_checkpoint(version.path, device=resolve_device(device), kind="segmenter").model
    assert isinstance(model, Segmenter)
    column = {name: i for i, name in enumerate(model.config.tags)}
    rows = session.execute(
        select(Target, Image, Tag.name)
        .join(Image, Image.id == Target.image_id)
        .join(Tag, Tag.id == Target.tag_id)
        .where(Target.project_id == project.id, Target.state == TargetState.COLLECTING)
        .order_by(Image.id, Target.id)
    ).all()
    scored: list[tuple[Target, list[Cell], np.ndarray]] = []
    by_image: dict[int, tuple[Image, list[tuple[Target, int]]]] = {}
    for target, image, name in rows:
        if name in column:
            by_image.setdefault(image.id, (image, []))[1].append((target, column[name]))
    groups = list(by_image.values())
    for start in range(0, len(groups), BATCH):
        batch = groups[start : start + BATCH]
        pixels = load_images([image_path(settings, i) for i, _ in batch], model.config.input_size)
        probs = predict_masks(model, pixels)  # (B, T, S, S)
        for (image, targets), planes in zip(batch, probs, strict=True):
            full = F.interpolate(
                planes[None].float(), size=(image.height, image.width), mode="bilinear"
            )[0].clamp(0, 1)
            for target, k in targets:
                # control targets: every cell, whose gold calibrates; the others: open cells
                cells = _cells(session, target, open_only=not target.control)
                if cells:
                    soft = full[k].numpy()
                    scored.append((target, cells, _cell_coverage(soft, cells)))
    calibrator = _fit_model_calibrator(session, scored)
    if calibrator is None:
        return
    report.model_weight = float(calibrator.x[0])
    touched: list[Cell] = []
    for target, cells, coverage in scored:
        if target.control:
            continue  # control cells are gold: their answers are known already
        for cell, value in zip(cells, calibrator.log_odds(coverage), strict=True):
            cell.prior_logodds = float(value)
        touched += cells
    session.flush()
    refresh_cells(session, cells=touched)
    report.priors_set = len(touched)
    before = _retired_count(session, touched)
    settle_targets(
        session,
        settings=settings,
        project=project,
        target_ids={c.target_id for c in touched},
    )
    report.cells_retired = _retired_count(session, touched) - before


def _retired_count(session: Session, cells: list[Cell]) -> int:
    for cell in cells:
        session.refresh(cell, ["status"])
    return sum(c.status == CellStatus.RETIRED for c in cells)


def _fit_model_calibrator(
    session: Session, scored: list[tuple[Target, list[Cell], np.ndarray]]
) -> Calibrator | None:
    """Platt scaling of the model's cell coverage against served gold answers."""
    ids = [c.id for _, cells, _ in scored for c in cells]
    gold = {
        g.cell_id: g.label
        for g in session.scalars(select(Gold).where(Gold.cell_id.in_(ids), Gold.frozen.is_(False)))
    }
    x = [v for _, cells, cov in scored for c, v in zip(cells, cov, strict=True) if c.id in gold]
    y = [gold[c.id] for _, cells, _ in scored for c in cells if c.id in gold]
    if len(y) < MIN_GOLD_FOR_CALIBRATION or all(y) or not any(y):
        return None
    return fit_calibrator(np.asarray(x), np.asarray(y), "platt")


def _retag(
    factory: sessionmaker[Session],
    settings: Settings,
    session: Session,
    project: Project,
    device: str,
    report: RetrainReport,
) -> None:
    version = active_model(session, project=project, kind=ModelKind.TAGGER)
    if version is None:
        return
    session.commit()  # end this session's read: the seeding job writes from its own session
    seeded = run_seed(factory, settings, slug=project.slug, device=device)
    report.images_retagged, report.targets_created = seeded.images, seeded.targets_created
    predicted = {(p.image.id, p.tag.id) for p in seeded.pairs}
    session.expire_all()
    report.triaged = triage_unsupported(
        session, project=project, retagged=set(seeded.image_ids), predicted=predicted
    )
    session.commit()


def triage_unsupported(
    session: Session,
    *,
    project: Project,
    retagged: set[int],
    predicted: set[tuple[int, int]],
) -> int:
    """Send to triage the targets the evidence no longer supports; returns how many.

    - an open target of a classifier tag that the tagger, re-run on its image (``retagged``),
      no longer predicts (``predicted``: (image id, tag id) pairs), unless an import or a
      curator confirmed the tag;
    - a complete target whose mask has no positive cell: the tag contradicts its mask.
    """
    stale = session.execute(
        select(ImageTag, Target)
        .join(
            Target,
            (Target.image_id == ImageTag.image_id) & (Target.tag_id == ImageTag.tag_id),
        )
        .join(Image, Image.id == ImageTag.image_id)
        .where(
            Image.project_id == project.id,
            ImageTag.source == ImageTagSource.CLASSIFIER,
            ImageTag.status == ImageTagStatus.ACTIVE,
            Target.state == TargetState.COLLECTING,
        )
    ).all()
    confirmed = {
        (t.image_id, t.tag_id)
        for t in session.scalars(
            select(ImageTag)
            .join(Image, Image.id == ImageTag.image_id)
            .where(
                Image.project_id == project.id,
                ImageTag.source.in_([ImageTagSource.IMPORT, ImageTagSource.CURATOR]),
            )
        )
    }
    triaged = 0
    for image_tag, target in stale:
        key = (image_tag.image_id, image_tag.tag_id)
        if image_tag.image_id in retagged and key not in predicted and key not in confirmed:
            target.state = TargetState.TRIAGE
            target.triage_reason = "the tagger no longer predicts this tag"
            triaged += 1
    empty = session.scalars(
        select(Target).where(
            Target.project_id == project.id,
            Target.state == TargetState.COMPLETE,
            ~select(Cell.id).where(Cell.target_id == Target.id, Cell.label.is_(True)).exists(),
            # A curator's decision (an accepted or rejected tag) is final.
            ~select(MaskVersion.id)
            .where(MaskVersion.target_id == Target.id, MaskVersion.source == MaskSource.CURATOR)
            .exists(),
        )
    ).all()
    for target in empty:
        target.state = TargetState.TRIAGE
        target.triage_reason = "the mask came out empty: is the tag really there?"
        triaged += 1
    session.flush()
    return triaged


def rerank(session: Session, *, project: Project, seed: int = 0) -> int:
    """Set every open target's priority by the project's acquisition function."""
    acquisition = str(project.setting("acquisition"))
    if acquisition not in ACQUISITIONS:
        raise ValueError(f"unknown acquisition {acquisition!r}; known: {', '.join(ACQUISITIONS)}")
    rng = random.Random(seed)
    targets = session.execute(
        select(Target, Tag.priority)
        .join(Tag, Tag.id == Target.tag_id)
        .where(Target.project_id == project.id, Target.state == TargetState.COLLECTING)
        .order_by(Target.id)
    ).all()
    for target, priority in targets:
        rows = session.execute(
            select(Cell.prior_logodds, Consensus.posterior, Consensus.n_votes)
            .join(Consensus, Consensus.cell_id == Cell.id)
            .where(Cell.target_id == target.id, Cell.status == CellStatus.OPEN)
        ).all()
        tag_priority = float(priority)
        if acquisition == "random":
            target.priority = tag_priority * rng.random()
            continue
        posteriors = [float(q) for _, q, _ in rows]
        disagreement = _disagreement(rows)
        if acquisition == "disagreement":
            target.priority = tag_priority * disagreement
        else:
            target.priority = tag_priority * uncertainty(posteriors) * (1.0 + disagreement)
    session.commit()
    return len(targets)


def _disagreement(rows: Sequence[Row[float, float, int]]) -> float:
    """Mean gap between the prior (CAM or model) and the crowd's answer, over voted cells."""
    gaps = []
    for prior, posterior, n_votes in rows:
        if n_votes:
            p = 1.0 / (1.0 + np.exp(-float(prior)))
            gaps.append(abs(p - float(posterior)))
    return float(np.mean(gaps)) if gaps else 0.0
