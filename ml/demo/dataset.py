"""Write the demo dataset as a folder the project's importer reads.

Layout::

    OUT/
      images/<name>.png   RGB PNG, lossless
      tags.txt            "<name>.png tag1 tag2 ..." per image (Danbooru style)
      vocabulary.json     {"tags": [{name, display_name, category, parent, aliases, description,
                                  exhaustive}]}
      annotations.json    COCO instances, one iscrowd RLE annotation per (object, tag)

Each image lists every tag of its objects, parents included; on some lines a tag is written as
one of its aliases (chosen by a hash of the image and tag names, so deterministically) to
exercise alias resolution. The vocabulary and the COCO categories use canonical names; a COCO
category's supercategory is its parent, or itself for a root tag (as COCO's ``person``).

The same seed gives byte-identical files. The dataset is written into a hidden sibling folder
and renamed into place, so a crash never leaves a half-written dataset behind.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from ml.demo.scenes import Scene, generate_scenes
from ml.demo.vocabulary import VOCABULARY, get_tag, tag_names

ALIAS_EVERY = 3  # about one in three aliasable tag mentions is written as an alias
PNG_COMPRESS_LEVEL = 1  # noisy images barely compress; level 1 is as small and faster


@dataclass(frozen=True)
class DemoManifest:
    """What ``write_demo_dataset`` wrote."""

    out_dir: Path
    n_images: int
    n_annotations: int
    tags: tuple[str, ...]


def _hash(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def tag_token(image_file: str, tag: str) -> str:
    """Return how ``tag`` is written on the tags.txt line of ``image_file``: name or alias."""
    aliases = get_tag(tag).aliases
    digest = _hash(f"{image_file} {tag}")
    if not aliases or digest % ALIAS_EVERY != 0:
        return tag
    return aliases[(digest // ALIAS_EVERY) % len(aliases)]


def tags_line(scene: Scene) -> str:
    """Return the tags.txt line of one scene (no newline)."""
    file_name = f"{scene.name}.png"
    return " ".join([file_name, *(tag_token(file_name, tag) for tag in scene.tag_masks)])


def vocabulary_json() -> dict[str, Any]:
    """Return the content of vocabulary.json."""
    tags = [
        {
            "name": tag.name,
            "display_name": tag.display_name,
            "category": tag.category,
            "parent": tag.parent,
            "aliases": list(tag.aliases),
            "description": tag.description,
            "exhaustive": tag.exhaustive,
        }
        for tag in VOCABULARY
    ]
    return {"tags": tags}


def coco_categories() -> list[dict[str, Any]]:
    """Return the COCO categories: one per tag, ids from 1 in vocabulary order."""
    return [
        {"id": index, "name": tag.name, "supercategory": tag.parent or tag.name}
        for index, tag in enumerate(VOCABULARY, start=1)
    ]


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """Encode a mask as COCO compressed RLE with area and bbox.

    Shape:
        mask (H, W) bool.

    Returns:
        ``segmentation`` ({"size": [h, w], "counts": str}), ``area`` (int) and ``bbox``
        ([x, y, w, h] floats).
    """
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    segmentation = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
    bbox = [float(v) for v in mask_utils.toBbox(rle)]
    return {"segmentation": segmentation, "area": int(mask_utils.area(rle)), "bbox": bbox}


def scene_annotations(scene: Scene, image_id: int, first_id: int) -> list[dict[str, Any]]:
    """Return one COCO annotation per (object, tag) of a scene, ids from ``first_id``."""
    category_ids = {name: index for index, name in enumerate(tag_names(), start=1)}
    annotations: list[dict[str, Any]] = []
    for obj in scene.objects:
        encoded = encode_mask(obj.mask)
        for tag in obj.tags:
            annotations.append(
                {
                    "id": first_id + len(annotations),
                    "image_id": image_id,
                    "category_id": category_ids[tag],
                    **encoded,
                    "iscrowd": 1,
                }
            )
    return annotations


def _write_json(path: Path, content: dict[str, Any], *, indent: int | None) -> None:
    text = json.dumps(content, indent=indent, separators=None if indent else (",", ":"))
    path.write_text(text + "\n", encoding="utf-8")


def _write_image(path: Path, image: np.ndarray) -> None:
    Image.fromarray(image).save(path, format="PNG", compress_level=PNG_COMPRESS_LEVEL)


def _write_files(folder: Path, scenes: Iterable[Scene], *, seed: int) -> tuple[int, int]:
    """Write the whole dataset into ``folder``; return (images, annotations) counts."""
    (folder / "images").mkdir()
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    lines: list[str] = []
    for image_id, scene in enumerate(scenes, start=1):
        file_name = f"{scene.name}.png"
        _write_image(folder / "images" / file_name, scene.image)
        images.append(
            {"id": image_id, "file_name": file_name, "width": scene.width, "height": scene.height}
        )
        annotations.extend(scene_annotations(scene, image_id, len(annotations) + 1))
        lines.append(tags_line(scene))
    (folder / "tags.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _write_json(folder / "vocabulary.json", vocabulary_json(), indent=2)
    coco = {
        "info": {"description": "Tessera procedural demo dataset", "seed": seed},
        "licenses": [],
        "images": images,
        "categories": coco_categories(),
        "annotations": annotations,
    }
    _write_json(folder / "annotations.json", coco, indent=None)
    return len(images), len(annotations)


def _refuse_existing(out_dir: Path) -> None:
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        return
    if out_dir.exists():
        raise FileExistsError(
            f"{out_dir} already exists and is not an empty folder; "
            "choose a new path or remove it first, the demo dataset is never written over data"
        )


def write_demo_dataset(out_dir: Path, *, seed: int = 7, n_images: int = 60) -> DemoManifest:
    """Generate the demo dataset and write it to ``out_dir`` atomically.

    Args:
        out_dir: destination folder; it must not exist or be empty. Parents are created.
        seed: the dataset seed; the same seed gives byte-identical files.
        n_images: how many images to generate (at least 1).

    Returns:
        What was written.

    Raises:
        FileExistsError: ``out_dir`` exists and is not an empty folder (it is left untouched).
        ValueError: ``n_images`` is below 1.
    """
    if n_images < 1:
        raise ValueError(f"n_images must be at least 1, got {n_images}")
    out_dir = Path(out_dir)
    _refuse_existing(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        scenes = generate_scenes(seed=seed, n_images=n_images)
        written, n_annotations = _write_files(staging, scenes, seed=seed)
        _refuse_existing(out_dir)  # someone may have filled it meanwhile
        os.replace(staging, out_dir)  # POSIX: also replaces an empty folder, atomically
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return DemoManifest(out_dir, written, n_annotations, tag_names())
