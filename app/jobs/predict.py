"""Prediction: the active segmenter draws a soft mask for every open target.

Each prediction is stored as a mask version from the model (8-bit soft PNG and its hard mask),
so curators can compare it with the crowd, and the learning loop can turn it into a prior.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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
    column = {name: i for i, name in enumerate(model.config.tags)}
    rows = session.execute(
        select(Target, Image, Tag.name)
        .join(Image, Image.id == Target.image_id)
        .join(Tag, Tag.id == Target.tag_id)
        .where(
            Target.project_id == project_id,
            Target.state.in_([TargetState.SEEDED, TargetState.COLLECTING]),
        )
        .order_by(Image.id)
    ).all()
    by_image: dict[int, tuple[Image, list[tuple[Target, int]]]] = {}
    for target, image, name in rows:
        if name in column:
            by_image.setdefault(image.id, (image, []))[1].append((target, column[name]))
    store, report = mask_store(settings), PredictReport(images=len(by_image))
    groups = list(by_image.values())
    for start in range(0, len(groups), BATCH):
        batch = groups[start : start + BATCH]
        pixels = load_images(
            [image_path(settings, img) for img, _ in batch], model.config.input_size
        )
        probs = predict_masks(model, pixels)  # (B, T, S, S)
        for (image, targets), planes in zip(batch, probs, strict=True):
            full = F.interpolate(
                planes[None], size=(image.height, image.width), mode="bilinear", align_corners=False
            )[0].clamp(0, 1)
            for target, k in targets:
                soft = full[k].numpy()
                add_mask_version(
                    session,
                    target=target,
                    mask=soft >= 0.5,
                    soft=soft,
                    source=MaskSource.MODEL,
                    store=store,
                    written=[],
                )
                report.masks += 1
        if on_batch is not None:
            on_batch(min(start + BATCH, len(groups)), len(groups))
    session.flush()
    return report
