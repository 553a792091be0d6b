"""Search at the object level: "like this object, but with one attribute changed".

The index (``tessera objects index``, ``app.jobs.objects``) holds every object cut from the
project's masks with its vector; this module reads it (once per process and per version of the
file) and answers a curator's query: an object of an image, optionally one attribute changed
(``old`` -> ``new`` of one attribute group), with the learned manipulation or prototype
arithmetic. Results are images, each shown with the object that matched.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.models import Image, Project
from app.services.errors import InvalidInputError, NotFoundError
from app.storage import open_storage
from ml.objects.index import Method, ObjectIndex

METHODS: tuple[Method, ...] = ("learned", "prototype")
_cache: dict[str, tuple[float | None, ObjectIndex]] = {}
_lock = threading.Lock()


def index_key(slug: str) -> str:
    return f"objects/{slug}/index.npz"


def load_object_index(settings: Settings, *, project: Project) -> ObjectIndex:
    """The project's object index, read once per version of its file."""
    storage = open_storage(settings)
    key = index_key(project.slug)
    stamp = storage.mtime(key)
    if stamp is None:
        raise NotFoundError(
            f"project {project.slug!r} has no object index yet: run `tessera objects index "
            f"--project {project.slug}`"
        )
    cache_key = f"{storage.url}|{key}"
    with _lock:
        cached = _cache.get(cache_key)
        if cached is not None and cached[0] == stamp:
            return cached[1]
    index = ObjectIndex.load(storage.local_path(key))
    with _lock:
        _cache[cache_key] = (stamp, index)
    return index


@dataclass(frozen=True)
class ObjectView:
    """One object as a page shows it."""

    row: int
    image_id: int
    tags: list[str]
    outline: list[list[int]]
    box: tuple[int, int, int, int]

    @property
    def points(self) -> str:
        """The outline as an SVG ``points`` attribute."""
        return " ".join(f"{x},{y}" for x, y in self.outline)


@dataclass(frozen=True)
class ObjectHit:
    image: Image
    object: ObjectView
    score: float


def _view(index: ObjectIndex, row: int) -> ObjectView:
    x0, y0, x1, y1 = (int(v) for v in index.boxes[row])
    return ObjectView(
        row, int(index.image_ids[row]), index.tags[row], index.outlines[row], (x0, y0, x1, y1)
    )


def objects_of_image(index: ObjectIndex, *, image_id: int) -> list[ObjectView]:
    return [_view(index, row) for row in index.rows_of(image_id)]


@dataclass(frozen=True)
class Change:
    old: str
    new: str


def search_objects(
    session: Session,
    settings: Settings,
    *,
    project: Project,
    image_id: int,
    row: int,
    change: Change | None = None,
    method: Literal["learned", "prototype"] = "learned",
    k: int = 12,
) -> tuple[ObjectView, list[ObjectHit]]:
    """The query object and the ``k`` best other images, each with its best-matching object."""
    index = load_object_index(settings, project=project)
    if row < 0 or row >= len(index) or int(index.image_ids[row]) != image_id:
        raise NotFoundError(f"image {image_id} has no object {row} in the index")
    if method not in METHODS:
        raise InvalidInputError(f"method must be one of {list(METHODS)}, not {method!r}")
    wanted = None
    if change is not None:
        try:
            wanted = index.find_change(change.old, change.new)
        except KeyError as exc:
            raise InvalidInputError(str(exc.args[0])) from None
    hits = index.search(index.query(row, wanted, method=method), k=k, exclude_images=[image_id])
    images = {
        i.id: i
        for i in session.scalars(
            select(Image).where(
                Image.project_id == project.id,
                Image.id.in_([int(index.image_ids[h.row]) for h in hits]),
            )
        )
    }
    out = [
        ObjectHit(images[int(index.image_ids[h.row])], _view(index, h.row), h.score)
        for h in hits
        if int(index.image_ids[h.row]) in images  # an image deleted since the index was built
    ]
    return _view(index, row), out
