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

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.models import Image, Project
from app.services.errors import InvalidInputError, NotFoundError
from app.storage import open_storage
from ml.objects.index import Method, ObjectIndex
from ml.objects.instances import NONE

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
    values: list[str]  # its value in each attribute group (none left out)

    @property
    def label(self) -> str:
        """What it is, by its attribute values ("star · blue · dotted"), else by its tags."""
        return " · ".join(self.values) or ", ".join(self.tags)

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
    values = [
        g.values[v]
        for g, v in zip(index.groups, index.labels[row], strict=True)
        if v >= 0 and g.values[v] != NONE
    ]
    return ObjectView(
        row,
        int(index.image_ids[row]),
        index.tags[row],
        index.outlines[row],
        (x0, y0, x1, y1),
        values,
    )


def objects_of_image(index: ObjectIndex, *, image_id: int) -> list[ObjectView]:
    return [_view(index, row) for row in index.rows_of(image_id)]


@dataclass(frozen=True)
class Choice:
    """The values one attribute of an object may be changed to, for a form."""

    group: str  # the group's name
    old: str
    new: list[str]

    @property
    def label(self) -> str:
        """The group's name, or its values when its name is only a list of them."""
        return self.group if "/" not in self.group else " / ".join([self.old, *self.new])


def choices(index: ObjectIndex, *, row: int) -> list[Choice]:
    """Every change one query of object ``row`` may ask for: per attribute group, from the
    object's value to each other value (a group whose value is unknown offers none)."""
    out = []
    for g, group in enumerate(index.groups):
        old = int(index.labels[row, g])
        if old >= 0:
            others = [v for v in group.values if v != group.values[old]]
            out.append(Choice(group.name, group.values[old], others))
    return out


def search_objects(
    session: Session,
    settings: Settings,
    *,
    project: Project,
    image_id: int,
    row: int,
    to: str | None = None,
    method: str = "learned",
    k: int = 12,
) -> tuple[ObjectView, list[ObjectHit]]:
    """The query object and the ``k`` best other images, each with its best-matching object.
    ``to``: a value of one of the object's attribute groups (its own value: a plain search)."""
    index = load_object_index(settings, project=project)
    if row < 0 or row >= len(index) or int(index.image_ids[row]) != image_id:
        raise NotFoundError(f"image {image_id} has no object {row} in the index")
    if method not in METHODS:
        raise InvalidInputError(f"method must be one of {list(METHODS)}, not {method!r}")
    change = None
    own = {g.values[v] for g, v in zip(index.groups, index.labels[row], strict=True) if v >= 0}
    if to and to not in own:
        offered = [c for c in choices(index, row=row) if to in c.new]
        if not offered:
            names = sorted({v for c in choices(index, row=row) for v in c.new})
            raise InvalidInputError(f"{to!r} is not a value this object can be changed to: {names}")
        group = index.group_index(offered[0].group)
        change = (group, index.groups[group].values.index(to))
    query = index.query(row, change, method=method)
    hits = index.search(query, k=k, exclude_images=[image_id])
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
