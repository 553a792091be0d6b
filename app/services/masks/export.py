"""Export of a project's finished masks: COCO instances with RLE, PNG masks and soft masks.

One zip archive per call, written to a temporary file and renamed, holding:

- ``annotations.json``: COCO instances (images, categories with supercategories from the tag
  hierarchy, one annotation per complete target with an RLE ``segmentation``, its ``area`` and
  ``bbox``; empty masks of rejected tags are left out);
- ``masks/<image>__<tag>.png``: the hard mask (1-bit PNG) of every complete target;
- ``soft/<image>__<tag>.png``: its soft mask (8-bit probability PNG), where it has one.

The mask of a target is its latest version from the crowd, a curator or imported ground truth
(the model's predictions are priors, not results).
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.models import Image, MaskSource, MaskVersion, Project, Tag, Target, TargetState
from app.storage import atomic_write_bytes, decode_mask_png, encode_mask_png

RESULT_SOURCES = (MaskSource.CONSENSUS, MaskSource.CURATOR, MaskSource.GROUND_TRUTH)


@dataclass(frozen=True)
class ExportReport:
    path: Path
    images: int
    annotations: int
    masks: int


def _latest_masks(
    session: Session, project: Project, tag: str | None
) -> list[tuple[Target, Image, Tag, MaskVersion]]:
    query = (
        select(Target, Image, Tag)
        .join(Image, Image.id == Target.image_id)
        .join(Tag, Tag.id == Target.tag_id)
        .where(Target.project_id == project.id, Target.state == TargetState.COMPLETE)
        .order_by(Image.id, Tag.id)
    )
    if tag:
        query = query.where(Tag.name == tag)
    out = []
    for target, image, tag_row in session.execute(query).all():
        version = session.scalar(
            select(MaskVersion)
            .where(MaskVersion.target_id == target.id, MaskVersion.source.in_(RESULT_SOURCES))
            .order_by(MaskVersion.version.desc())
            .limit(1)
        )
        if version is not None:
            out.append((target, image, tag_row, version))
    return out


def _categories(session: Session, project: Project) -> tuple[list[dict[str, Any]], dict[int, int]]:
    tags = list(session.scalars(select(Tag).where(Tag.project_id == project.id).order_by(Tag.id)))
    by_id = {t.id: t for t in tags}
    ids = {t.id: i + 1 for i, t in enumerate(tags)}
    categories = [
        {
            "id": ids[t.id],
            "name": t.name,
            "supercategory": by_id[t.parent_id].name if t.parent_id in by_id else t.name,
        }
        for t in tags
    ]
    return categories, ids


def _annotation(ann_id: int, image_id: int, category_id: int, mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")},
        "area": float(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": 0,
    }


def _entry_name(image: Image, tag: Tag) -> str:
    return f"{PurePosixPath(image.file_name).stem}__{tag.name}.png"


def export_project(
    session: Session, *, settings: Settings, project: Project, out: Path, tag: str | None = None
) -> ExportReport:
    """Write the project's (or one tag's) finished masks to the zip archive ``out``."""
    categories, category_ids = _categories(session, project)
    images: dict[int, dict[str, Any]] = {}
    annotations: list[dict[str, Any]] = []
    masks = 0
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for _target, image, tag_row, version in _latest_masks(session, project, tag):
            hard = decode_mask_png(settings.data_dir / version.hard_path)
            hard = hard if hard.dtype == bool else hard > 0.5
            name = _entry_name(image, tag_row)
            archive.writestr(f"masks/{name}", encode_mask_png(hard))
            masks += 1
            if version.soft_path:
                archive.writestr(
                    f"soft/{name}", (settings.data_dir / version.soft_path).read_bytes()
                )
            images.setdefault(
                image.id,
                {
                    "id": image.id,
                    "file_name": image.file_name,
                    "width": image.width,
                    "height": image.height,
                },
            )
            if hard.any():
                annotations.append(
                    _annotation(len(annotations) + 1, image.id, category_ids[tag_row.id], hard)
                )
        coco = {
            "info": {"description": f"Tessera export of {project.slug}", "version": "1.0"},
            "images": list(images.values()),
            "categories": categories,
            "annotations": annotations,
        }
        archive.writestr("annotations.json", json.dumps(coco, indent=1))
    atomic_write_bytes(out, buffer.getvalue())
    return ExportReport(out, len(images), len(annotations), masks)
