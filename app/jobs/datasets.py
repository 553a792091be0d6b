"""What the models learn from, read out of the database.

The tagger learns the tags that imports and curators confirmed. The segmenter learns complete
masks (consensus and curator masks, soft masks weighting their pixels by confidence), the
ground truth of control targets and, with the project's ``train_on_progress``, the current mask
of each target still collecting where its squares are settled (``settled_soft``: an open
square's pixels weigh nothing, so that its votes do not come back as the model's prior). The
ground truth of evaluation targets is the frozen gold set: every image holding one is kept for
evaluation and never trained on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.models import (
    SETTLED_BY,
    Cell,
    CellStatus,
    Image,
    ImageTag,
    ImageTagSource,
    ImageTagStatus,
    MaskSource,
    MaskVersion,
    Project,
    Tag,
    Target,
    TargetState,
)
from app.services.files import mask_file
from app.services.image import image_path
from app.services.masks.composition import settled_soft
from app.storage import atomic_write_bytes, encode_mask_png
from ml.data import SegmenterItem, TaggerItem

VALIDATION_SHARE = 0.2


@dataclass(frozen=True)
class Vocabulary:
    tags: tuple[str, ...]
    parents: tuple[int, ...]
    ids: tuple[int, ...]  # tag row ids, in output order


def vocabulary(session: Session, *, project: Project) -> Vocabulary:
    tags = list(session.scalars(select(Tag).where(Tag.project_id == project.id).order_by(Tag.id)))
    column = {t.id: i for i, t in enumerate(tags)}
    return Vocabulary(
        tags=tuple(t.name for t in tags),
        parents=tuple(column.get(t.parent_id, -1) if t.parent_id else -1 for t in tags),
        ids=tuple(t.id for t in tags),
    )


def is_validation(image: Image) -> bool:
    """A stable split by content: an image stays on its side whatever else is imported."""
    digest = hashlib.sha256(f"split:{image.sha256}".encode()).digest()
    return digest[0] / 256 < VALIDATION_SHARE


def tagger_items(
    session: Session, *, settings: Settings, project: Project, vocab: Vocabulary
) -> tuple[list[TaggerItem], list[TaggerItem], dict[str, int]]:
    """Train and validation items (image, multi-hot of confirmed tags), and a data snapshot."""
    column = {tag_id: i for i, tag_id in enumerate(vocab.ids)}
    labels: dict[int, np.ndarray] = {}
    images = {i.id: i for i in session.scalars(select(Image).where(Image.project_id == project.id))}
    rows = session.execute(
        select(ImageTag.image_id, ImageTag.tag_id)
        .join(Image, Image.id == ImageTag.image_id)
        .where(
            Image.project_id == project.id,
            ImageTag.source.in_([ImageTagSource.IMPORT, ImageTagSource.CURATOR]),
            ImageTag.status == ImageTagStatus.ACTIVE,
        )
    )
    for image_id, tag_id in rows:
        labels.setdefault(image_id, np.zeros(len(vocab.tags), np.float32))[column[tag_id]] = 1
    train: list[TaggerItem] = []
    val: list[TaggerItem] = []
    for image_id, multi_hot in sorted(labels.items()):
        image = images[image_id]
        item = TaggerItem(image=image_path(settings, image), labels=multi_hot)
        (val if is_validation(image) else train).append(item)
    return train, val, {"images": len(labels), "train": len(train), "validation": len(val)}


def _mask_rows(session: Session, project: Project) -> list[tuple[Target, MaskVersion]]:
    """The newest usable mask of each target, and every evaluation truth."""
    rows = session.execute(
        select(Target, MaskVersion)
        .join(MaskVersion, MaskVersion.target_id == Target.id)
        .where(Target.project_id == project.id)
        .order_by(Target.id, MaskVersion.version)
    ).all()
    newest: dict[int, tuple[Target, MaskVersion]] = {}
    for target, version in rows:
        usable = version.source == MaskSource.GROUND_TRUTH or (
            target.state == TargetState.COMPLETE
            and version.source in (MaskSource.CONSENSUS, MaskSource.CURATOR)
        )
        if usable:
            newest[target.id] = (target, version)
    return list(newest.values())


def _in_progress(session: Session, project: Project, done: set[int]) -> list[Target]:
    """Targets still collecting, none of ``done``, with a cell settled (``SETTLED_BY``)."""
    settled = (
        select(Cell.target_id)
        .where(Cell.status == CellStatus.RETIRED, Cell.retire_reason.in_(SETTLED_BY))
        .distinct()
    )
    targets = session.scalars(
        select(Target)
        .where(
            Target.project_id == project.id,
            Target.state == TargetState.COLLECTING,
            Target.id.in_(settled),
        )
        .order_by(Target.id)
    )
    return [t for t in targets if t.id not in done]


def segmenter_items(
    session: Session,
    *,
    settings: Settings,
    project: Project,
    vocab: Vocabulary,
    progress_dir: Path | None = None,
) -> tuple[list[SegmenterItem], list[SegmenterItem], dict[str, int]]:
    """Train items (complete masks, control truth) and the frozen evaluation items. With a
    ``progress_dir`` and the project's ``train_on_progress``, the current masks of targets
    still collecting are composed into it (soft PNGs) and trained on too."""
    column = {tag_id: i for i, tag_id in enumerate(vocab.ids)}
    train_planes: dict[int, list[Path | None]] = {}
    eval_planes: dict[int, list[Path | None]] = {}
    rows = _mask_rows(session, project)
    for target, version in rows:
        frozen = version.source == MaskSource.GROUND_TRUTH and not target.control
        if version.source == MaskSource.GROUND_TRUTH and target.state == TargetState.SEEDED:
            frozen = True  # never opened, so never shown: keep it for evaluation
        planes = eval_planes if frozen else train_planes
        path = version.soft_path or version.hard_path
        planes.setdefault(target.image_id, [None] * len(vocab.tags))[column[target.tag_id]] = (
            mask_file(settings, path)
        )
    images = {i.id: i for i in session.scalars(select(Image).where(Image.project_id == project.id))}

    def items(planes: dict[int, list[Path | None]]) -> list[SegmenterItem]:
        return [
            SegmenterItem(image=image_path(settings, images[i]), masks=p)
            for i, p in sorted(planes.items())
        ]

    held_out = set(eval_planes)
    in_progress = 0
    if progress_dir is not None and project.setting("train_on_progress"):
        done = {target.id for target, _ in rows}
        for target in _in_progress(session, project, done):
            if target.image_id in held_out:
                continue
            image = images[target.image_id]
            soft = settled_soft(session, settings=settings, target=target, image=image)
            if soft is None:
                continue
            written = progress_dir / f"target-{target.id}.png"
            atomic_write_bytes(written, encode_mask_png(soft))
            tag_planes = train_planes.setdefault(target.image_id, [None] * len(vocab.tags))
            tag_planes[column[target.tag_id]] = written
            in_progress += 1
    train = items({i: p for i, p in train_planes.items() if i not in held_out})
    evaluation = items(eval_planes)
    snapshot = {"train_images": len(train), "eval_images": len(evaluation)}
    if in_progress:
        snapshot["in_progress_masks"] = in_progress
    return train, evaluation, snapshot
