"""Tasks (nine tiles and one tag shown to one volunteer), their tiles, and the votes on them."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    SmallInteger,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.db import Base, utcnow
from app.models._types import str_enum


class TaskKind(enum.StrEnum):
    WINDOW = "window"
    MOSAIC = "mosaic"


class TaskState(enum.StrEnum):
    LEASED = "leased"
    SUBMITTED = "submitted"
    EXPIRED = "expired"
    SKIPPED = "skipped"


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (
        Index("ix_tasks_volunteer_state", "volunteer_id", "state"),
        Index("ix_tasks_state_expires", "state", "expires_at"),
        # The fuser's queue: submitted tasks whose votes are not fused yet, side by side in
        # the index (by fused_at alone it also held every task that is never fused: leased,
        # skipped, expired), by project and in order.
        Index("ix_tasks_waiting", "state", "fused_at", "project_id", "id"),
        Index("ix_tasks_client_open", "client", "state", "expires_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    volunteer_id: Mapped[int] = mapped_column(ForeignKey("volunteers.id", ondelete="CASCADE"))
    tag_id: Mapped[int] = mapped_column(ForeignKey("tags.id", ondelete="CASCADE"))
    kind: Mapped[TaskKind] = mapped_column(str_enum(TaskKind))
    window_id: Mapped[int | None] = mapped_column(ForeignKey("windows.id", ondelete="SET NULL"))
    # Random part of the signed token; a replayed token finds its task by it.
    nonce: Mapped[str] = mapped_column(String(32), unique=True)
    state: Mapped[TaskState] = mapped_column(str_enum(TaskState), default=TaskState.LEASED)
    issued_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()
    submitted_at: Mapped[datetime | None] = mapped_column(default=None)
    # What the submission answered, returned again verbatim if the same token comes back.
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    # When the fuser folded its votes into the consensus (``app.services.crowd.fuser``); None
    # while a submitted task waits for it (and for tasks never submitted).
    fused_at: Mapped[datetime | None] = mapped_column(default=None)
    # A keyed hash of the client address it was leased to (``Signer.client_key``): open leases
    # are capped per address. Never the address itself.
    client: Mapped[str | None] = mapped_column(String(32), default=None)

    tiles: Mapped[list[TaskTile]] = relationship(
        back_populates="task", cascade="all", order_by="TaskTile.position"
    )


class TaskTile(Base):
    __tablename__ = "task_tiles"
    __table_args__ = (UniqueConstraint("task_id", "position"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(SmallInteger)  # 0..8, row-major
    cell_id: Mapped[int] = mapped_column(ForeignKey("cells.id", ondelete="CASCADE"), index=True)
    # Whether the tile was a known (gold) control when served; its answer stays server-side.
    known: Mapped[bool] = mapped_column(Boolean, default=False)

    task: Mapped[Task] = relationship(back_populates="tiles")


class Vote(Base):
    """One volunteer's yes/no on one tile. Append-only: never updated, never deleted."""

    __tablename__ = "votes"
    __table_args__ = (
        # One vote per tile of a task: a replayed submission cannot double count.
        UniqueConstraint("task_id", "position"),
        Index("ix_votes_cell", "cell_id"),
        Index("ix_votes_volunteer_cell", "volunteer_id", "cell_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    volunteer_id: Mapped[int] = mapped_column(ForeignKey("volunteers.id", ondelete="CASCADE"))
    cell_id: Mapped[int] = mapped_column(ForeignKey("cells.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(SmallInteger)
    label: Mapped[bool] = mapped_column(Boolean)
    elapsed_ms: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class GoldSource(enum.StrEnum):
    CURATOR = "curator"
    GROUND_TRUTH = "ground_truth"
    RETIRED = "retired"


class Gold(Base):
    """A cell whose answer is known; served as a control tile and used to score volunteers."""

    __tablename__ = "gold"
    __table_args__ = (Index("ix_gold_project_tag_label", "project_id", "tag_id", "label"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    cell_id: Mapped[int] = mapped_column(ForeignKey("cells.id", ondelete="CASCADE"), unique=True)
    label: Mapped[bool] = mapped_column(Boolean)
    # Share of the cell the object covers, when known from a mask.
    coverage: Mapped[float | None] = mapped_column(default=None)
    source: Mapped[GoldSource] = mapped_column(str_enum(GoldSource, length=16))
    # Frozen gold is the evaluation set: never trained on, never served as a control.
    frozen: Mapped[bool] = mapped_column(Boolean, default=False)
    created_by: Mapped[str | None] = mapped_column(String(80))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Copied from the target: the mosaic picker looks for known tiles of one tag.
    tag_id: Mapped[int] = mapped_column(ForeignKey("tags.id", ondelete="CASCADE"))
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
