"""Readers for the files an import brings: tag files, a tag vocabulary and COCO instances.

Tag files come in three shapes, chosen by extension:

- ``.txt``: Danbooru-style lines ``name.jpg tag1 tag2 ...`` (``#`` starts a comment);
- ``.csv``: a header with an image column (``image``, ``file``, ``file_name`` or ``filename``)
  and a ``tags`` column (space- or comma-separated), or a ``tag`` column, one pair per row;
- ``.json``: ``{"name.jpg": ["tag1", "tag2"]}`` or ``[{"image": ..., "tags": [...]}]``.

Readers are pure: they raise ``ImportFormatError`` naming the file and the line or entry at
fault, and never touch the database.
"""

from __future__ import annotations

import csv
import json
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

IMAGE_COLUMNS = ("image", "file", "file_name", "filename")
TAG_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_()\-:'.!+/&]*$")
MAX_TAG_LENGTH = 128


class ImportFormatError(ValueError):
    """A file of the import cannot be read; the message names the file and the place."""


@dataclass(frozen=True)
class TagRecord:
    image: str
    tags: tuple[str, ...]
    where: str  # "tags.txt line 3", for messages


@dataclass(frozen=True)
class VocabularyEntry:
    name: str
    display_name: str
    category: str
    parent: str | None
    aliases: tuple[str, ...]
    description: str
    exhaustive: bool = False  # the tag's mask is the union of its children's


@dataclass(frozen=True)
class CocoImage:
    id: int
    file_name: str
    width: int
    height: int


@dataclass
class CocoData:
    images: dict[int, CocoImage]
    categories: dict[int, tuple[str, str | None]]  # id -> (name, supercategory)
    annotations: dict[int, list[tuple[int, Any, str]]] = field(default_factory=dict)


def normalise_tag_name(raw: str) -> str:
    """Danbooru conventions: lower case, words joined by underscores, trimmed."""
    name = re.sub(r"[\s_]+", "_", raw.strip().lower()).strip("_")
    if not name or len(name) > MAX_TAG_LENGTH or not TAG_NAME_RE.match(name):
        raise ValueError(
            f"{raw!r} is not a valid tag name (letters, digits and _()-:'.!+/&, "
            f"at most {MAX_TAG_LENGTH} characters)"
        )
    return name


def _split_tags(text: str) -> tuple[str, ...]:
    return tuple(t for t in re.split(r"[\s,]+", text.strip()) if t)


def _read_txt(path: Path) -> list[TagRecord]:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        image, _, rest = line.partition(" ")
        records.append(TagRecord(image, _split_tags(rest), f"{path.name} line {number}"))
    return records


def _read_csv(path: Path) -> list[TagRecord]:
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip().lower() for c in reader.fieldnames or []]
        image_col = next((c for c in IMAGE_COLUMNS if c in columns), None)
        tag_col = "tags" if "tags" in columns else "tag" if "tag" in columns else None
        if image_col is None or tag_col is None:
            raise ImportFormatError(
                f"{path.name}: the header must name an image column ({', '.join(IMAGE_COLUMNS)}) "
                f"and a 'tags' or 'tag' column; found {columns}"
            )
        grouped: dict[str, list[str]] = defaultdict(list)
        where: dict[str, str] = {}
        for number, row in enumerate(reader, start=2):
            row = {(k or "").strip().lower(): (v or "") for k, v in row.items()}
            image = row[image_col].strip()
            if not image:
                raise ImportFormatError(f"{path.name} line {number}: the image column is empty")
            grouped[image].extend(_split_tags(row[tag_col]))
            where.setdefault(image, f"{path.name} line {number}")
    return [TagRecord(image, tuple(tags), where[image]) for image, tags in grouped.items()]


def _json_tags(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return _split_tags(value)
    if isinstance(value, list) and all(isinstance(t, str) for t in value):
        return tuple(value)
    raise ImportFormatError(f"{where}: tags must be a list of strings or a space-separated string")


def _read_json(path: Path) -> list[TagRecord]:
    data = _load_json(path)
    if isinstance(data, dict):
        return [
            TagRecord(str(image), _json_tags(tags, f"{path.name} entry {image!r}"), path.name)
            for image, tags in data.items()
        ]
    if not isinstance(data, list):
        raise ImportFormatError(f"{path.name}: expected an object or a list at the top level")
    records = []
    for index, item in enumerate(data):
        where = f"{path.name} entry {index}"
        image = next(
            (item.get(c) for c in IMAGE_COLUMNS if isinstance(item, dict) and c in item), None
        )
        if not isinstance(image, str) or "tags" not in item:
            raise ImportFormatError(f"{where}: needs an 'image' (or 'file_name') and 'tags'")
        records.append(TagRecord(image, _json_tags(item["tags"], where), where))
    return records


TAG_FILE_READERS = {".txt": _read_txt, ".csv": _read_csv, ".json": _read_json}


def check_text_size(path: Path, max_bytes: int | None) -> None:
    """Refuse a description file (tags, vocabulary, COCO) over ``max_bytes`` before reading it:
    read whole, JSON takes up to twenty times its size in memory (120 MB of ``[{},{},...]``
    took 2.7 GB), and an archive may hold gigabytes of it."""
    if max_bytes is not None and (size := path.stat().st_size) > max_bytes:
        raise ImportFormatError(
            f"{path.name}: {size:,} bytes, over the limit of {max_bytes:,} for a tag, "
            "vocabulary or COCO file (TESSERA_MAX_DESCRIPTION_BYTES)"
        )


def read_tag_file(path: Path, *, max_bytes: int | None = None) -> list[TagRecord]:
    check_text_size(path, max_bytes)
    reader = TAG_FILE_READERS.get(path.suffix.lower())
    if reader is None:
        raise ImportFormatError(
            f"{path.name}: unknown tag file format {path.suffix!r}; use .txt (Danbooru lines "
            "'name.jpg tag1 tag2'), .csv (image,tags) or .json"
        )
    try:
        return reader(path)
    except UnicodeDecodeError as exc:
        raise ImportFormatError(f"{path.name}: not UTF-8 text ({exc.reason})") from exc


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ImportFormatError(
            f"{path.name}: invalid JSON at line {exc.lineno}: {exc.msg}"
        ) from exc
    except UnicodeDecodeError as exc:
        raise ImportFormatError(f"{path.name}: not UTF-8 text ({exc.reason})") from exc


def read_vocabulary(path: Path, *, max_bytes: int | None = None) -> list[VocabularyEntry]:
    """``{"tags": [{"name", "display_name", "category", "parent", "aliases", "description",
    "exhaustive"}]}``; ``exhaustive`` (true/false, default false) says that every instance of
    the tag is one of its children's."""
    check_text_size(path, max_bytes)
    data = _load_json(path)
    items = data.get("tags") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise ImportFormatError(f'{path.name}: expected {{"tags": [...]}}')
    entries = []
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ImportFormatError(f"{path.name} tag {index}: needs a 'name' string")
        if not isinstance(item.get("exhaustive", False), bool):
            raise ImportFormatError(f"{path.name} tag {index}: 'exhaustive' must be true or false")
        aliases = item.get("aliases") or []
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise ImportFormatError(f"{path.name} tag {index}: 'aliases' must be a list of names")
        for key in ("parent", "display_name", "category", "description"):
            if item.get(key) is not None and not isinstance(item[key], str):
                raise ImportFormatError(f"{path.name} tag {index}: {key!r} must be a string")
        if len(item.get("display_name") or "") > MAX_TAG_LENGTH:
            # The column's length: SQLite would store a longer one, PostgreSQL refuse it.
            raise ImportFormatError(
                f"{path.name} tag {index}: 'display_name' has more than {MAX_TAG_LENGTH} characters"
            )
        entries.append(
            VocabularyEntry(
                name=item["name"],
                display_name=str(item.get("display_name") or item["name"].replace("_", " ")),
                category=str(item.get("category") or "general"),
                parent=item.get("parent"),
                aliases=tuple(aliases),
                description=str(item.get("description") or ""),
                exhaustive=bool(item.get("exhaustive", False)),
            )
        )
    return entries


def is_coco(path: Path, *, max_bytes: int | None = None) -> bool:
    if path.suffix.lower() != ".json":
        return False
    check_text_size(path, max_bytes)
    try:
        data = _load_json(path)
    except ImportFormatError:
        return False
    return isinstance(data, dict) and {"images", "annotations", "categories"} <= data.keys()


def _is_id(value: Any) -> bool:
    """An integer as JSON has it (``true`` is a bool to Python, and no id)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _coco_image(item: Any, where: str) -> CocoImage:
    fields = ("id", "file_name", "width", "height")
    if (
        not isinstance(item, dict)
        or not all(k in item for k in fields)
        or not all(_is_id(item[k]) for k in ("id", "width", "height"))
        or not isinstance(item["file_name"], str)
    ):
        raise ImportFormatError(
            f"{where}: needs id, width and height (integers) and file_name (a string)"
        )
    return CocoImage(item["id"], item["file_name"], item["width"], item["height"])


def read_coco(path: Path, *, max_bytes: int | None = None) -> CocoData:
    check_text_size(path, max_bytes)
    data = _load_json(path)
    if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= data.keys():
        raise ImportFormatError(
            f"{path.name}: not COCO instances (images, annotations, categories)"
        )
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            raise ImportFormatError(f"{path.name}: {key!r} must be a list")
    images = {}
    for index, item in enumerate(data["images"]):
        image = _coco_image(item, f"{path.name} images[{index}]")
        images[image.id] = image
    categories = {}
    for index, item in enumerate(data["categories"]):
        if not isinstance(item, dict) or "id" not in item or "name" not in item:
            raise ImportFormatError(f"{path.name} categories[{index}]: needs id and name")
        supercategory = item.get("supercategory")
        if (
            not _is_id(item["id"])
            or not isinstance(item["name"], str)
            or not isinstance(supercategory, str | None)
        ):
            raise ImportFormatError(
                f"{path.name} categories[{index}]: 'id' must be an integer, 'name' and "
                "'supercategory' strings"
            )
        categories[item["id"]] = (item["name"], supercategory)
    coco = CocoData(images=images, categories=categories)
    for index, ann in enumerate(data["annotations"]):
        where = f"{path.name} annotations[{index}]"
        if (
            not isinstance(ann, dict)
            or not {"image_id", "category_id", "segmentation"} <= ann.keys()
        ):
            raise ImportFormatError(f"{where}: needs image_id, category_id and segmentation")
        if not _is_id(ann["image_id"]) or not _is_id(ann["category_id"]):
            raise ImportFormatError(f"{where}: image_id and category_id must be integers")
        if ann["image_id"] not in images or ann["category_id"] not in categories:
            raise ImportFormatError(f"{where}: unknown image_id or category_id")
        coco.annotations.setdefault(int(ann["image_id"]), []).append(
            (int(ann["category_id"]), ann["segmentation"], where)
        )
    return coco


def _segmentation_mask(segmentation: Any, height: int, width: int, where: str) -> np.ndarray:
    """Polygons, uncompressed RLE or compressed RLE -> (H, W) bool.

    Checked before pycocotools sees them, because it trusts its input: a polygon vertex at
    1e8 made it rasterise for 16 s in 7.8 GB (one at 1e9 takes the server's memory), a NaN never
    ends, and an RLE whose runs do not cover the image decodes the rest from uninitialised
    memory. Polygons are clipped to the image (a real crowd's vertices fall a little outside);
    one of fewer than three points holds no pixel and is left out (pycocotools would read a
    four-number one as a box); runs must be whole, not negative, and cover exactly H x W.
    """
    try:
        if isinstance(segmentation, list):
            polygons = _polygons(segmentation, height, width, where)
            if not polygons:
                return np.zeros((height, width), dtype=bool)
            rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
        elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
            _check_size(segmentation, height, width, where)
            _check_runs(segmentation["counts"], height, width, where)
            rle = mask_utils.frPyObjects(segmentation, height, width)
        elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), str):
            _check_size(segmentation, height, width, where)
            _check_runs(_compressed_runs(segmentation["counts"], where), height, width, where)
            rle = {"size": [height, width], "counts": segmentation["counts"].encode()}
        else:
            raise ImportFormatError(f"{where}: segmentation is neither polygons nor RLE")
        return np.asarray(mask_utils.decode(rle), dtype=bool)
    except ImportFormatError:
        raise
    except Exception as exc:
        raise ImportFormatError(f"{where}: segmentation cannot be decoded ({exc})") from exc


def _polygons(segmentation: list[Any], height: int, width: int, where: str) -> list[list[float]]:
    """The polygons of a COCO segmentation, clipped to the image with a pixel's margin; those
    left with fewer than three points are dropped."""
    out = []
    for k, polygon in enumerate(segmentation):
        if not isinstance(polygon, list) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in polygon
        ):
            raise ImportFormatError(f"{where}: polygon {k} is not a list of numbers")
        if len(polygon) % 2:
            raise ImportFormatError(f"{where}: polygon {k} has an odd count of coordinates")
        points = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
        if not np.isfinite(points).all():
            raise ImportFormatError(f"{where}: polygon {k} has a coordinate that is not finite")
        clipped = clip_polygon(points, (-1.0, -1.0, width + 1.0, height + 1.0))
        if len(clipped) >= 3:
            out.append(clipped.reshape(-1).tolist())
    return out


def clip_polygon(points: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """Sutherland-Hodgman: the part of a polygon (``(n, 2)`` x, y vertices) inside an upright
    ``box`` (x0, y0, x1, y1), as its vertices ``(m, 2)``; exact, as the box is convex."""
    x0, y0, x1, y1 = box
    edges = ((0, x0, 1.0), (0, x1, -1.0), (1, y0, 1.0), (1, y1, -1.0))
    pts = np.asarray(points, dtype=np.float64)
    for axis, bound, sign in edges:
        if len(pts) == 0:
            break
        inside = sign * (pts[:, axis] - bound) >= 0
        nxt = np.roll(pts, -1, axis=0)
        nxt_inside = np.roll(inside, -1)
        out: list[np.ndarray] = []
        for p, q, p_in, q_in in zip(pts, nxt, inside, nxt_inside, strict=True):
            if p_in:
                out.append(p)
            if p_in != q_in:  # the edge crosses the bound: keep where it does
                t = (bound - p[axis]) / (q[axis] - p[axis])
                out.append(p + t * (q - p))
        pts = np.asarray(out, dtype=np.float64).reshape(-1, 2)
    return pts


def _check_size(segmentation: dict[str, Any], height: int, width: int, where: str) -> None:
    size = segmentation.get("size")
    if size != [height, width]:
        raise ImportFormatError(
            f"{where}: RLE size {size} differs from the image's {[height, width]}"
        )


def _check_runs(counts: list[Any], height: int, width: int, where: str) -> None:
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
        raise ImportFormatError(f"{where}: RLE counts must be whole numbers, none negative")
    if sum(counts) != height * width:
        raise ImportFormatError(
            f"{where}: RLE runs cover {sum(counts)} pixels, the image has {height * width}"
        )


def _compressed_runs(text: str, where: str) -> list[int]:
    """The runs of COCO's compressed RLE string (pycocotools' ``rleFrString``: 5 bits a
    character from '0', a continuation bit, a sign bit, each run after the second stored as the
    difference from the run two before)."""
    runs: list[int] = []
    p = 0
    while p < len(text):
        x, k, more = 0, 0, True
        while more:
            if p >= len(text):
                raise ImportFormatError(f"{where}: RLE counts end in the middle of a run")
            c = ord(text[p]) - 48
            if not 0 <= c < 64:
                raise ImportFormatError(f"{where}: RLE counts hold a character out of range")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def coco_masks(coco: CocoData, image: CocoImage) -> Iterator[tuple[str, np.ndarray]]:
    """The union of each category's annotations on one image, with the category's name, one
    category at a time: all of them at once took 1.4 GB for 40 categories of a 36-megapixel
    image."""
    by_category: dict[int, list[tuple[Any, str]]] = defaultdict(list)
    for category_id, segmentation, where in coco.annotations.get(image.id, []):
        by_category[category_id].append((segmentation, where))
    for category_id, shapes in by_category.items():
        mask = np.zeros((image.height, image.width), dtype=bool)
        for segmentation, where in shapes:
            mask |= _segmentation_mask(segmentation, image.height, image.width, where)
        yield coco.categories[category_id][0], mask


def find_first(folder: Path, names: Iterable[str]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)
