"""Tags: a label with a category, an optional parent and aliases that resolve to it."""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import Boolean, Float, ForeignKey, String, Text, UniqueConstraint, false
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.db import Base, utcnow
from app.models._types import str_enum


class TagCategory(enum.StrEnum):
    GENERAL = "general"
    CHARACTER = "character"
    ATTRIBUTE = "attribute"
    COPYRIGHT = "copyright"
    ARTIST = "artist"
    META = "meta"


class Tag(Base):
    __tablename__ = "tags"
    __table_args__ = (UniqueConstraint("project_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(128))
    display_name: Mapped[str] = mapped_column(String(128))
    category: Mapped[TagCategory] = mapped_column(
        str_enum(TagCategory), default=TagCategory.GENERAL
    )
    parent_id: Mapped[int | None] = mapped_column(
        ForeignKey("tags.id", ondelete="SET NULL"), index=True
    )
    description: Mapped[str] = mapped_column(Text, default="")
    # Every instance of the tag is one of its children's (a "shape" is a circle, a square ...):
    # its mask is the union of theirs, so an image tagged with children costs no second pyramid.
    exhaustive: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # Campaign priority of the tag (project setting per tag); targets inherit it.
    priority: Mapped[float] = mapped_column(Float, default=1.0)
    # Log-odds added to the tagger's probability of its guesses of this tag, learned from the
    # crowd's verdicts on earlier guesses (``app.services.target.learn_guess_corrections``).
    guess_logodds: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    parent: Mapped[Tag | None] = relationship(remote_side="Tag.id")
    aliases: Mapped[list[TagAlias]] = relationship(
        back_populates="tag", cascade="all, delete-orphan"
    )


class TagAlias(Base):
    __tablename__ = "tag_aliases"
    __table_args__ = (UniqueConstraint("project_id", "alias"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    alias: Mapped[str] = mapped_column(String(128))
    tag_id: Mapped[int] = mapped_column(ForeignKey("tags.id", ondelete="CASCADE"), index=True)

    tag: Mapped[Tag] = relationship(back_populates="aliases")
