"""Import a folder of images with a tag file and/or COCO instances into a project.

The import reads and checks every description file first, then walks the images: a bad image
is named, skipped and reported; everything else lands in one transaction. If the import fails
as a whole, the caller rolls the transaction back and the files this import wrote are removed,
so that nothing half-imported stays behind.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from app.config import Settings
from app.models import Image, ImageTag, ImageTagSource, MaskSource, Project, Tag
from app.services.archive import ArchiveLimits, archive_suffix, is_archive, unpack_archive
from app.services.crowd.opening import open_seeded_targets
from app.services.errors import InvalidInputError
from app.services.files import mask_store, remove_files
from app.services.image import add_image, image_limits, image_store
from app.services.import_formats import (
    CocoData,
    CocoImage,
    ImportFormatError,
    coco_masks,
    find_first,
    is_coco,
    read_coco,
    read_tag_file,
    read_vocabulary,
)
from app.services.project import get_or_create_project, slugify
from app.services.tag import TagResolver, apply_vocabulary
from app.services.target import add_mask_version, ensure_target
from app.storage import BadImageError, inspect_image

log = logging.getLogger(__name__)

TAG_FILE_NAMES = ("tags.txt", "tags.csv", "tags.json")
COCO_FILE_NAMES = ("annotations.json", "instances.json", "coco.json")
VOCABULARY_FILE_NAME = "vocabulary.json"
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


# Ground-truth masks the import keeps at hand to open their targets, at most (the rest are read
# back from storage): every mask of a COCO import was kept until the end, 1.4 GB for one image of
# 36 megapixels with 40 categories, and without bound for a large dataset.
TRUTHS_KEPT_BYTES = 256 * 1024**2


@dataclass
class ImportSources:
    """What an import reads, found from a folder or a single file."""

    root: Path  # image names are relative to this folder (or to root/images)
    tag_file: Path | None = None
    coco_file: Path | None = None
    vocabulary_file: Path | None = None
    max_text_bytes: int | None = None  # each of them (``check_text_size``)


@dataclass
class ImportReport:
    project: str
    images_added: int = 0
    images_already_present: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    tags_created: int = 0
    image_tags_added: int = 0
    targets_created: int = 0
    ground_truth_masks: int = 0
    targets_opened: int = 0
    files_written: list[str] = field(default_factory=list)  # keys


def find_sources(
    path: Path, *, tag_file: Path | None = None, max_text_bytes: int | None = None
) -> ImportSources:
    """Work out what to read from PATH (a folder, a tag file or a COCO JSON); a description
    file over ``max_text_bytes`` is refused (``check_text_size``)."""
    if not path.exists():
        raise InvalidInputError(f"{path} does not exist")
    if path.is_file():
        root = path.parent
        sources = ImportSources(
            root=root,
            vocabulary_file=find_first(root, [VOCABULARY_FILE_NAME]),
            max_text_bytes=max_text_bytes,
        )
        if is_coco(path, max_bytes=max_text_bytes):
            sources.coco_file = path
        else:
            sources.tag_file = path
    else:
        root = path
        coco = find_first(root, COCO_FILE_NAMES)
        sources = ImportSources(
            root=root,
            tag_file=find_first(root, TAG_FILE_NAMES),
            coco_file=coco
            if coco is not None and is_coco(coco, max_bytes=max_text_bytes)
            else None,
            vocabulary_file=find_first(root, [VOCABULARY_FILE_NAME]),
            max_text_bytes=max_text_bytes,
        )
    if tag_file is not None:
        sources.tag_file = tag_file
    if sources.tag_file is None and sources.coco_file is None:
        raise InvalidInputError(
            f"{path}: no tag file ({', '.join(TAG_FILE_NAMES)}) and no COCO annotations "
            f"({', '.join(COCO_FILE_NAMES)}) found; name one with --tags"
        )
    return sources


def _resolve_image_file(root: Path, name: str) -> Path:
    """The file an image name refers to, refusing names that escape the import folder."""
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise BadImageError("the name leaves the import folder (absolute path or '..')")
    for base in (root, root / "images"):
        candidate = (base / name).resolve()
        if not candidate.is_relative_to(root.resolve()):
            raise BadImageError("the name leaves the import folder through a link")
        if candidate.is_file():
            return candidate
    raise BadImageError("file not found next to the tag file or under images/")


def _folder_images(root: Path) -> list[str]:
    names = []
    for base in (root, root / "images"):
        if base.is_dir():
            names += [
                str(p.relative_to(root if base == root else base))
                for p in sorted(base.iterdir())
                if p.is_file()
                and p.suffix.lower() in IMAGE_EXTENSIONS
                and not p.name.startswith(".")
            ]
    return names


@dataclass
class _Plan:
    tags: dict[str, list[str]]
    where: dict[str, str]
    coco: CocoData | None


def _read_plan(sources: ImportSources) -> _Plan:
    tags: dict[str, list[str]] = defaultdict(list)
    where: dict[str, str] = {}
    if sources.tag_file is not None:
        if not sources.tag_file.is_file():
            raise ImportFormatError(f"{sources.tag_file}: tag file not found")
        for record in read_tag_file(sources.tag_file, max_bytes=sources.max_text_bytes):
            tags[record.image].extend(record.tags)
            where.setdefault(record.image, record.where)
    coco = (
        read_coco(sources.coco_file, max_bytes=sources.max_text_bytes)
        if sources.coco_file is not None
        else None
    )
    if coco is not None:
        for image in coco.images.values():
            tags.setdefault(image.file_name, [])
    for name in _folder_images(sources.root):
        tags.setdefault(name, [])
    return _Plan(tags=dict(tags), where=where, coco=coco)


class _Importer:
    def __init__(self, session: Session, settings: Settings, project: Project) -> None:
        self.session = session
        self.project = project
        self.images = image_store(settings)
        self.masks = mask_store(settings)
        self.limits = image_limits(settings)
        self.resolver = TagResolver(session, project)
        self.report = ImportReport(project=project.slug)
        self.seen: dict[str, Image] = {}  # sha256 -> image, for duplicates within the import
        self.pairs: set[tuple[int, int]] = set()
        self.truths: dict[int, np.ndarray] = {}  # target id -> ground truth, to open targets
        self._truth_bytes = 0

    def run(self, sources: ImportSources, plan: _Plan) -> ImportReport:
        if sources.vocabulary_file is not None:
            entries = read_vocabulary(sources.vocabulary_file, max_bytes=sources.max_text_bytes)
            apply_vocabulary(self.resolver, entries)
        self.session.flush()
        coco_by_name = {i.file_name: i for i in plan.coco.images.values()} if plan.coco else {}
        for name in sorted(plan.tags):
            image = self._import_image(sources.root, name)
            if image is None:
                continue
            self._tag_image(image, name, plan.tags[name], plan.where.get(name, name))
            if plan.coco is not None and name in coco_by_name:
                self._ground_truth(image, plan.coco, coco_by_name[name])
        self.report.tags_created = len(self.resolver.created)
        self.session.flush()
        return self.report

    def _import_image(self, root: Path, name: str) -> Image | None:
        try:
            path = _resolve_image_file(root, name)
            data = path.read_bytes()
            info = inspect_image(data, self.limits)
        except (BadImageError, OSError) as exc:
            self.report.skipped.append((name, str(exc)))
            return None
        if info.sha256 in self.seen:
            self.report.warnings.append(f"{name}: same content as an earlier image; merged")
            return self.seen[info.sha256]
        image, added = add_image(
            self.session,
            project=self.project,
            store=self.images,
            data=data,
            info=info,
            file_name=name,
            written=self.report.files_written,
        )
        self.seen[info.sha256] = image
        if added:
            self.report.images_added += 1
        else:
            self.report.images_already_present += 1
        return image

    def _existing_pairs(self, image: Image) -> set[int]:
        rows = self.session.scalars(
            select(ImageTag.tag_id).where(
                ImageTag.image_id == image.id, ImageTag.source == ImageTagSource.IMPORT
            )
        )
        return set(rows)

    def _tag_image(self, image: Image, name: str, raw_tags: list[str], where: str) -> None:
        tags: list[Tag] = []
        for raw in raw_tags:
            try:
                tags += self.resolver.with_ancestors(self.resolver.ensure(raw))
            except ValueError as exc:
                self.report.warnings.append(f"{where}: tag skipped: {exc}")
        self._attach(image, tags)

    def _attach(self, image: Image, tags: list[Tag]) -> None:
        self.session.flush()
        existing = self._existing_pairs(image)
        for tag in dict.fromkeys(tags):  # ordered, unique
            if tag.id in existing or (image.id, tag.id) in self.pairs:
                continue
            self.pairs.add((image.id, tag.id))
            self.session.add(
                ImageTag(
                    image_id=image.id, tag_id=tag.id, source=ImageTagSource.IMPORT, probability=1.0
                )
            )
            self.report.image_tags_added += 1
            _, created = ensure_target(self.session, image=image, tag=tag)
            self.report.targets_created += int(created)

    def _ground_truth(self, image: Image, coco: CocoData, coco_image: CocoImage) -> None:
        if (coco_image.width, coco_image.height) != (image.width, image.height):
            self.report.warnings.append(
                f"{coco_image.file_name}: COCO says {coco_image.width}x{coco_image.height} but "
                f"the file is {image.width}x{image.height}; its annotations were skipped"
            )
            return
        # A child implies its parent: a parent without its own annotation covers its children.
        # Each category's mask is stored as it comes; only the parents' unions are held.
        own: set[Tag] = set()
        derived: dict[Tag, np.ndarray] = {}
        for category, mask in coco_masks(coco, coco_image):
            tag = self._coco_tag(coco, category)
            own.add(tag)
            for ancestor in self.resolver.with_ancestors(tag)[1:]:
                if ancestor in derived:
                    derived[ancestor] |= mask
                else:
                    derived[ancestor] = mask.copy()
            self._add_ground_truth(image, tag, mask)
        for tag, mask in derived.items():
            if tag not in own:
                self._add_ground_truth(image, tag, mask)

    def _coco_tag(self, coco: CocoData, category: str) -> Tag:
        supercategory = next((s for n, s in coco.categories.values() if n == category), None)
        tag = self.resolver.ensure(category)
        if supercategory and tag.parent is None:
            parent = self.resolver.ensure(supercategory)
            if parent is not tag and tag not in self.resolver.with_ancestors(parent):
                tag.parent = parent
        return tag

    def _add_ground_truth(self, image: Image, tag: Tag, mask: np.ndarray) -> None:
        self._attach(image, [tag])
        target, _ = ensure_target(self.session, image=image, tag=tag)
        if self._truth_bytes + mask.nbytes <= TRUTHS_KEPT_BYTES:
            self.truths[target.id] = mask  # else opening the target reads it back from storage
            self._truth_bytes += mask.nbytes
        add_mask_version(
            self.session,
            target=target,
            mask=mask,
            source=MaskSource.GROUND_TRUTH,
            store=self.masks,
            written=self.report.files_written,
        )
        self.report.ground_truth_masks += 1


def import_path(
    session: Session,
    *,
    settings: Settings,
    project: Project,
    path: Path,
    tag_file: Path | None = None,
) -> ImportReport:
    """Import PATH into ``project``. Flushes; the caller commits, or rolls back on error.

    PATH is a folder, a tag file, a COCO JSON, or an archive (zip, tar) of a folder. On an error
    the files this import wrote are removed before the error propagates.
    """
    if is_archive(path):
        with unpacked(settings, path) as root:
            return import_path(
                session, settings=settings, project=project, path=root, tag_file=tag_file
            )
    sources = find_sources(path, tag_file=tag_file, max_text_bytes=settings.max_description_bytes)
    plan = _read_plan(sources)  # every description file is read before anything is written
    importer = _Importer(session, settings, project)
    try:
        report = importer.run(sources, plan)
        report.targets_opened = open_seeded_targets(
            session, settings=settings, project=project, truths=importer.truths
        )
        return report
    except BaseException:
        remove_files(settings, importer.report.files_written)
        raise


def default_project_slug(path: Path) -> str:
    """The project an import goes to when none is named: the folder's or the archive's name."""
    resolved = path.resolve()
    if resolved.is_dir():
        return slugify(resolved.name)
    if is_archive(resolved):
        suffix = archive_suffix(resolved.name)
        return slugify(resolved.name[: len(resolved.name) - len(suffix)])
    return slugify(resolved.parent.name)


def run_import(
    session: Session, *, settings: Settings, project_slug: str, path: Path, tag_file: Path | None
) -> ImportReport:
    """Import and commit once; on any failure nothing stays: rows rolled back, files removed.

    The one service that commits: the files can only be undone after the rollback, so the
    commit, the rollback and the undo belong together (the CLI and the upload page share it).
    """
    report: ImportReport | None = None
    try:
        project = get_or_create_project(session, slug=project_slug)
        report = import_path(
            session, settings=settings, project=project, path=path, tag_file=tag_file
        )
        if report.images_added + report.images_already_present == 0:
            raise InvalidInputError(_nothing_imported(report))
        session.commit()
        _refresh_statistics(session)
    except BaseException:
        session.rollback()
        if report is not None:
            remove_files(settings, report.files_written)
        raise
    return report


# The tables an import fills; the picker's plans depend on their statistics.
ANALYZED_TABLES = ("images", "image_tags", "targets", "cells", "windows", "consensus", "gold")


def _refresh_statistics(session: Session) -> None:
    """PostgreSQL plans from table statistics: fresh after an import, not at the next autovacuum
    (the soak's first 90 s ran at ten times the latency until autoanalyze caught up)."""
    if session.get_bind().dialect.name != "postgresql":
        return
    session.execute(text(f"ANALYZE {', '.join(ANALYZED_TABLES)}"))
    session.commit()


def _nothing_imported(report: ImportReport) -> str:
    if not report.skipped:
        return "no image found to import"
    # Every reason, one per line: the one left out is the one the user needed.
    reasons = "".join(f"\n  {name}: {reason}" for name, reason in report.skipped)
    return f"no image could be imported ({len(report.skipped)} skipped):{reasons}"


@contextmanager
def unpacked(settings: Settings, archive: Path) -> Iterator[Path]:
    """The archive unpacked into a private scratch folder, removed afterwards whatever happens."""
    settings.scratch_dir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="unpack-", dir=settings.scratch_dir))
    limits = ArchiveLimits(
        max_members=settings.max_archive_members, max_total_bytes=settings.max_archive_bytes
    )
    try:
        yield unpack_archive(archive, folder, limits)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
