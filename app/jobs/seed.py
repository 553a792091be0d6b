"""Seeding: the active tagger tags new images, and its Grad-CAM says where to ask first.

For every image the active tagger has not seen, the job stores the tagger's embedding, writes
classifier tags above their tuned thresholds (imported and curated tags are left as they are),
computes a Grad-CAM heatmap per predicted tag and reduces it to a prior per level-1 cell. Targets
are created for new (image, tag) pairs and opened with that prior; open targets whose level-1
cells have no votes yet get the prior too. A target's priority grows with the heatmap's
contrast, so images with strong heatmaps are asked about first; its windows' values also weigh
how sure we are the tag is there at all (``app.services.target.tag_beliefs``: 1 for tags people
gave or confirmed, else the tagger's probability updated by the crowd's first answers).

The heatmap-to-probability map is calibrated (Platt, or isotonic once there are thousands of
cells: ``ml.cam.calibration_method``) on the cells of masks the project
already trusts (control ground truth and complete masks) when there are enough of them;
otherwise the heat is clipped and used as a probability.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.models import (
    Cell,
    Consensus,
    Image,
    ImageEmbedding,
    ImageTag,
    ImageTagSource,
    ModelKind,
    ModelVersion,
    Project,
    Tag,
    Target,
    TargetState,
)
from app.services.crowd.opening import load_truth, open_target
from app.services.errors import NotFoundError
from app.services.files import model_file
from app.services.image import image_path
from app.services.job import finish_job, job_run
from app.services.model_version import active_model
from app.services.project import get_project, square_cells
from app.services.target import ensure_target
from ml.aggregation.grid import level_coverage
from ml.calibration import Calibrator, fit_calibrator
from ml.cam import calibration_method, cell_heat, heat_log_odds, tag_cams, to_image_size
from ml.checkpoints import load_checkpoint
from ml.data import load_images
from ml.tagger import Tagger, predict_tags
from ml.train import resolve_device

BATCH = 16
MIN_CALIBRATION_CELLS = 27


@dataclass
class Pair:
    """One predicted (image, tag) with its level-1 cell heat. Shape: heat ``(9,)``."""

    image: Image
    tag: Tag
    probability: float
    heat: np.ndarray


@dataclass
class SeedReport:
    images: int = 0
    tags_written: int = 0
    targets_created: int = 0
    priors_set: int = 0
    calibrated: bool = False
    pairs: list[Pair] = field(default_factory=list, repr=False)
    image_ids: list[int] = field(default_factory=list, repr=False)  # the images tagged


def _unseen_images(session: Session, project: Project, version: ModelVersion) -> list[Image]:
    seen = select(ImageEmbedding.image_id).where(ImageEmbedding.model_version_id == version.id)
    return list(
        session.scalars(
            select(Image)
            .where(Image.project_id == project.id, Image.id.not_in(seen))
            .order_by(Image.id)
        )
    )


def _write_tag(session: Session, image: Image, tag: Tag, p: float, version: ModelVersion) -> None:
    row = session.scalar(
        select(ImageTag).where(
            ImageTag.image_id == image.id,
            ImageTag.tag_id == tag.id,
            ImageTag.source == ImageTagSource.CLASSIFIER,
        )
    )
    if row is None:
        row = ImageTag(image_id=image.id, tag_id=tag.id, source=ImageTagSource.CLASSIFIER)
        session.add(row)
    row.probability, row.model_version_id = p, version.id


def _tag_batch(
    session: Session,
    settings: Settings,
    model: Tagger,
    thresholds: np.ndarray,
    tags: list[Tag],
    images: list[Image],
    version: ModelVersion,
    square: bool,
) -> list[Pair]:
    size = model.config.input_size
    pixels = load_images([image_path(settings, i) for i in images], size)  # (B, 3, S, S)
    prediction = predict_tags(model, pixels, thresholds=thresholds)
    chosen = [[int(c) for c in np.flatnonzero(row)] for row in prediction.predicted]
    heatmaps = tag_cams(model, pixels, chosen)
    pairs = []
    for image, picked, heat, probs, emb in zip(
        images, chosen, heatmaps, prediction.probabilities, prediction.embeddings, strict=True
    ):
        session.add(
            ImageEmbedding(
                image_id=image.id,
                model_version_id=version.id,
                dim=int(emb.shape[0]),
                vector=np.asarray(emb, dtype=np.float32).tobytes(),
            )
        )
        if not picked:
            continue
        full = to_image_size(heat, image.height, image.width)
        for k, column in enumerate(picked):
            p = float(probs[column])
            _write_tag(session, image, tags[column], p, version)
            pairs.append(
                Pair(image, tags[column], p, cell_heat(full[k], level=1, square=square).ravel())
            )
    return pairs


def _calibrator(
    session: Session, settings: Settings, pairs: list[Pair], square: bool
) -> Calibrator | None:
    """Fit heat -> probability on the cells of trusted masks (never the frozen ones)."""
    heat, labels = [], []
    for pair in pairs:
        target = session.scalar(
            select(Target).where(Target.image_id == pair.image.id, Target.tag_id == pair.tag.id)
        )
        if target is None or not target.control:
            continue
        mask = load_truth(session, settings, target)
        if mask is not None:
            heat.append(pair.heat)
            labels.append(level_coverage(mask, 1, square=square).ravel() > 0)
    if sum(len(h) for h in heat) < MIN_CALIBRATION_CELLS:
        return None
    y = np.concatenate(labels)
    if y.all() or not y.any():
        return None
    return fit_calibrator(np.concatenate(heat), y, calibration_method(y.size))


def _apply(
    session: Session, settings: Settings, project: Project, pair: Pair, prior: np.ndarray
) -> tuple[bool, bool]:
    """Create or update the pair's target. Returns (created, prior set)."""
    target, created = ensure_target(session, image=pair.image, tag=pair.tag)
    contrast = float(pair.heat.max() - pair.heat.mean())
    target.priority = pair.tag.priority * (0.5 + contrast)
    if target.state == TargetState.SEEDED:
        open_target(
            session,
            settings=settings,
            project=project,
            target=target,
            image=pair.image,
            root_prior=[float(v) for v in prior],
        )
        return created, True
    if target.state != TargetState.COLLECTING:
        return created, False
    cells = session.execute(
        select(Cell, Consensus)
        .join(Consensus, Consensus.cell_id == Cell.id)
        .where(Cell.target_id == target.id, Cell.level == 1)
        .order_by(Cell.row, Cell.col)
    ).all()
    if len(cells) != 9 or any(c.n_votes for _, c in cells) or target.control:
        return created, False
    for (cell, consensus), cam in zip(cells, prior, strict=True):
        # Grad-CAM is the cell's rate; the segmenter's evidence (a loop round's) stays on it.
        value = float(cam) + cell.model_logodds
        cell.prior_logodds = value
        consensus.logodds, consensus.posterior = value, float(1 / (1 + np.exp(-value)))
    return created, True


def run_seed(
    factory: sessionmaker[Session],
    settings: Settings,
    *,
    slug: str,
    device: str = "auto",
    on_batch: Callable[[int, int], None] | None = None,
) -> SeedReport:
    """Tag unseen images with the active tagger and seed targets from its Grad-CAM."""
    with factory() as session:
        project = get_project(session, slug=slug)
        version = active_model(session, project=project, kind=ModelKind.TAGGER)
        if version is None:
            raise NotFoundError(
                f"project {slug!r} has no active tagger: run `tessera train tagger` first"
            )
        with job_run(
            session, project=project, kind="seed", params={"version": version.version}
        ) as job:
            report = _seed(session, settings, project, version, device, on_batch)
            result = {k: v for k, v in vars(report).items() if k not in ("pairs", "image_ids")}
            finish_job(job, result=result)
            session.commit()
    return report


def _seed(
    session: Session,
    settings: Settings,
    project: Project,
    version: ModelVersion,
    device: str,
    on_batch: Callable[[int, int], None] | None,
) -> SeedReport:
    checkpoint = load_checkpoint(
        model_file(settings, version.path), device=resolve_device(device), kind="tagger"
    )
    model = checkpoint.model
    assert isinstance(model, Tagger)
    by_name = {t.name: t for t in session.scalars(select(Tag).where(Tag.project_id == project.id))}
    missing = [name for name in model.config.tags if name not in by_name]
    if missing:
        raise NotFoundError(f"the tagger knows tags the project lacks: {missing[:5]}")
    tags = [by_name[name] for name in model.config.tags]
    thresholds = np.asarray(checkpoint.extra.get("thresholds") or [0.5] * len(tags))
    images = _unseen_images(session, project, version)
    report = SeedReport(images=len(images), image_ids=[i.id for i in images])
    for start in range(0, len(images), BATCH):
        batch = images[start : start + BATCH]
        report.pairs += _tag_batch(
            session, settings, model, thresholds, tags, batch, version, square_cells(project)
        )
        if on_batch is not None:
            on_batch(min(start + BATCH, len(images)), len(images))
    calibrator = _calibrator(session, settings, report.pairs, square_cells(project))
    report.calibrated = calibrator is not None
    for pair in report.pairs:
        created, prior_set = _apply(
            session, settings, project, pair, heat_log_odds(pair.heat, calibrator)
        )
        report.targets_created += created
        report.priors_set += prior_set
    report.tags_written = len(report.pairs)
    session.flush()
    return report
