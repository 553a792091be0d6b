"""Prediction: the active segmenter draws a soft mask for every open target.

Each prediction is stored as a mask version from the model (8-bit soft PNG and its hard mask),
so curators can compare it with the crowd, and the learning loop can turn it into a prior.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch.nn.functional as F
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.models import Image, MaskSource, ModelKind, Tag, Target, TargetState
from app.services.errors import NotFoundError
from app.services.files import mask_store, model_file
from app.services.image import image_path
from app.services.job import finish_job, job_run
from app.services.model_version import active_model
from app.services.project import get_project
from app.services.target import add_mask_version
from app.storage import FileStore
from ml.checkpoints import load_checkpoint
from ml.data import load_images
from ml.segmenter import Segmenter, predict_masks
from ml.train import resolve_device

BATCH = 8


@dataclass
class PredictReport:
    images: int = 0
    masks: int = 0


def run_predict(
    factory: sessionmaker[Session],
    settings: Settings,
    *,
    slug: str,
    device: str = "auto",
    on_batch: Callable[[int, int], None] | None = None,
) -> PredictReport:
    with factory() as session:
        project = get_project(session, slug=slug)
        version = active_model(session, project=project, kind=ModelKind.SEGMENTER)
        if version is None:
            raise NotFoundError(
                f"project {slug!r} has no active segmenter: run `tessera train segmenter` first"
            )
        with job_run(
            session, project=project, kind="predict", params={"version": version.version}
        ) as job:
            checkpoint = model_file(settings, version.path)
            report = _predict(session, settings, checkpoint, device, project.id, on_batch)
            finish_job(job, result=vars(report))
            session.commit()
    return report


def predicted_targets(session: Session, project_id: int) -> list[tuple[Target, Image, str]]:
    """The targets the segmenter draws a mask of: every seeded or collecting one, with its image
    and tag name."""
    rows = session.execute(
        select(Target, Image, Tag.name)
        .join(Image, Image.id == Target.image_id)
        .join(Tag, Tag.id == Target.tag_id)
        .where(
            Target.project_id == project_id,
            Target.state.in_([TargetState.SEEDED, TargetState.COLLECTING]),
        )
        .order_by(Image.id, Target.id)
    ).all()
    return [(target, image, name) for target, image, name in rows]


def target_planes(
    settings: Settings,
    model: Segmenter,
    targets: Sequence[tuple[Target, Image, str]],
    *,
    on_batch: Callable[[int, int], None] | None = None,
) -> Iterator[tuple[Target, np.ndarray]]:
    """The model's probability map of each target at its image's size, one prediction per image
    (batched); targets of tags the model does not know are left out.

    Shape:
        yields ``(target, (H, W) float32 in [0, 1])``.
    """
    column = {name: i for i, name in enumerate(model.config.tags)}
    by_image: dict[int, tuple[Image, list[tuple[Target, int]]]] = {}
    for target, image, name in targets:
        if name in column:
            by_image.setdefault(image.id, (image, []))[1].append((target, column[name]))
    groups = list(by_image.values())
    for start in range(0, len(groups), BATCH):
        batch = groups[start : start + BATCH]
        pixels = load_images(
            [image_path(settings, img) for img, _ in batch], model.config.input_size
        )
        probs = predict_masks(model, pixels)  # (B, T, S, S)
        for (image, group), planes in zip(batch, probs, strict=True):
            full = F.interpolate(
                planes[None].float(),
                size=(image.height, image.width),
                mode="bilinear",
                align_corners=False,
            )[0].clamp(0, 1)  # (T, H, W)
            for target, k in group:
                yield target, full[k].numpy()
        if on_batch is not None:
            on_batch(min(start + BATCH, len(groups)), len(groups))


def store_prediction(
    session: Session, *, target: Target, soft: np.ndarray, store: FileStore
) -> None:
    """Store the model's soft mask of a target (and its hard mask at 0.5) as a model version."""
    add_mask_version(
        session,
        target=target,
        mask=soft >= 0.5,
        soft=soft,
        source=MaskSource.MODEL,
        store=store,
        written=[],
    )


def _predict(
    session: Session,
    settings: Settings,
    path: Path,
    device: str,
    project_id: int,
    on_batch: Callable[[int, int], None] | None,
) -> PredictReport:
    model = load_checkpoint(path, device=resolve_device(device), kind="segmenter").model
    assert isinstance(model, Segmenter)
    store, report = mask_store(settings), PredictReport()
    images: set[int] = set()
    targets = predicted_targets(session, project_id)
    for target, soft in target_planes(settings, model, targets, on_batch=on_batch):
        store_prediction(session, target=target, soft=soft, store=store)
        images.add(target.image_id)
        report.masks += 1
    report.images = len(images)
    session.flush()
    return report
