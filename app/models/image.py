"""Images (stored once by content hash) and the tags attached to them."""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import Float, ForeignKey, Integer, LargeBinary, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.db import Base, utcnow
from app.models._types import str_enum


class Image(Base):
    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("project_id", "sha256"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), index=True
    )
    # The file lives once in the content-addressed store, whatever project refers to it.
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    file_name: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(8))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    tags: Mapped[list[ImageTag]] = relationship(back_populates="image", cascade="all")


class ImageTagSource(enum.StrEnum):
    IMPORT = "import"
    CLASSIFIER = "classifier"
    CURATOR = "curator"


class ImageTagStatus(enum.StrEnum):
    ACTIVE = "active"
    DISPUTED = "disputed"
    REJECTED = "rejected"


class ImageTag(Base):
    __tablename__ = "image_tags"
    __table_args__ = (UniqueConstraint("image_id", "tag_id", "source"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    tag_id: Mapped[int] = mapped_column(ForeignKey("tags.id", ondelete="CASCADE"), index=True)
    source: Mapped[ImageTagSource] = mapped_column(str_enum(ImageTagSource))
    probability: Mapped[float] = mapped_column(Float, default=1.0)
    status: Mapped[ImageTagStatus] = mapped_column(
        str_enum(ImageTagStatus), default=ImageTagStatus.ACTIVE
    )
    # The tagger version that predicted it (classifier tags only).
    model_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="SET NULL")
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    image: Mapped[Image] = relationship(back_populates="tags")


class ImageEmbedding(Base):
    """The tagger's pooled embedding of an image (float32 bytes), one per tagger version.

    Its presence also records that this version has tagged the image.
    """

    __tablename__ = "image_embeddings"
    __table_args__ = (UniqueConstraint("image_id", "model_version_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    model_version_id: Mapped[int] = mapped_column(
        ForeignKey("model_versions.id", ondelete="CASCADE"), index=True
    )
    dim: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
