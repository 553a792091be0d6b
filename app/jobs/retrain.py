"""One round of the learning loop: ``tessera retrain``.

Under the project's model-job lock (``app.jobs.lock``), as one recorded job:

1. the training data is read from the database: complete masks (soft masks weigh their pixels by
   confidence) and control ground truth; the frozen gold set is never trained on;
2. the segmenter is trained for a number of optimizer steps, from the active one's weights when
   its config (tags, encoder, input size) is the same, and the tagger fine-tuned from the
   active one;
3. each candidate is scored next to the active model on the same frozen data and promoted only
   if it beats it (``app.jobs.train``; promotion is one transaction, old versions stay);
4. the active tagger re-tags the images it has not seen (new tags seed targets with their
   Grad-CAM, ``app.jobs.seed``); a classifier tag the new tagger no longer predicts, and a complete
   target whose mask came out empty, go to triage. Before it, each tag learns from the crowd's
   verdicts on the tagger's earlier guesses of it how far to trust its new ones
   (``app.services.target.learn_guess_corrections``). Grad-CAM gives the first cells of new and
   unanswered targets their rate, to which the segmenter's evidence is added next for every tag
   it knows (measured: the other way round, re-tagging wiped the segmenter's priors of every
   unanswered target, and the mean IoU before any answer fell from 0.19 to 0.02);
5. the active segmenter looks at every open target: each open cell's score is the model's
   highest pixel probability in it (volunteers are asked whether *any* of the object is in the
   square), calibrated (Platt, offset by each level's rate) against the touched cells of
   control truth and of complete masks (never of the frozen evaluation set); the Platt slope,
   capped by the model's mIoU on the frozen set (``ml.calibration.weight_cap``), is the weight
   the model earns as a pseudo-voter. Its evidence (a log-likelihood ratio) is added to the rate
   each cell had without it (its parent's probability times the children's rate, a search's 5%,
   Grad-CAM), and replaces the round before's: the model's calibrated probability in place of
   that rate made a weak model flatten sure priors toward one half (a model of weight 0 set
   every prior to 0). The posteriors are recomputed, and a cell whose prior is sure retires
   after a small confirmation sample (``model_confirm_votes``). Its mask of every open target is
   stored (``app.jobs.predict``): the composition starts GrabCut from it too;
6. open targets are re-ranked by the project's acquisition function: ``uncertainty`` (each
   window's value is the expected gain of an answer from its open cells' fused posteriors,
   ``app.services.crowd.settle.revalue_windows``; a target where model and crowd disagree
   weighs more),
   ``disagreement`` or ``random`` (the baseline: the picker draws any open window uniformly,
   ``app.services.crowd.picker``); a tag the tagger added weighs
   its probability, updated by the crowd's first answers, in its windows' values
   (``app.services.target.tag_beliefs``);
7. the evaluation targets' masks are composed and scored against their truth, per tag, against
   the human-seconds spent so far (``app.services.curation.quality``): the dashboard's curve.

A crash or kill at any step leaves the active models, votes and masks as they were: steps
commit on their own, a checkpoint is complete before it is registered, and the next job run on
the project marks the killed job failed (``app.jobs.lock``).

Under ``torchrun`` rank 0 runs the round; the other ranks only train the two models with it
(``app.jobs.train``) and wait for its report (``ml.distributed.led_by_rank_zero``): the lock,
the rows, the files and steps 4-7 are rank 0's alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import Row, select
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.jobs.lock import project_lock
from app.jobs.objects import run_index_objects
from app.jobs.predict import predicted_targets, store_prediction, target_planes
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
    Window,
    WindowState,
)
from app.services.crowd.consensus import base_rates, refresh_cells
from app.services.crowd.opening import outside_image
from app.services.crowd.settle import revalue_windows, settle_targets
from app.services.curation.objects import index_key
from app.services.curation.quality import MAX_QUALITY_TARGETS, record_quality
from app.services.files import mask_store, model_file, read_mask
from app.services.job import finish_job, job_run, log_job
from app.services.model_version import active_model
from app.services.project import get_project, square_cells
from app.services.target import learn_guess_corrections, stop_collecting
from app.storage import open_storage
from ml import distributed
from ml.aggregation import grid
from ml.calibration import Calibrator, fit_platt, model_weight, with_slope
from ml.checkpoints import load_checkpoint
from ml.segmenter import Segmenter
from ml.train import resolve_device

ACQUISITIONS = ("uncertainty", "disagreement", "random")
MIN_CELLS_FOR_CALIBRATION = 20
# The newest control and complete targets the model's prior is calibrated on (each costs one
# prediction on its image, shared with the image's other targets).
MAX_CALIBRATION_TARGETS = 400


@dataclass(frozen=True)
class RetrainOptions:
    # The segmenter trains ``steps`` optimizer steps (200), from the active one when it fits.
    segmenter: TrainOptions = field(default_factory=TrainOptions)
    tagger: TrainOptions = field(default_factory=lambda: TrainOptions(epochs=5))
    device: str = "auto"
    # The round's reading of mask quality composes at most this many evaluation targets (an
    # even sample; each GrabCut over an uncertain image takes up to about a second on a CPU).
    quality_targets: int = MAX_QUALITY_TARGETS


@dataclass
class RetrainReport:
    job_id: int = 0
    segmenter: TrainOutcome | None = None
    tagger: TrainOutcome | None = None
    priors_set: int = 0
    # The model's pseudo-voter weight: the Platt slope of its touched score, capped by its
    # frozen-set mIoU (``ml.calibration.weight_cap``); the slope and the mIoU it came from.
    model_weight: float | None = None
    model_slope: float | None = None
    model_miou: float | None = None
    calibration_cells: int = 0
    masks_predicted: int = 0
    cells_retired: int = 0
    images_retagged: int = 0
    targets_created: int = 0
    triaged: int = 0
    # The crowd's verdicts on the tagger's guesses so far: judged, confirmed (before re-tagging).
    guesses_judged: int = 0
    guesses_confirmed: int = 0
    reranked: int = 0
    # Mean IoU of the evaluation targets' masks after the round, and human-seconds per target.
    mask_iou: float | None = None
    human_seconds: float | None = None
    objects_indexed: int | None = None  # when the project has an object index: its new size


def run_retrain(
    factory: sessionmaker[Session],
    settings: Settings,
    *,
    slug: str,
    options: RetrainOptions,
    on_step: Callable[[str], None] | None = None,
) -> RetrainReport:
    """Run one round of the loop (see the module docstring); returns what each step did. Under
    torchrun, on rank 0 with the other ranks training with it; each rank returns rank 0's
    report."""
    return distributed.led_by_rank_zero(
        lambda: _round(factory, settings, slug=slug, options=options, on_step=on_step),
        device=options.device,
    )


def _round(
    factory: sessionmaker[Session],
    settings: Settings,
    *,
    slug: str,
    options: RetrainOptions,
    on_step: Callable[[str], None] | None,
) -> RetrainReport:
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
            # Re-tagging first: seeding gives unanswered first cells the tagger's Grad-CAM
            # rate, to which the segmenter's evidence is added after it.
            step("re-tagging images with the active tagger", 0.6)
            _retag(factory, settings, session, project, options.device, report)
            step("the segmenter's priors and masks of open targets", 0.75)
            _model_priors(session, settings, project, options.device, report)
            if report.model_weight is not None:
                log_job(job, _weight_line(report))
            session.commit()
            step("re-ranking targets", 0.9)
            report.reranked = rerank(session, project=project)
            step("mask quality on the evaluation targets", 0.95)
            reading = record_quality(
                session, settings=settings, project=project, limit=options.quality_targets
            )
            if reading is not None:
                report.mask_iou, report.human_seconds = reading.mean_iou, reading.human_seconds
            session.commit()
            if open_storage(settings).exists(index_key(project.slug)):
                # A project that searches by object keeps its index as fresh as its masks and
                # its tagger (the index job writes its own job row).
                step("re-indexing objects", 0.97)
                indexed = run_index_objects(factory, settings, slug=slug, device=options.device)
                report.objects_indexed = indexed.objects
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
    segmenter_options = _on(options.segmenter, options.device)
    if segmenter_options.init_weights is None:
        segmenter_options = dataclasses.replace(segmenter_options, from_active=True)
    try:
        report.segmenter = run_train_segmenter(
            factory, settings, slug=project.slug, options=segmenter_options
        )
        step(_verdict("segmenter", report.segmenter), 0.3)
    except NotEnoughDataError as exc:
        step(f"segmenter skipped: {exc}", 0.3)
    tagger_options = _on(options.tagger, options.device)
    active = active_model(session, project=project, kind=ModelKind.TAGGER)
    if active is not None and tagger_options.init_weights is None:
        tagger_options = dataclasses.replace(
            tagger_options,
            init_weights=str(model_file(settings, active.path)),
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
    return (
        f"{kind} v{outcome.version} ({outcome.steps} steps from {outcome.start}, "
        f"{outcome.seconds:.0f} s): {outcome.metric} {outcome.score} -> {verdict}"
    )


def _weight_line(report: RetrainReport) -> str:
    return (
        f"model prior weight {report.model_weight:.3f}: Platt slope {report.model_slope:.3f} "
        f"on {report.calibration_cells} cells, capped by frozen-set mIoU {report.model_miou}"
    )


def _cells(session: Session, target: Target, *, open_only: bool) -> list[Cell]:
    query = select(Cell).where(Cell.target_id == target.id)
    if open_only:
        query = query.where(Cell.status == CellStatus.OPEN)
    return list(session.scalars(query.order_by(Cell.id)))


def touch_scores(
    soft: np.ndarray, cells: Sequence[grid.Cell], *, square: bool = False
) -> np.ndarray:
    """The model's score that each cell is *touched*: its highest pixel probability there.

    Volunteers answer "is any of it in this square", so a cell the object barely enters is a
    yes; the mean probability over the cell (its coverage, the score before) calls such a cell
    a no. The maximum is taken on the model's map resized (bilinearly) to the image: the cell
    scores as its most confident model pixel, and calibration says how often that is right.

    Shape:
        soft ``(H, W)`` in [0, 1]; returns ``(n_cells,)``, 0 for an empty cell.
    """
    height, width = soft.shape
    out = np.zeros(len(cells), dtype=np.float64)
    for i, cell in enumerate(cells):
        rect = grid.cell_rect(cell, height, width, square=square)
        if rect.height > 0 and rect.width > 0:
            out[i] = float(soft[rect.top : rect.bottom, rect.left : rect.right].max())
    return out


def _addresses(cells: list[Cell]) -> list[grid.Cell]:
    return [grid.Cell(c.level, c.row, c.col) for c in cells]


@dataclass
class _Scored:
    """A target's cells and the model's touch score of each; ``truth`` is its mask (calibration
    targets only)."""

    target: Target
    cells: list[Cell]
    scores: np.ndarray
    truth: np.ndarray | None = None


def _final_mask(session: Session, settings: Settings, target: Target) -> np.ndarray | None:
    """The truth a target is calibrated on: a control target's ground truth, a complete
    target's newest curator or consensus mask (hard, ``(H, W)`` bool)."""
    sources = (
        [MaskSource.GROUND_TRUTH] if target.control else [MaskSource.CURATOR, MaskSource.CONSENSUS]
    )
    version = session.scalar(
        select(MaskVersion)
        .where(MaskVersion.target_id == target.id, MaskVersion.source.in_(sources))
        .order_by(MaskVersion.version.desc())
        .limit(1)
    )
    if version is None:
        return None
    return np.asarray(read_mask(settings, version.hard_path) > 0.5)


def model_prior_targets(
    session: Session, project: Project
) -> tuple[list[tuple[Target, Image, str]], list[tuple[Target, Image, str]]]:
    """The open targets that get model priors, and the targets the prior is calibrated on:
    control targets and complete ones, never a frozen evaluation target (ground truth that is
    not served as control), the newest ``MAX_CALIBRATION_TARGETS``."""
    frozen = set(
        session.scalars(
            select(MaskVersion.target_id)
            .join(Target, Target.id == MaskVersion.target_id)
            .where(
                Target.project_id == project.id,
                Target.control.is_(False),
                MaskVersion.source == MaskSource.GROUND_TRUTH,
            )
        )
    )
    rows = session.execute(
        select(Target, Image, Tag.name)
        .join(Image, Image.id == Target.image_id)
        .join(Tag, Tag.id == Target.tag_id)
        .where(
            Target.project_id == project.id,
            Target.state.in_([TargetState.COLLECTING, TargetState.COMPLETE])
            | Target.control.is_(True),
        )
        .order_by(Target.id)
    ).all()
    open_targets = [
        (t, i, n) for t, i, n in rows if t.state == TargetState.COLLECTING and not t.control
    ]
    calibration = [
        (t, i, n)
        for t, i, n in rows
        if t.id not in frozen and (t.control or t.state == TargetState.COMPLETE)
    ]
    return open_targets, calibration[-MAX_CALIBRATION_TARGETS:]


def _reference(
    session: Session, settings: Settings, target: Target, soft: np.ndarray, *, square: bool
) -> _Scored | None:
    """Touch scores of every cell of a calibration target, with its truth (None without)."""
    # A square wholly outside the image is nobody's question and scores 0 by construction.
    cells = [c for c in _cells(session, target, open_only=False) if not outside_image(c)]
    truth = _final_mask(session, settings, target)
    if not cells or truth is None:
        return None
    return _Scored(target, cells, touch_scores(soft, _addresses(cells), square=square), truth)


def _model_priors(
    session: Session, settings: Settings, project: Project, device: str, report: RetrainReport
) -> None:
    """Set the open cells' priors from the active segmenter and store its mask of every open
    target (``app.jobs.predict``), from one prediction per image: calibration targets that are
    still open (control targets) share it (see the module docstring)."""
    version = active_model(session, project=project, kind=ModelKind.SEGMENTER)
    if version is None:
        return
    checkpoint = model_file(settings, version.path)
    model = load_checkpoint(checkpoint, device=resolve_device(device), kind="segmenter").model
    assert isinstance(model, Segmenter)
    open_targets, calibration_targets = model_prior_targets(session, project)
    square = square_cells(project)
    predicted = predicted_targets(session, project.id)
    stored = {target.id for target, _, _ in predicted}
    calibrating = {target.id for target, _, _ in calibration_targets}
    given = {target.id for target, _, _ in open_targets}
    rows = predicted + [row for row in calibration_targets if row[0].id not in stored]
    store = mask_store(settings)
    references: list[_Scored] = []
    pending: list[_Scored] = []  # open cells and their touch scores, until the fit
    for target, soft in target_planes(settings, model, rows):
        if target.id in calibrating:
            reference = _reference(session, settings, target, soft, square=square)
            if reference is not None:
                references.append(reference)
        if target.id in stored:
            # The prediction is a start of the composition's GrabCut (``ml.composition``).
            store_prediction(session, target=target, soft=soft, store=store)
            report.masks_predicted += 1
        cells = _cells(session, target, open_only=True) if target.id in given else []
        if cells:
            pending.append(
                _Scored(target, cells, touch_scores(soft, _addresses(cells), square=square))
            )
    calibrator = _fit_model_calibrator(
        references, base_rates(session, project=project), square=square
    )
    if calibrator is None:
        session.flush()
        return
    miou = version.metrics.get("miou")
    report.model_miou = None if miou is None else float(miou)
    report.model_slope = float(calibrator.x[0])
    report.model_weight = model_weight(calibrator, report.model_miou)
    report.calibration_cells = sum(len(r.cells) for r in references)
    evidence = with_slope(calibrator, report.model_weight)
    touched: list[Cell] = []
    for scored in pending:
        for cell, llr in zip(scored.cells, _evidence(evidence, scores=scored.scores), strict=True):
            # The model's evidence is added to the rate the cell had without it, and
            # replaces the evidence of the round before.
            cell.prior_logodds = float(cell.prior_logodds - cell.model_logodds + llr)
            cell.model_logodds = float(llr)
        touched += scored.cells
    session.flush()
    if not touched:
        return
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
    references: list[_Scored], rates: dict[int, float], *, square: bool
) -> Calibrator | None:
    """Platt scaling of the touch score against whether the truth touches the cell (its
    coverage > 0), over every cell of the calibration targets, each offset by its level's rate
    (``base_rates``): the fit is the model's log-likelihood ratio over what the pyramid knows
    without it. None without enough cells of both answers."""
    scores, labels, offsets = [], [], []
    for ref in references:
        assert ref.truth is not None
        scores.append(ref.scores)
        labels.append(grid.cell_coverage(ref.truth, _addresses(ref.cells), square=square) > 0)
        offsets.append(np.array([rates.get(c.level, 0.0) for c in ref.cells]))
    if not scores:
        return None
    x, y = np.concatenate(scores), np.concatenate(labels)
    if y.size < MIN_CELLS_FOR_CALIBRATION or y.all() or not y.any():
        return None
    return fit_platt(x, y, offset=np.concatenate(offsets))


def _evidence(calibrator: Calibrator, scores: np.ndarray) -> np.ndarray:
    """The model's log-likelihood ratio per cell: ``a * s + b`` of its (weighed) Platt fit."""
    return calibrator.x[0] * np.asarray(scores, dtype=np.float64) + calibrator.y[0]


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
    # New guesses open valued at what the crowd found of the tagger's earlier ones.
    verdicts = learn_guess_corrections(session, project_id=project.id)
    report.guesses_judged, report.guesses_confirmed = verdicts.judged, verdicts.confirmed
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
            stop_collecting(
                session,
                target=target,
                state=TargetState.TRIAGE,
                reason="the tagger no longer predicts this tag",
            )
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
        stop_collecting(
            session,
            target=target,
            state=TargetState.TRIAGE,
            reason="the mask came out empty: is the tag really there?",
        )
        triaged += 1
    session.flush()
    return triaged


def rerank(session: Session, *, project: Project) -> int:
    """Set every open target's priority by the project's acquisition function."""
    acquisition = str(project.setting("acquisition"))
    if acquisition not in ACQUISITIONS:
        raise ValueError(f"unknown acquisition {acquisition!r}; known: {', '.join(ACQUISITIONS)}")
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
            # The picker draws windows uniformly (``picker._random_candidate``): the value is
            # not used to choose. (Until stop 53 "random" only drew the targets' priorities,
            # while the windows' values still held the expected gain of an answer.)
            target.priority = tag_priority
            continue
        disagreement = _disagreement(rows)
        if acquisition == "disagreement":
            target.priority = tag_priority * disagreement
        else:
            # The window's value already holds its open cells' uncertainty (the expected gain
            # of an answer, ``revalue_windows``): a target's priority weighing it again squared
            # it, which starved objects whose cells the model made fairly sure but not sure
            # enough to retire (measured: 241 first windows against 2 finer ones at 40 s).
            target.priority = tag_priority * (1.0 + disagreement)
    session.flush()
    # The picker orders windows by their stored value, which holds the target's priority.
    revalue_windows(
        session,
        window_ids=set(
            session.scalars(
                select(Window.id).where(
                    Window.project_id == project.id, Window.state == WindowState.OPEN
                )
            )
        ),
    )
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
