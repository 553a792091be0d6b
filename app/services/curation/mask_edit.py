"""A curator's pixel-level fixes (a painted mask) and tags they add by hand."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image as PILImage
from PIL import UnidentifiedImageError
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.models import Image as ImageRow
from app.models import (
    ImageTag,
    ImageTagSource,
    ImageTagStatus,
    MaskVersion,
    Project,
    Target,
    TargetState,
)
from app.services.crowd.opening import open_target
from app.services.curation.triage import finish_target
from app.services.errors import ConflictError, InvalidInputError
from app.services.tag import TagResolver
from app.services.target import ensure_target

MAX_MASK_BYTES = 8 * 1024 * 1024


def decode_painted_mask(data: bytes, *, height: int, width: int) -> np.ndarray:
    """A painted mask PNG -> (H, W) bool (any pixel brighter than mid-grey is the object)."""
    if not data or len(data) > MAX_MASK_BYTES:
        raise InvalidInputError(f"a mask is a PNG of 1 byte to {MAX_MASK_BYTES:,} bytes")
    try:
        with PILImage.open(io.BytesIO(data)) as img:
            if img.format != "PNG":
                raise InvalidInputError(f"a mask must be a PNG, not {img.format}")
            if img.size != (width, height):
                raise InvalidInputError(
                    f"the mask is {img.size[0]}x{img.size[1]}, the image {width}x{height}"
                )
            pixels = np.asarray(img.convert("L"))
    except PILImage.DecompressionBombError as exc:  # a header that claims a vast image
        raise InvalidInputError(f"the mask is not a PNG the image's size: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:  # ValueError: an oversized
        # text chunk (PngImagePlugin.MAX_TEXT_CHUNK) and the like
        raise InvalidInputError(f"the mask is not a readable PNG: {exc}") from exc
    return pixels > 127


def save_painted_mask(
    session: Session,
    *,
    settings: Settings,
    project: Project,
    target: Target,
    mask: np.ndarray,
    curator: str,
) -> MaskVersion:
    """Store a painted mask as the target's curator mask and complete the target."""
    return finish_target(
        session,
        settings=settings,
        project=project,
        target=target,
        mask=mask,
        soft=None,
        meta={"curator": curator, "painted": True},
        tag_status=ImageTagStatus.ACTIVE,
    )


def add_curator_tag(
    session: Session, *, settings: Settings, project: Project, image: ImageRow, name: str
) -> Target:
    """A tag the image was missing: a confirmed image tag and a new target, opened for votes."""
    if not name.strip():
        raise InvalidInputError("name the tag to add")
    resolver = TagResolver(session, project)
    tag = resolver.find(name)
    if tag is None:
        raise InvalidInputError(
            f"the project has no tag {name!r}; add it to the vocabulary first (tessera import)"
        )
    row = session.scalar(
        select(ImageTag).where(ImageTag.image_id == image.id, ImageTag.tag_id == tag.id)
    )
    if row is not None and row.status == ImageTagStatus.ACTIVE:
        raise ConflictError(f"the image is tagged {tag.name} already")
    if row is None:
        row = ImageTag(image_id=image.id, tag_id=tag.id, source=ImageTagSource.CURATOR)
        session.add(row)
    row.source, row.status, row.probability = ImageTagSource.CURATOR, ImageTagStatus.ACTIVE, 1.0
    target, created = ensure_target(session, image=image, tag=tag)
    if created or target.state == TargetState.SEEDED:
        open_target(session, settings=settings, project=project, target=target, image=image)
    session.flush()
    return target
