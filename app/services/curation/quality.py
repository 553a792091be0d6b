"""Mask quality against human effort: the curve a project exists to push up and to the left.

The measurement is the campaign benchmark's (``bench/campaign.py``): every evaluation target (a
target with ground truth that is never served as gold nor trained on) has its mask composed now
(``compose_target``: the finest cells, the image inside the border cells, the model where there
is one), scored by IoU against its truth (an empty truth and an empty mask agree), and averaged,
per tag and over all tags; the x axis is the human-seconds spent so far per evaluation target
(every answer counts, only evaluation targets divide). ``record_quality`` stores one reading as
``QualitySnapshot`` rows; the learning loop's jobs record one each round and the dashboard draws
the series.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.models import Image, MaskSource, MaskVersion, Project, QualitySnapshot, Tag, Target
from app.services.crowd.opening import load_truth
from app.services.dashboard import human_seconds
from app.services.masks.composition import compose_target, load_pixels
from ml.aggregation.dense import mask_iou
from ml.composition import Composed

# Composing a mask takes 0.05-0.25 s, and about 1.3 s where a poor first model leaves most of a
# 600x900 image uncertain (measured in the retrain tests): a reading of a large project scores
# an even sample of its evaluation targets (every k-th by id), a few minutes at most.
MAX_QUALITY_TARGETS = 300


@dataclass(frozen=True)
class QualityReading:
    human_seconds: float  # per evaluation target
    mean_iou: float | None  # over every evaluation target; None without any
    by_tag: dict[int, tuple[int, float]]  # tag id -> (targets, mean IoU)


def evaluation_targets(session: Session, *, project: Project) -> list[Target]:
    """The project's targets with a ground truth that is held out (not control)."""
    return list(
        session.scalars(
            select(Target)
            .where(
                Target.project_id == project.id,
                Target.control.is_(False),
                select(MaskVersion.id)
                .where(
                    MaskVersion.target_id == Target.id,
                    MaskVersion.source == MaskSource.GROUND_TRUTH,
                )
                .exists(),
            )
            .order_by(Target.id)
        )
    )


def measure_quality(
    session: Session, *, settings: Settings, project: Project, limit: int = MAX_QUALITY_TARGETS
) -> QualityReading:
    """Score every evaluation target's mask as composed now (see the module docstring); of more
    than ``limit``, an even sample by id."""
    every_target = evaluation_targets(session, project=project)
    step = -(-len(every_target) // max(limit, 1)) if every_target else 1
    targets = every_target[::step]
    scores: dict[int, list[float]] = defaultdict(list)
    pixels: dict[int, np.ndarray] = {}
    composed: dict[int, Composed] = {}  # each target once, a union's parts included
    for target in sorted(targets, key=lambda t: (t.image_id, t.id)):
        truth = load_truth(session, settings, target)
        image = session.get(Image, target.image_id)
        if truth is None or image is None:
            continue
        if image.id not in pixels:
            pixels.clear()  # one image's pixels and masks at a time
            composed.clear()
            pixels[image.id] = load_pixels(settings, image)
        mask = compose_target(
            session,
            settings=settings,
            target=target,
            image=image,
            pixels=pixels[image.id],
            composed=composed,
        )
        scores[target.tag_id].append(mask_iou(mask.hard, truth))
    every = [s for tag_scores in scores.values() for s in tag_scores]
    return QualityReading(
        human_seconds=human_seconds(session, project=project) / max(len(every_target), 1),
        mean_iou=float(np.mean(every)) if every else None,
        by_tag={tag: (len(v), float(np.mean(v))) for tag, v in scores.items()},
    )


def record_quality(
    session: Session, *, settings: Settings, project: Project, limit: int = MAX_QUALITY_TARGETS
) -> QualityReading | None:
    """Measure and store one reading (nothing without evaluation targets; ``limit``: see
    ``measure_quality``)."""
    reading = measure_quality(session, settings=settings, project=project, limit=limit)
    if reading.mean_iou is None:
        return None
    rows: list[tuple[int | None, int, float]] = [
        (None, sum(n for n, _ in reading.by_tag.values()), reading.mean_iou)
    ]
    rows += [(tag, n, mean) for tag, (n, mean) in reading.by_tag.items()]
    for tag_id, n, mean in rows:
        session.add(
            QualitySnapshot(
                project_id=project.id,
                tag_id=tag_id,
                human_seconds=reading.human_seconds,
                mean_iou=mean,
                targets=n,
            )
        )
    session.flush()
    return reading


def quality_series(
    session: Session, *, project: Project, tags: int = 5
) -> dict[str, list[tuple[float, float]]]:
    """(human-seconds per evaluation target, mean IoU) per reading: over all tags, and for the
    ``tags`` tags with the most evaluation targets."""
    rows = session.execute(
        select(QualitySnapshot, Tag.name)
        .join(Tag, Tag.id == QualitySnapshot.tag_id, isouter=True)
        .where(QualitySnapshot.project_id == project.id)
        .order_by(QualitySnapshot.taken_at, QualitySnapshot.id)
    ).all()
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    size: dict[str, int] = {}
    for snap, name in rows:
        key = "all tags" if snap.tag_id is None else str(name)
        series[key].append((snap.human_seconds, snap.mean_iou))
        size[key] = snap.targets
    biggest = sorted((k for k in series if k != "all tags"), key=lambda k: (-size[k], k))[:tags]
    return {k: series[k] for k in ["all tags", *biggest] if k in series}
