"""Consensus: the current posterior that a cell contains its tag, and the mask versions."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Float, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, utcnow
from app.models._types import str_enum


class Consensus(Base):
    """One row per cell: updated online on every submission, reconciled by the EM pass."""

    __tablename__ = "consensus"

    cell_id: Mapped[int] = mapped_column(
        ForeignKey("cells.id", ondelete="CASCADE"), primary_key=True
    )
    posterior: Mapped[float] = mapped_column(Float, default=0.5)
    logodds: Mapped[float] = mapped_column(Float, default=0.0)
    n_votes: Mapped[int] = mapped_column(Integer, default=0)
    n_yes: Mapped[int] = mapped_column(Integer, default=0)
    method: Mapped[str] = mapped_column(String(32), default="online")
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class MaskSource(enum.StrEnum):
    CONSENSUS = "consensus"
    CURATOR = "curator"
    GROUND_TRUTH = "ground_truth"
    MODEL = "model"


class MaskVersion(Base):
    """A target's soft and hard mask, as files under the data folder; versions only grow."""

    __tablename__ = "mask_versions"
    __table_args__ = (UniqueConstraint("target_id", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    target_id: Mapped[int] = mapped_column(ForeignKey("targets.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    source: Mapped[MaskSource] = mapped_column(str_enum(MaskSource))
    # Paths relative to the data folder: 8-bit probability PNG and 1-bit hard PNG.
    soft_path: Mapped[str | None] = mapped_column(String(255))
    hard_path: Mapped[str] = mapped_column(String(255))
    area_fraction: Mapped[float] = mapped_column(Float, default=0.0)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class QualitySnapshot(Base):
    """Mean mask IoU of a project's evaluation targets (frozen ground truth) at one moment,
    against the human-seconds spent so far per evaluation target: per tag, and over all tags
    (``tag_id`` null). Recorded by the learning loop's jobs; the dashboard draws the curves."""

    __tablename__ = "quality_snapshots"

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), index=True
    )
    tag_id: Mapped[int | None] = mapped_column(ForeignKey("tags.id", ondelete="CASCADE"))
    taken_at: Mapped[datetime] = mapped_column(default=utcnow)
    human_seconds: Mapped[float] = mapped_column(Float)  # per evaluation target, all answers
    mean_iou: Mapped[float] = mapped_column(Float)
    targets: Mapped[int] = mapped_column(Integer)
