"""Targets (one image x tag to segment), their pyramid cells and the windows that ask about them.

A cell of level k is one of the 3^k x 3^k squares of the image; a window is a cell of level k-1
shown as its nine children. Cells hold the hot state the task picker filters on; the posterior
itself lives in ``consensus``.
"""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import (
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    SmallInteger,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.db import Base, utcnow
from app.models._types import str_enum


class TargetState(enum.StrEnum):
    SEEDED = "seeded"
    COLLECTING = "collecting"
    COMPLETE = "complete"
    TRIAGE = "triage"


class Target(Base):
    __tablename__ = "targets"
    __table_args__ = (
        UniqueConstraint("image_id", "tag_id"),
        # The picker walks a project's open targets by priority.
        Index("ix_targets_project_state_priority", "project_id", "state", "priority"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    tag_id: Mapped[int] = mapped_column(ForeignKey("tags.id", ondelete="CASCADE"), index=True)
    state: Mapped[TargetState] = mapped_column(str_enum(TargetState), default=TargetState.SEEDED)
    priority: Mapped[float] = mapped_column(Float, default=1.0)
    triage_reason: Mapped[str | None] = mapped_column(default=None)
    # A control target's ground truth is served as known tiles; the others' is held out to
    # evaluate the crowd and the model (the frozen gold set).
    control: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    cells: Mapped[list[Cell]] = relationship(back_populates="target", cascade="all")


class CellStatus(enum.StrEnum):
    OPEN = "open"
    RETIRED = "retired"


class RetireReason(enum.StrEnum):
    CONFIDENT = "confident"
    SPLIT = "split"  # unsure, but credible volunteers saw a sliver of it (ml.aggregation.rules)
    BUDGET = "budget"
    GOLD = "gold"
    MODEL = "model"
    CURATOR = "curator"
    OUTSIDE = "outside"  # wholly outside its image (the square frame's margin): no pixel to ask


# Cells retired on their votes: they follow their votes; gold, curator and model answers stand.
VOTED_REASONS = (RetireReason.CONFIDENT, RetireReason.SPLIT, RetireReason.BUDGET)
# What a cell may be retired by for its pixels to be learned from: people's votes, gold, a
# curator; not the model's own confirmation, nor the frame's margin.
SETTLED_BY = (*VOTED_REASONS, RetireReason.GOLD, RetireReason.CURATOR)


class Cell(Base):
    __tablename__ = "cells"
    __table_args__ = (
        UniqueConstraint("target_id", "level", "row", "col"),
        Index("ix_cells_target_status", "target_id", "status"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    target_id: Mapped[int] = mapped_column(ForeignKey("targets.id", ondelete="CASCADE"))
    level: Mapped[int] = mapped_column(SmallInteger)
    row: Mapped[int] = mapped_column(Integer)
    col: Mapped[int] = mapped_column(Integer)
    # Prior log-odds that the cell shows the tag: its parent's (or the tagger's Grad-CAM) rate,
    # plus the segmenter's evidence, ``model_logodds`` (its log-likelihood ratio, replaced by
    # each learning-loop round: ``app.jobs.retrain``).
    prior_logodds: Mapped[float] = mapped_column(Float, default=0.0)
    model_logodds: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    status: Mapped[CellStatus] = mapped_column(str_enum(CellStatus), default=CellStatus.OPEN)
    retire_reason: Mapped[RetireReason | None] = mapped_column(str_enum(RetireReason))
    uncertain: Mapped[bool] = mapped_column(Boolean, default=False)
    # The hard answer once retired.
    label: Mapped[bool | None] = mapped_column(Boolean, default=None)
    # The window that asks about this cell (its parent cell shown as nine children).
    window_id: Mapped[int | None] = mapped_column(
        ForeignKey("windows.id", ondelete="SET NULL"), index=True
    )
    retired_at: Mapped[datetime | None] = mapped_column(default=None)

    target: Mapped[Target] = relationship(back_populates="cells")


class WindowState(enum.StrEnum):
    OPEN = "open"
    CLOSED = "closed"


class Window(Base):
    __tablename__ = "windows"
    __table_args__ = (
        UniqueConstraint("target_id", "level", "row", "col"),
        # The picker's hot path: a project's (or one tag's) most valuable open windows first.
        Index("ix_windows_picker", "project_id", "state", "known", "value"),
        Index("ix_windows_tag_picker", "tag_id", "state", "known", "value"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    # Copied from the target so that the picker reads one table.
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    tag_id: Mapped[int] = mapped_column(ForeignKey("tags.id", ondelete="CASCADE"))
    target_id: Mapped[int] = mapped_column(ForeignKey("targets.id", ondelete="CASCADE"), index=True)
    # The parent cell's address; level 0 is the whole image, its children are level 1.
    level: Mapped[int] = mapped_column(SmallInteger)
    row: Mapped[int] = mapped_column(Integer)
    col: Mapped[int] = mapped_column(Integer)
    state: Mapped[WindowState] = mapped_column(str_enum(WindowState), default=WindowState.OPEN)
    # priority x uncertainty, kept up to date by the vote path.
    value: Mapped[float] = mapped_column(Float, default=0.0)
    leased_until: Mapped[datetime | None] = mapped_column(default=None)
    leased_by: Mapped[int | None] = mapped_column(ForeignKey("volunteers.id", ondelete="SET NULL"))
    # Windows of control targets are known: served as gold at the gold rate.
    known: Mapped[bool] = mapped_column(Boolean, default=False)
    opened_at: Mapped[datetime] = mapped_column(default=utcnow)
    closed_at: Mapped[datetime | None] = mapped_column(default=None)
