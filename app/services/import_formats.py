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
from collections.abc import Iterable
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


def read_tag_file(path: Path) -> list[TagRecord]:
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


def read_vocabulary(path: Path) -> list[VocabularyEntry]:
    """``{"tags": [{"name", "display_name", "category", "parent", "aliases", "description",
    "exhaustive"}]}``; ``exhaustive`` (true/false, default false) says that every instance of
    the tag is one of its children's."""
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


def is_coco(path: Path) -> bool:
    if path.suffix.lower() != ".json":
        return False
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


def read_coco(path: Path) -> CocoData:
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
    """Polygons, uncompressed RLE or compressed RLE -> (H, W) bool."""
    try:
        if isinstance(segmentation, list):
            rles = mask_utils.frPyObjects(segmentation, height, width)
            rle = mask_utils.merge(rles)
        elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
            rle = mask_utils.frPyObjects(segmentation, height, width)
        elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), str):
            rle = {"size": segmentation["size"], "counts": segmentation["counts"].encode()}
        else:
            raise ImportFormatError(f"{where}: segmentation is neither polygons nor RLE")
        if list(rle["size"]) != [height, width]:
            raise ImportFormatError(
                f"{where}: RLE size {list(rle['size'])} differs from the image's {[height, width]}"
            )
        return np.asarray(mask_utils.decode(rle), dtype=bool)
    except ImportFormatError:
        raise
    except Exception as exc:
        raise ImportFormatError(f"{where}: segmentation cannot be decoded ({exc})") from exc


def coco_masks(coco: CocoData, image: CocoImage) -> dict[str, np.ndarray]:
    """The union of each category's annotations on one image, by category name."""
    masks: dict[str, np.ndarray] = {}
    for category_id, segmentation, where in coco.annotations.get(image.id, []):
        name = coco.categories[category_id][0]
        mask = _segmentation_mask(segmentation, image.height, image.width, where)
        masks[name] = masks[name] | mask if name in masks else mask
    return masks


def find_first(folder: Path, names: Iterable[str]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)
