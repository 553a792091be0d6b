"""Indexing objects: cut every image's masks into objects, learn their attributes, store the
index that "find this object, but in blue" searches (``app.services.curation.objects``).

A target's mask is its newest result (a curator's, the crowd's, or imported ground truth) or,
where there is none yet, the segmenter's newest prediction when the active segmenter scores at
least ``MIN_MODEL_MIOU`` on the frozen set (its speckle removed). The objects' descriptions use the
active tagger's feature map when there is one (hand-made descriptions alone otherwise); the
attribute embeddings and the manipulation network are trained on the project's own tags and
masks (``ml.objects.attributes``). The index is one file in the project's storage, written
whole and put in place at once: a search sees the old index or the new one.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.models import (
    Image,
    ImageTag,
    ImageTagSource,
    ImageTagStatus,
    MaskSource,
    MaskVersion,
    ModelKind,
    Project,
    Tag,
    Target,
)
from app.services.curation.objects import index_key
from app.services.errors import InvalidInputError
from app.services.files import model_file, read_mask
from app.services.job import finish_job, job_run
from app.services.masks.composition import load_pixels
from app.services.model_version import active_model
from app.services.project import get_project
from app.storage import open_storage
from ml.checkpoints import load_checkpoint
from ml.objects.attributes import (
    AttributeOptions,
    attribute_dim,
    feature_blocks,
    object_features,
    train_attributes,
)
from ml.objects.index import build_index
from ml.objects.instances import (
    NONE,
    Group,
    Instance,
    attribute_groups,
    clean_prediction,
    find_instances,
    largest,
)
from ml.tagger import Tagger
from ml.train import resolve_device

RESULTS = (MaskSource.CURATOR, MaskSource.CONSENSUS, MaskSource.GROUND_TRUTH)
MIN_MODEL_MIOU = 0.5


@dataclass
class ObjectReport:
    images: int = 0
    objects: int = 0
    from_model: int = 0  # objects cut from a segmenter's prediction (no result mask yet)
    groups: dict[str, list[str]] = field(default_factory=dict)
    tagger_version: int | None = None
    accuracy: dict[str, float] = field(default_factory=dict)  # on the objects it learned from
    manipulated: dict[str, float] = field(default_factory=dict)
    held_out: int = 0  # objects of the held-out images: indexed, not learned from
    held_out_accuracy: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def held_out_images(image_ids: list[int], share: float) -> set[int]:
    """A fixed ``share`` of the images (by a hash of their ids) whose objects are indexed but
    not learned from, so that the report says how well unseen objects' attributes are read."""
    return {i for i in image_ids if (i * 2654435761) % 2**32 < share * 2**32}


def trusts_segmenter(session: Session, project: Project) -> bool:
    """Whether the active segmenter's masks may stand in where no result mask is: its
    frozen-set mIoU is at least ``MIN_MODEL_MIOU`` (an early model's masks are mostly wrong,
    and every blob of them would be an object)."""
    version = active_model(session, project=project, kind=ModelKind.SEGMENTER)
    miou = version.metrics.get("miou") if version is not None else None
    return isinstance(miou, int | float) and miou >= MIN_MODEL_MIOU


def _masks(
    session: Session, project: Project, *, with_model: bool
) -> dict[int, dict[str, tuple[str, bool]]]:
    """image id -> tag name -> (the mask file's key, whether it is a segmenter's)."""
    rows = session.execute(
        select(Target.image_id, Tag.name, MaskVersion.source, MaskVersion.hard_path)
        .join(Tag, Tag.id == Target.tag_id)
        .join(MaskVersion, MaskVersion.target_id == Target.id)
        .where(Target.project_id == project.id)
        .order_by(Target.image_id, Tag.name, MaskVersion.version)
    ).all()
    out: dict[int, dict[str, tuple[str, bool]]] = {}
    for image_id, name, source, key in rows:  # newest last: a result replaces all before it
        mine = out.setdefault(image_id, {})
        if source in RESULTS:
            mine[name] = (key, False)
        elif with_model and source == MaskSource.MODEL and (name not in mine or mine[name][1]):
            mine[name] = (key, True)
    return out


def _vocabulary(session: Session, project: Project) -> tuple[dict[str, str], dict[str, str | None]]:
    tags = list(session.scalars(select(Tag).where(Tag.project_id == project.id)))
    by_id = {t.id: t.name for t in tags}
    categories = {t.name: str(t.category) for t in tags}
    parents = {t.name: by_id.get(t.parent_id) if t.parent_id else None for t in tags}
    return categories, parents


@dataclass(frozen=True)
class Cut:
    """One image's objects, as the index holds them (in its order)."""

    image: Image
    pixels: np.ndarray
    objects: list[Instance]
    from_model: int  # objects cut only from a segmenter's prediction
    of: int  # images with masks, all told
    unmasked: set[str]  # tags people gave the image that have no mask yet


@dataclass(frozen=True)
class _Found:
    image_id: int
    tags: set[str]  # the tags that name it and the attributes that cover it
    box: tuple[int, int, int, int]
    outline: list[list[int]]
    unmasked: set[str]  # its image's tags people gave that have no mask yet


def labels_of(
    groups: list[Group], tags: set[str], unmasked: set[str], categories: dict[str, str]
) -> list[int]:
    """An object's value index in each group; -1 (unknown) where it shows none of the group's
    tags but the image carries a tag of the group's category without a mask: that tag may be
    on this object (and be a value the group does not know yet). ``tags``: the object's tags
    and attributes."""
    pending = {categories.get(t) for t in unmasked}
    out = []
    for group in groups:
        value = group.value_of(tags)
        own = value >= 0 and group.values[value] in tags
        doubt = categories.get(next(v for v in group.values if v != NONE)) in pending
        out.append(value if own or not doubt else -1)
    return out


def cut_objects(
    session: Session,
    settings: Settings,
    project: Project,
    *,
    image_ids: set[int] | None = None,
    on_image: Callable[[int, int], None] | None = None,
) -> Iterator[Cut]:
    """Every image's objects (only those of ``image_ids`` when given), image by image."""
    categories, parents = _vocabulary(session, project)
    masks = _masks(session, project, with_model=trusts_segmenter(session, project))
    wanted = sorted(masks if image_ids is None else set(masks) & image_ids)
    carried: dict[int, set[str]] = {}
    for image_id, name in session.execute(
        select(ImageTag.image_id, Tag.name)
        .join(Tag, Tag.id == ImageTag.tag_id)
        .where(
            Tag.project_id == project.id,
            ImageTag.status == ImageTagStatus.ACTIVE,
            # people's tags: a tagger's guess does not make a value unknown
            ImageTag.source != ImageTagSource.CLASSIFIER,
        )
    ):
        carried.setdefault(image_id, set()).add(name)
    for done, image_id in enumerate(wanted, start=1):
        image = session.get_one(Image, image_id)
        hard = {}
        for name, (key, predicted) in masks[image_id].items():
            mask = read_mask(settings, key)
            mask = mask if mask.dtype == bool else mask > 0.5
            hard[name] = clean_prediction(mask) if predicted else mask
        objects = largest(find_instances(hard, categories=categories, parents=parents))
        if objects:
            from_model = sum(all(masks[image_id][t][1] for t in obj.tags) for obj in objects)
            unmasked = carried.get(image_id, set()) - set(masks[image_id])
            pixels = load_pixels(settings, image)
            yield Cut(image, pixels, objects, from_model, len(wanted), unmasked)
        if on_image is not None:
            on_image(done, len(wanted))


def run_index_objects(
    factory: sessionmaker[Session],
    settings: Settings,
    *,
    slug: str,
    device: str = "auto",
    options: AttributeOptions | None = None,
    holdout: float = 0.0,
    on_batch: Callable[[int, int], None] | None = None,
) -> ObjectReport:
    """Index the project's objects (see the module doc) and store the index. ``holdout``: the
    share of images whose objects are not learned from (``held_out_images``)."""
    if not 0.0 <= holdout < 1.0:
        raise InvalidInputError(f"holdout must be in [0, 1), not {holdout}")
    with factory() as session:
        project = get_project(session, slug=slug)
        params = {"holdout": holdout}
        with job_run(session, project=project, kind="index-objects", params=params) as job:
            report = _index(session, settings, project, device, options, holdout, on_batch)
            finish_job(job, result=vars(report))
            session.commit()
    return report


def _index(
    session: Session,
    settings: Settings,
    project: Project,
    device: str,
    options: AttributeOptions | None,
    holdout: float,
    on_batch: Callable[[int, int], None] | None,
) -> ObjectReport:
    started = time.perf_counter()
    report = ObjectReport()
    categories, parents = _vocabulary(session, project)
    version = active_model(session, project=project, kind=ModelKind.TAGGER)
    tagger, torch_device = None, resolve_device(device)
    if version is not None:
        model = load_checkpoint(
            model_file(settings, version.path), device=torch_device, kind="tagger"
        ).model
        assert isinstance(model, Tagger)
        tagger, report.tagger_version = model, version.version
    found: list[_Found] = []  # what the index keeps of each object, not its mask
    features: list[np.ndarray] = []
    for cut in cut_objects(session, settings, project, on_image=on_batch):
        features.append(object_features(cut.pixels, cut.objects, tagger, torch_device))
        found += [
            _Found(cut.image.id, obj.tags | obj.attributes, obj.box, obj.outline(), cut.unmasked)
            for obj in cut.objects
        ]
        report.from_model += cut.from_model
        report.images = cut.of
    report.objects = len(found)
    if len(found) < 2:
        raise InvalidInputError(
            f"project {project.slug!r} has {len(found)} object(s) in its masks: index objects "
            "once targets have masks (imported, finished by the crowd, or predicted)"
        )
    tag_sets = [f.tags for f in found]
    groups = attribute_groups(tag_sets, categories=categories, parents=parents)
    if not groups:
        raise InvalidInputError(
            "no attribute group: no two tags of one category name different objects' values"
        )
    labels = np.asarray([labels_of(groups, f.tags, f.unmasked, categories) for f in found])
    x = np.concatenate(features).astype(np.float32)
    held = held_out_images(sorted({f.image_id for f in found}), holdout)
    learn = np.asarray([f.image_id not in held for f in found])
    if learn.sum() < 2:
        raise InvalidInputError("too few objects outside the held-out images to learn from")
    weights, trained = train_attributes(
        x[learn],
        labels[learn],
        groups,
        options,
        attribute_dim=attribute_dim(x.shape[1]),
        blocks=feature_blocks(x.shape[1]),
    )
    report.groups = {g.name: list(g.values) for g in groups}
    report.accuracy, report.manipulated = trained.accuracy, trained.manipulated
    report.held_out = int((~learn).sum())
    if report.held_out:
        report.held_out_accuracy = weights.accuracy(x[~learn], labels[~learn], groups)
    index = build_index(
        weights,
        groups,
        x,
        image_ids=[f.image_id for f in found],
        labels=labels,
        boxes=[f.box for f in found],
        tags=[sorted(t) for t in tag_sets],
        outlines=[f.outline for f in found],
        meta={
            "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "tagger_version": report.tagger_version,
        },
    )
    buffer = io.BytesIO()
    index.save(buffer)
    open_storage(settings).write_bytes(index_key(project.slug), buffer.getvalue())
    report.seconds = round(time.perf_counter() - started, 1)
    return report
