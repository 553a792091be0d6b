"""Training jobs: the tagger and the segmenter of a project, recorded as jobs and versions.

Each step commits on its own (the job row says how far it got). The checkpoint is written to a
temporary file and renamed before its model version is recorded; a version is promoted only if
there is no active one or it scores better than the active one on the same validation data.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.jobs.datasets import segmenter_items, tagger_items, vocabulary
from app.jobs.lock import models_dir, project_lock
from app.models import Job, ModelKind, ModelVersion, Project
from app.services.job import finish_job, job_run, log_job
from app.services.model_version import active_model, promote, register_model_version
from app.services.project import get_project
from ml.checkpoints import config_to_dict, load_checkpoint, load_pretrained, save_checkpoint
from ml.segmenter import Segmenter, SegmenterConfig, build_segmenter
from ml.tagger import Tagger, TaggerConfig, build_tagger
from ml.train import (
    Progress,
    SegmenterTrainConfig,
    TaggerTrainConfig,
    evaluate_segmenter,
    resolve_device,
    score_tagger,
    train_segmenter,
    train_tagger,
)


class NotEnoughDataError(ValueError):
    """There is nothing (or too little) to learn from yet; the message says what is missing."""


@dataclass(frozen=True)
class TrainOptions:
    epochs: int = 10
    size: int = 256
    backbone: str = "resnet18"  # timm name for the tagger, smp encoder for the segmenter
    batch_size: int = 16
    device: str = "auto"
    seed: int = 0
    # Tagger only: dilate the last stages so that Grad-CAM maps are finer than the 3x3 grid.
    output_stride: int | None = None
    # A local weights file for the backbone / encoder (nothing is ever downloaded).
    init_weights: str | None = None


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
    score: float | None
    active_score: float | None


def _incumbent_score(
    active: ModelVersion | None, config: Any, items: Sequence[Any], device: str
) -> float | None:
    """The active model's score on the candidate's evaluation items, or None when the two
    cannot be compared that way (no active model, another vocabulary, no items, a lost file)."""
    if active is None or not items:
        return None
    kind = "tagger" if isinstance(config, TaggerConfig) else "segmenter"
    try:
        checkpoint = load_checkpoint(active.path, device=resolve_device(device), kind=kind)
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
    rescored = _incumbent_score(current, config, eval_items, device)
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
        path=path,
        config=config_to_dict(config),
        data_snapshot=snapshot,
        metrics={**metrics, "active_score_on_same_data": rescored},
    )
    if promoted:
        promote(session, version=version)
    return version, promoted, held_against


def _run(
    factory: sessionmaker[Session],
    settings: Settings,
    slug: str,
    kind: ModelKind,
    options: TrainOptions,
    body: Callable[[Session, Project, Job], TrainOutcome],
) -> TrainOutcome:
    with factory() as session:
        project = get_project(session, slug=slug)
        with (
            project_lock(session, settings, project),
            job_run(
                session, project=project, kind=f"train-{kind.value}", params=vars(options).copy()
            ) as job,
        ):
            return body(session, project, job)


ProgressHook = Callable[[Progress], None]


def _progress(session: Session, job: Job, on_progress: ProgressHook | None) -> ProgressHook:
    def report(p: Progress) -> None:
        if on_progress is not None:
            on_progress(p)
        if p.epoch_done:
            log_job(
                job, f"epoch {p.epoch}/{p.epochs}: loss {p.loss:.4f}", progress=p.epoch / p.epochs
            )
            session.commit()

    return report


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
                input_size=options.size,
                output_stride=options.output_stride,
            ),
            epochs=options.epochs,
            batch_size=options.batch_size,
            seed=options.seed,
        )
        net = build_tagger(config.model)
        _initial(net, options, job)
        log_job(
            job, f"training on {snapshot['train']} images, validating on {snapshot['validation']}"
        )
        session.commit()
        result = train_tagger(
            config,
            train,
            val,
            device=options.device,
            progress=_progress(session, job, on_progress),
            model=net,
        )
        thresholds = [float(t) for t in np.asarray(result.thresholds)]
        path = models_dir(settings, project) / f"tagger-{uuid.uuid4().hex[:12]}.pt"
        save_checkpoint(path, result.model, config.model, extra={"thresholds": thresholds})
        metrics = result.metrics.to_dict()
        version, promoted, active_score = _record(
            session,
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
        finish_job(
            job, result={"version": version.version, "promoted": promoted, "map": metrics["map"]}
        )
        session.commit()
        return TrainOutcome(job.id, version.version, promoted, "map", metrics["map"], active_score)

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
        vocab = vocabulary(session, project=project)
        train, evaluation, snapshot = segmenter_items(
            session, settings=settings, project=project, vocab=vocab
        )
        if not train:
            raise NotEnoughDataError(
                "the segmenter needs complete masks or control ground truth to learn from"
            )
        config = SegmenterTrainConfig(
            model=SegmenterConfig(
                tags=vocab.tags, encoder=options.backbone, input_size=options.size
            ),
            epochs=options.epochs,
            batch_size=options.batch_size,
            seed=options.seed,
        )
        net = build_segmenter(config.model)
        _initial(net, options, job)
        log_job(job, f"training on {len(train)} images, evaluating on {len(evaluation)}")
        session.commit()
        result = train_segmenter(
            config,
            train,
            evaluation,
            device=options.device,
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
        finish_job(job, result={"version": version.version, "promoted": promoted, **metrics})
        session.commit()
        return TrainOutcome(job.id, version.version, promoted, "miou", miou, active_score)

    return _run(factory, settings, slug, ModelKind.SEGMENTER, options, body)
