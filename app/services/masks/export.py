"""Export of a project's masks: COCO instances with RLE, PNG masks and soft masks.

One zip archive per call, built in memory and written to a temporary file that is renamed
(nothing half-written stays behind), holding:

- ``annotations.json``: COCO instances (images, categories with supercategories from the tag
  hierarchy, one annotation per target with a non-empty mask: an RLE ``segmentation``, its
  ``area`` and ``bbox``). Each annotation carries ``"tessera": {"state": ..., "finished": ...}``:
  ``finished`` is true for a complete target's mask and false for the current mask of a target
  still collecting votes or waiting in triage. ``info.tessera.include_unfinished`` says whether
  unfinished masks were asked for. Empty masks (a rejected tag, or nothing found yet) have no
  annotation, only their PNGs (and their image is still listed);
- ``masks/<image>__<tag>.png``: the hard mask (1-bit PNG) of every complete target;
- ``soft/<image>__<tag>.png``: its soft mask (8-bit probability PNG), where it has one;
- only with ``include_unfinished``: ``unfinished/masks/<image>__<tag>.png`` and
  ``unfinished/soft/<image>__<tag>.png``, the hard and soft mask of every collecting or triage
  target as its cells and image compose it now (``compose_target``), empty ones included: a
  collecting target with an empty mask says the crowd has found nothing so far. A separate
  folder, so that a glob of ``masks/*.png`` never picks up work in progress. Targets without
  cells (nothing asked yet) are left out: their mask would be no one's answer.

``<image>`` is the image's file name without folder or suffix and ``<tag>`` the tag's name,
each made safe (``safe_part``: a tag may be ``fate/stay_night``, and an entry name must never
hold a folder; a tag whose name changed gets ``-<tag id>``).

The mask of a complete target is its latest version from the crowd, a curator or imported ground
truth (the model's predictions are priors, not results).
"""

from __future__ import annotations

import io
import itertools
import json
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.models import Cell, Image, MaskSource, MaskVersion, Project, Tag, Target, TargetState
from app.services.errors import InvalidInputError
from app.services.files import read_file, read_mask
from app.services.masks.composition import compose_target, load_pixels
from app.services.target import is_union
from app.storage import atomic_write_bytes, encode_mask_png

RESULT_SOURCES = (MaskSource.CONSENSUS, MaskSource.CURATOR, MaskSource.GROUND_TRUTH)
UNFINISHED_STATES = (TargetState.COLLECTING, TargetState.TRIAGE)
UNFINISHED_FOLDER = "unfinished"


class NothingToExportError(InvalidInputError):
    """The export would hold no mask at all."""


@dataclass(frozen=True)
class ExportReport:
    path: Path
    images: int
    annotations: int
    masks: int  # PNG masks written, unfinished ones included
    unfinished: int = 0  # of which current masks of unfinished targets


@dataclass(frozen=True)
class _Entry:
    """One target's mask as it goes into the archive."""

    image: Image
    tag: Tag
    state: TargetState
    hard: np.ndarray  # (H, W) bool
    soft_png: bytes | None

    @property
    def finished(self) -> bool:
        return self.state == TargetState.COMPLETE


def _targets(
    session: Session, project: Project, tag: str | None, states: tuple[TargetState, ...]
) -> list[tuple[Target, Image, Tag]]:
    query = (
        select(Target, Image, Tag)
        .join(Image, Image.id == Target.image_id)
        .join(Tag, Tag.id == Target.tag_id)
        .where(Target.project_id == project.id, Target.state.in_(states))
        .order_by(Image.id, Tag.id)
    )
    if tag:
        query = query.where(Tag.name == tag)
    return [(t, i, g) for t, i, g in session.execute(query).all()]


def _finished(
    session: Session, settings: Settings, project: Project, tag: str | None
) -> Iterator[_Entry]:
    for target, image, tag_row in _targets(session, project, tag, (TargetState.COMPLETE,)):
        version = session.scalar(
            select(MaskVersion)
            .where(MaskVersion.target_id == target.id, MaskVersion.source.in_(RESULT_SOURCES))
            .order_by(MaskVersion.version.desc())
            .limit(1)
        )
        if version is None:
            continue
        hard = read_mask(settings, version.hard_path)
        soft = read_file(settings, version.soft_path) if version.soft_path else None
        yield _Entry(image, tag_row, target.state, hard if hard.dtype == bool else hard > 0.5, soft)


def _unfinished(
    session: Session, settings: Settings, project: Project, tag: str | None
) -> Iterator[_Entry]:
    pixels: tuple[int, np.ndarray] | None = None  # the last image's, as targets come by image
    for target, image, tag_row in _targets(session, project, tag, UNFINISHED_STATES):
        cells = list(session.scalars(select(Cell).where(Cell.target_id == target.id)))
        if not cells and not is_union(session, target=target):  # a union's cells are its parts'
            continue
        if pixels is None or pixels[0] != image.id:
            pixels = (image.id, load_pixels(settings, image))
        composed = compose_target(
            session, settings=settings, target=target, image=image, cells=cells, pixels=pixels[1]
        )
        yield _Entry(image, tag_row, target.state, composed.hard, encode_mask_png(composed.soft))


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


def _annotation(ann_id: int, image_id: int, category_id: int, entry: _Entry) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(entry.hard.astype(np.uint8)))
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")},
        "area": float(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": 0,
        "tessera": {"state": entry.state.value, "finished": entry.finished},
    }


# What an archive entry's name may hold: no separator (``/``, ``\\``), no drive (``:``), no
# character a file system or an unzip tool reads specially.
UNSAFE = re.compile(r"[^A-Za-z0-9_.()+!&'-]")


def safe_part(text: str) -> str:
    """``text`` as one safe part of an archive entry's name: every unsafe character (and a run
    of dots, which could name a parent folder) becomes ``_``."""
    return re.sub(r"\.{2,}", "_", UNSAFE.sub("_", text)).strip(".") or "_"


def _entry_name(image: Image, tag: Tag) -> str:
    """``<image stem>__<tag>.png``, each part made safe (``safe_part``): a tag such as
    ``x/../../p`` once named an entry that a naive unzip wrote outside its folder. A tag whose
    name changed on the way gets its id, so that two such tags cannot share an entry."""
    tag_part = safe_part(tag.name)
    if tag_part != tag.name:
        tag_part = f"{tag_part}-{tag.id}"
    return f"{safe_part(PurePosixPath(image.file_name).stem)}__{tag_part}.png"


def _image_info(image: Image) -> dict[str, Any]:
    return {
        "id": image.id,
        "file_name": image.file_name,
        "width": image.width,
        "height": image.height,
    }


def _nothing_message(project: Project, tag: str | None, include_unfinished: bool) -> str:
    which = f"project {project.slug!r}" + (f" (tag {tag!r})" if tag else "")
    if include_unfinished:
        return f"{which} has no mask to export: no target is complete, collecting or in triage"
    return f"{which} has no finished mask yet: no target is complete"


def export_project(
    session: Session,
    *,
    settings: Settings,
    project: Project,
    out: Path,
    tag: str | None = None,
    include_unfinished: bool = False,
    allow_empty: bool = True,
) -> ExportReport:
    """Write the project's (or one tag's) masks to the zip archive ``out`` (module docstring).

    ``include_unfinished`` adds the current masks of collecting and triage targets, marked as
    such. Without ``allow_empty``, an export that would hold no mask raises
    ``NothingToExportError`` and writes nothing.
    """
    categories, category_ids = _categories(session, project)
    images: dict[int, dict[str, Any]] = {}
    annotations: list[dict[str, Any]] = []
    masks = unfinished = 0
    buffer = io.BytesIO()
    entries = _finished(session, settings, project, tag)
    if include_unfinished:
        entries = itertools.chain(entries, _unfinished(session, settings, project, tag))
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for entry in entries:
            folder = "" if entry.finished else f"{UNFINISHED_FOLDER}/"
            name = _entry_name(entry.image, entry.tag)
            archive.writestr(f"{folder}masks/{name}", encode_mask_png(entry.hard))
            if entry.soft_png is not None:
                archive.writestr(f"{folder}soft/{name}", entry.soft_png)
            masks += 1
            unfinished += not entry.finished
            images.setdefault(entry.image.id, _image_info(entry.image))
            if entry.hard.any():
                category = category_ids[entry.tag.id]
                annotations.append(
                    _annotation(len(annotations) + 1, entry.image.id, category, entry)
                )
        coco = {
            "info": {
                "description": f"Tessera export of {project.slug}",
                "version": "1.0",
                "tessera": {"include_unfinished": include_unfinished},
            },
            "images": list(images.values()),
            "categories": categories,
            "annotations": annotations,
        }
        archive.writestr("annotations.json", json.dumps(coco, indent=1))
    if not masks and not allow_empty:
        raise NothingToExportError(_nothing_message(project, tag, include_unfinished))
    atomic_write_bytes(out, buffer.getvalue())
    return ExportReport(out, len(images), len(annotations), masks, unfinished)
