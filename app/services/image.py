"""Images: add validated files to a project, stored once by content hash."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.models import Image, Project
from app.storage import SUPPORTED_FORMATS, FileStore, ImageInfo, ImageLimits, open_storage


def image_limits(settings: Settings) -> ImageLimits:
    return ImageLimits(
        max_bytes=settings.max_image_bytes,
        max_pixels=settings.max_image_pixels,
        max_side=settings.max_image_side,
        min_side=settings.min_image_side,
    )


def image_store(settings: Settings) -> FileStore:
    return FileStore(open_storage(settings), "images")


def image_key(image: Image) -> str:
    return FileStore.key_in("images", image.sha256, SUPPORTED_FORMATS[image.format])


def image_path(settings: Settings, image: Image) -> Path:
    """A local file of the image (from object storage: a cached copy, fetched on first use)."""
    return open_storage(settings).local_path(image_key(image))


def find_image_by_hash(session: Session, *, project: Project, sha256: str) -> Image | None:
    return session.scalar(
        select(Image).where(Image.project_id == project.id, Image.sha256 == sha256)
    )


def add_image(
    session: Session,
    *,
    project: Project,
    store: FileStore,
    data: bytes,
    info: ImageInfo,
    file_name: str,
    written: list[str],
) -> tuple[Image, bool]:
    """The project's image for these bytes, added if new. Appends new files to ``written``.

    Returns the image and whether it was added by this call.
    """
    existing = find_image_by_hash(session, project=project, sha256=info.sha256)
    if existing is not None:
        return existing, False
    key, created = store.put(data, info.extension, sha256=info.sha256)
    if created:
        written.append(key)
    image = Image(
        project_id=project.id,
        sha256=info.sha256,
        file_name=file_name,
        format=info.format,
        width=info.width,
        height=info.height,
        size_bytes=info.size_bytes,
    )
    session.add(image)
    session.flush()
    return image, True
