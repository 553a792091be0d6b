"""Training jobs: the tagger and the segmenter of a project, recorded as jobs and versions.

Each step commits on its own (the job row says how far it got). The checkpoint is written to a
temporary file and renamed before its model version is recorded; a version is promoted only if
there is no active one or it scores better than the active one on the same validation data.

Training length is a number of optimizer steps (``TrainOptions.steps``), or ``epochs`` passes
over the data when given. The job's log and result say how many steps it took, how many
seconds, what it started from, and the candidate's score next to the active model's.

Under ``torchrun`` (``ml.distributed``) rank 0 runs the job as one process would: it alone takes
the project lock, reads the training data, writes the job row, the checkpoint and the model
version, and decides the promotion. The other ranks train with it on the data and config it
sends them (DistributedDataParallel copies rank 0's initial weights to them), then return its
outcome or raise its error. ``batch_size`` is the global batch, split over the ranks.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.jobs.datasets import segmenter_items, tagger_items, vocabulary
from app.jobs.lock import models_dir, project_lock, work_dir
from app.models import Job, ModelKind, ModelVersion, Project
from app.services.files import held_files, key_of_local, model_file, store_checkpoint
from app.services.job import finish_job, job_run, log_job
from app.services.model_version import active_model, promote, register_model_version
from app.services.project import get_project
from app.storage import open_storage
from ml import distributed
from ml.checkpoints import config_to_dict, load_checkpoint, load_pretrained, save_checkpoint
from ml.segmenter import Segmenter, SegmenterConfig, build_segmenter
from ml.tagger import Tagger, TaggerConfig, build_tagger
from ml.train import (
    Progress,
    SegmenterResult,
    SegmenterTrainConfig,
    TaggerResult,
    TaggerTrainConfig,
    evaluate_segmenter,
    resolve_device,
    score_tagger,
    seed_everything,
    train_segmenter,
    train_tagger,
)


class NotEnoughDataError(ValueError):
    """There is nothing (or too little) to learn from yet; the message says what is missing."""


T = TypeVar("T")


@dataclass(frozen=True)
class TrainOptions:
    # Optimizer steps: the data is cycled (reshuffled, re-augmented) as often as needed.
    steps: int = 200
    # Instead of ``steps``: this many passes over the data (steps = epochs x batches per pass).
    epochs: int | None = None
    # Square input side in pixels; None: ``input_size`` picks it (128 for a segmenter on a CPU).
    size: int | None = None
    backbone: str = "resnet18"  # timm name for the tagger, smp encoder for the segmenter
    batch_size: int = 16  # under torchrun: the global batch, split over the processes
    device: str = "auto"
    seed: int = 0  # seeds Python's, NumPy's and torch's generators and the data order
    # Tagger only: dilate the last stages so that Grad-CAM maps are finer than the 3x3 grid.
    output_stride: int | None = None
    # A local weights file for the backbone / encoder (nothing is ever downloaded).
    init_weights: str | None = None
    # Segmenter only: start from the active segmenter's weights when its config (tags,
    # architecture, encoder, input size) is the candidate's; from scratch otherwise.
    from_active: bool = False


# A 128 px resnet18 Unet trained 200 steps on the CPU (2-5 minutes) on 100 demo masks reaches a
# per-target IoU of about 0.6; at 64 px it stays under 0.48. A GPU affords 256 px.
CPU_SEGMENTER_SIZE = 128
DEFAULT_SIZE = 256


def input_size(options: TrainOptions, kind: ModelKind) -> int:
    """The input side: ``options.size`` when given, else 128 px for a segmenter trained on the
    CPU and 256 px otherwise (the tagger's Grad-CAM needs the finer feature maps)."""
    if options.size is not None:
        return options.size
    if kind == ModelKind.SEGMENTER and resolve_device(options.device).type == "cpu":
        return CPU_SEGMENTER_SIZE
    return DEFAULT_SIZE


def training_steps(options: TrainOptions, n_items: int) -> int:
    """``options.steps``, or ``epochs`` passes of ``ceil(n_items / batch_size)`` batches."""
    if options.epochs is not None:
        return options.epochs * math.ceil(n_items / options.batch_size)
    return options.steps


class PretrainedWeightsError(ValueError):
    """The ``init_weights`` file does not fit the chosen backbone."""


def _initial(model: Tagger | Segmenter, options: TrainOptions, job: Job) -> None:
    """Load ``options.init_weights`` into the model's backbone and say so in the job log."""
    if options.init_weights is None:
        return
    try:
        report = load_pretrained(model, options.init_weights)
    except (ValueError, OSError, RuntimeError) as exc:
        raise PretrainedWeightsError(f"--init-weights {options.init_weights}: {exc}") from exc
    log_job(
        job,
        f"backbone initialised from {options.init_weights}: {report.loaded}/{report.expected} "
        f"tensors, {len(report.skipped)} of the file's skipped",
    )


@dataclass(frozen=True)
class TrainOutcome:
    job_id: int
    version: int
    promoted: bool
    metric: str
    score: float | None  # the candidate's, on the evaluation data
    active_score: float | None  # the active model's it was held against
    steps: int = 0  # optimizer steps taken
    seconds: float = 0.0  # training time, evaluation excluded
    start: str = "scratch"  # "scratch", "init_weights" or "active vN"


def _incumbent_score(
    settings: Settings,
    active: ModelVersion | None,
    config: Any,
    items: Sequence[Any],
    device: str,
) -> float | None:
    """The active model's score on the candidate's evaluation items, or None when the two
    cannot be compared that way (no active model, another vocabulary, no items, a lost file)."""
    if active is None or not items:
        return None
    kind = "tagger" if isinstance(config, TaggerConfig) else "segmenter"
    try:
        checkpoint = load_checkpoint(
            model_file(settings, active.path), device=resolve_device(device), kind=kind
        )
    except (OSError, ValueError):
        return None
    if tuple(checkpoint.config.tags) != tuple(config.tags):
        return None
    model = checkpoint.model
    if isinstance(model, Tagger):
        score = score_tagger(model, items, device=device).map
    else:
        assert isinstance(model, Segmenter)
        score = evaluate_segmenter(model, items, device=device).miou
    return None if np.isnan(score) else float(score)


def _record(
    session: Session,
    settings: Settings,
    *,
    project: Project,
    kind: ModelKind,
    path: Path,
    config: Any,
    snapshot: dict[str, Any],
    metrics: dict[str, Any],
    metric: str,
    eval_items: Sequence[Any],
    device: str,
) -> tuple[ModelVersion, bool, float | None]:
    """Register the candidate and promote it if it beats the active model.

    Both are scored on the candidate's evaluation items (the frozen gold set for the segmenter,
    the validation split for the tagger); the active model's recorded score is the fallback
    when it cannot be rescored. Returns the version, whether it was promoted, and the score of
    the active model it was held against.
    """
    current = active_model(session, project=project, kind=kind)
    rescored = _incumbent_score(settings, current, config, eval_items, device)
    recorded = current.metrics.get(metric) if current else None
    held_against = rescored if rescored is not None else recorded
    score = metrics.get(metric)
    promoted = current is None or (
        score is not None and (held_against is None or score > held_against)
    )
    version = register_model_version(
        session,
        project=project,
        kind=kind,
        path=store_checkpoint(settings, project.slug, path),
        config=config_to_dict(config),
        data_snapshot=snapshot,
        metrics={**metrics, "active_score_on_same_data": rescored},
    )
    if promoted:
        promote(session, version=version)
    return version, promoted, held_against


def _segmenter_start(
    session: Session,
    settings: Settings,
    project: Project,
    config: SegmenterConfig,
    options: TrainOptions,
    job: Job,
) -> tuple[Segmenter, str]:
    """The network training starts from, and its name: the active segmenter when
    ``options.from_active`` and its config is ``config`` (``active vN``); otherwise a fresh one
    (``scratch``, or ``init_weights`` in its encoder). The job log says which, and why."""
    active = None
    if options.from_active and options.init_weights is None:
        active = active_model(session, project=project, kind=ModelKind.SEGMENTER)
    if active is not None:
        name = f"active v{active.version}"
        try:
            checkpoint = load_checkpoint(model_file(settings, active.path), kind="segmenter")
        except (OSError, ValueError) as exc:
            log_job(job, f"the {name} segmenter cannot be read ({exc}): training from scratch")
        else:
            differs = checkpoint.config.differences(config)
            if not differs:
                log_job(job, f"starting from the {name} segmenter")
                assert isinstance(checkpoint.model, Segmenter)
                return checkpoint.model, name
            log_job(
                job,
                f"the {name} segmenter differs in {', '.join(differs)}: training from scratch",
            )
    seed_everything(options.seed)  # the initial weights too: the same data give the same model
    net = build_segmenter(config)
    _initial(net, options, job)
    return net, "init_weights" if options.init_weights else "scratch"


def _run(
    factory: sessionmaker[Session],
    settings: Settings,
    slug: str,
    kind: ModelKind,
    options: TrainOptions,
    body: Callable[[Session, Project, Job], TrainOutcome],
) -> TrainOutcome:
    """``body`` as a job under the project's lock; under torchrun on rank 0, the other ranks
    training with it (``ml.distributed.led_by_rank_zero``)."""

    def locked() -> TrainOutcome:
        with factory() as session:
            project = get_project(session, slug=slug)
            with (
                project_lock(session, settings, project),
                job_run(
                    session,
                    project=project,
                    kind=f"train-{kind.value}",
                    params=vars(options).copy(),
                ) as job,
                held_files(settings),  # its images and masks stay while it trains
            ):
                return body(session, project, job)

    return distributed.led_by_rank_zero(locked, device=options.device)


def _processes(batch_size: int, n_items: int) -> str:
    """What the job log says of a torchrun launch: ``; N processes, B/N images each per step``
    (B: the global batch, or all the items when they are fewer); nothing for one process."""
    world = distributed.world_size()
    if world == 1:
        return ""
    return f"; {world} processes, {-(-min(batch_size, n_items) // world)} images each per step"


ProgressHook = Callable[[Progress], None]
LOG_EVERY_S = 30.0  # a progress line at least this often, besides every tenth of the steps


def _progress(session: Session, job: Job, on_progress: ProgressHook | None) -> ProgressHook:
    """Pass each step on; log (and commit) the first, every tenth of the steps, the last, and
    at least one every ``LOG_EVERY_S`` seconds."""
    logged_at = [-LOG_EVERY_S]

    def report(p: Progress) -> None:
        if on_progress is not None:
            on_progress(p)
        due = p.step == 1 or p.step == p.steps or p.step % max(1, p.steps // 10) == 0
        if due or p.seconds - logged_at[0] >= LOG_EVERY_S:
            logged_at[0] = p.seconds
            log_job(
                job,
                f"step {p.step}/{p.steps}: loss {p.loss:.4f}, {p.seconds:.1f} s",
                progress=p.step / p.steps,
            )
            session.commit()

    return report


def _lead(settings: Settings, items: Sequence[Any], work: Callable[..., T], **local: Any) -> T:
    """``work(**local)``, the other ranks of a torchrun launch training with this one (on their
    own node, once they have its items' files: ``_on_this_node``)."""
    return distributed.lead(partial(_on_this_node, settings, items, work), **local)


def _on_this_node(
    settings: Settings, items: Sequence[Any], work: Callable[..., Any], **local: Any
) -> Any:
    """``work(**local)`` once the items' files are on this node: with object storage, rank 0's
    items name files in its cache, which another node of a torchrun launch fetches into its own
    (at the same place: the same data folder setting). Alone, or with the data folder: ``work``."""
    if settings.storage_url:
        storage = open_storage(settings)
        for item in items:
            masks = getattr(item, "masks", ())  # paths, or arrays already in memory
            for path in (item.image, *(masks if isinstance(masks, list | tuple) else ())):
                if not isinstance(path, Path) or path.is_file():
                    continue
                key = key_of_local(settings, path)
                if key is not None:
                    copy = storage.local_path(key)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    if copy != path:
                        shutil.copyfile(copy, path)  # rank 0's held link, here a copy
    return work(**local)


def _trained(
    job: Job,
    metric: str,
    score: float | None,
    active: float | None,
    result: TaggerResult | SegmenterResult,
) -> None:
    """Log the summary of a finished run: steps, seconds, and the candidate against the active."""
    log_job(
        job,
        f"trained {result.steps} steps in {result.seconds:.1f} s: {metric} {score} "
        f"(active model: {active})",
    )


def run_train_tagger(
    factory: sessionmaker[Session],
    settings: Settings,
    *,
    slug: str,
    options: TrainOptions,
    on_progress: Callable[[Progress], None] | None = None,
) -> TrainOutcome:
    def body(session: Session, project: Project, job: Job) -> TrainOutcome:
        vocab = vocabulary(session, project=project)
        train, val, snapshot = tagger_items(
            session, settings=settings, project=project, vocab=vocab
        )
        if len(train) < 2 or not vocab.tags:
            raise NotEnoughDataError("the tagger needs at least two tagged images to learn from")
        config = TaggerTrainConfig(
            model=TaggerConfig(
                tags=vocab.tags,
                parents=vocab.parents,
                backbone=options.backbone,
                input_size=input_size(options, ModelKind.TAGGER),
                output_stride=options.output_stride,
            ),
            steps=training_steps(options, len(train)),
            batch_size=options.batch_size,
            seed=options.seed,
        )
        seed_everything(options.seed)  # the initial weights too: the same data give the same model
        net = build_tagger(config.model)
        _initial(net, options, job)
        log_job(
            job,
            f"training on {snapshot['train']} images, validating on {snapshot['validation']}"
            + _processes(config.batch_size, len(train)),
        )
        session.commit()
        result = _lead(
            settings,
            [*train, *val],
            partial(train_tagger, config, train, val, device=options.device),
            progress=_progress(session, job, on_progress),
            model=net,
        )
        thresholds = [float(t) for t in np.asarray(result.thresholds)]
        path = models_dir(settings, project) / f"tagger-{uuid.uuid4().hex[:12]}.pt"
        save_checkpoint(path, result.model, config.model, extra={"thresholds": thresholds})
        metrics = result.metrics.to_dict()
        version, promoted, active_score = _record(
            session,
            settings,
            project=project,
            kind=ModelKind.TAGGER,
            path=path,
            config=config.model,
            snapshot=snapshot,
            metrics=metrics,
            metric="map",
            eval_items=val,
            device=options.device,
        )
        _trained(job, "map", metrics["map"], active_score, result)
        start = "init_weights" if options.init_weights else "scratch"
        finish_job(
            job,
            result={
                "version": version.version,
                "promoted": promoted,
                "map": metrics["map"],
                "active_score": active_score,
                "steps": result.steps,
                "seconds": result.seconds,
                "start": start,
            },
        )
        session.commit()
        return TrainOutcome(
            job.id,
            version.version,
            promoted,
            "map",
            metrics["map"],
            active_score,
            steps=result.steps,
            seconds=result.seconds,
            start=start,
        )

    return _run(factory, settings, slug, ModelKind.TAGGER, options, body)


def run_train_segmenter(
    factory: sessionmaker[Session],
    settings: Settings,
    *,
    slug: str,
    options: TrainOptions,
    on_progress: Callable[[Progress], None] | None = None,
) -> TrainOutcome:
    def body(session: Session, project: Project, job: Job) -> TrainOutcome:
        # The current masks of unfinished targets, composed for this training only.
        folder = work_dir(settings, project)
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="progress-", dir=folder) as progress:
            return trained(session, project, job, Path(progress))

    def trained(session: Session, project: Project, job: Job, progress: Path) -> TrainOutcome:
        vocab = vocabulary(session, project=project)
        started = time.perf_counter()
        train, evaluation, snapshot = segmenter_items(
            session, settings=settings, project=project, vocab=vocab, progress_dir=progress
        )
        if snapshot.get("in_progress_masks"):
            log_job(
                job,
                f"composed the current masks of {snapshot['in_progress_masks']} targets still "
                f"collecting in {time.perf_counter() - started:.1f} s",
            )
        if not train:
            raise NotEnoughDataError(
                "the segmenter needs complete masks or control ground truth to learn from"
            )
        config = SegmenterTrainConfig(
            model=SegmenterConfig(
                tags=vocab.tags,
                encoder=options.backbone,
                input_size=input_size(options, ModelKind.SEGMENTER),
            ),
            steps=training_steps(options, len(train)),
            batch_size=options.batch_size,
            seed=options.seed,
        )
        net, start = _segmenter_start(session, settings, project, config.model, options, job)
        log_job(
            job,
            f"training {config.steps} steps at {config.model.input_size} px on {len(train)} "
            f"images, evaluating on {len(evaluation)}" + _processes(config.batch_size, len(train)),
        )
        session.commit()
        result = _lead(
            settings,
            [*train, *evaluation],
            partial(train_segmenter, config, train, evaluation, device=options.device),
            progress=_progress(session, job, on_progress),
            model=net,
        )
        path = models_dir(settings, project) / f"segmenter-{uuid.uuid4().hex[:12]}.pt"
        save_checkpoint(path, result.model, config.model)
        scores = result.metrics
        miou = None if np.isnan(scores.miou) else float(scores.miou)
        metrics: dict[str, Any] = {
            "miou": miou,
            "boundary_f1": None
            if np.isnan(scores.mean_boundary_f1)
            else float(scores.mean_boundary_f1),
            "iou": [None if np.isnan(v) else float(v) for v in scores.iou],
        }
        version, promoted, active_score = _record(
            session,
            settings,
            project=project,
            kind=ModelKind.SEGMENTER,
            path=path,
            config=config.model,
            snapshot=snapshot,
            metrics=metrics,
            metric="miou",
            eval_items=evaluation,
            device=options.device,
        )
        _trained(job, "miou", miou, active_score, result)
        finish_job(
            job,
            result={
                "version": version.version,
                "promoted": promoted,
                **metrics,
                "active_score": active_score,
                "steps": result.steps,
                "seconds": result.seconds,
                "start": start,
            },
        )
        session.commit()
        return TrainOutcome(
            job.id,
            version.version,
            promoted,
            "miou",
            miou,
            active_score,
            steps=result.steps,
            seconds=result.seconds,
            start=start,
        )

    return _run(factory, settings, slug, ModelKind.SEGMENTER, options, body)
