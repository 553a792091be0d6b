"""Read a COCO instances file (such as the demo dataset's ``annotations.json``) into the items
the tagger and the segmenter train on.

COCO masks are complete ground truth: a tag without an annotation in an image is known absent
there, so its mask is all zero with full weight. Masks stay ``uint8`` in memory (the datasets
convert per item).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pycocotools import mask as mask_utils

from ml.data import SegmenterItem, TaggerItem


@dataclass(frozen=True)
class CocoSplit:
    """Tags (category order), their parent indices and one item of each kind per image."""

    tags: tuple[str, ...]
    parents: tuple[int, ...]
    tagger_items: list[TaggerItem]
    segmenter_items: list[SegmenterItem]


def _parents(categories: list[dict[str, Any]]) -> tuple[int, ...]:
    index = {c["name"]: i for i, c in enumerate(categories)}
    # COCO's supercategory is the parent, or the tag itself for a root (the demo's convention)
    return tuple(
        index[c["supercategory"]]
        if c.get("supercategory") in index and c["supercategory"] != c["name"]
        else -1
        for c in categories
    )


def _masks(
    annotations: list[dict[str, Any]], column: dict[int, int], n_tags: int, h: int, w: int
) -> npt.NDArray[np.uint8]:
    masks = np.zeros((n_tags, h, w), dtype=np.uint8)
    for ann in annotations:
        segmentation = ann["segmentation"]
        if isinstance(segmentation, list):  # polygons
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))
        elif isinstance(segmentation["counts"], list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(segmentation, h, w)
        else:
            rle = dict(segmentation, counts=segmentation["counts"].encode("ascii"))
        masks[column[ann["category_id"]]] |= mask_utils.decode(rle).astype(np.uint8)
    return masks


def read_coco(annotations_json: Path, images_dir: Path) -> CocoSplit:
    """Read every image of a COCO file with its multi-hot tags and per-tag masks."""
    coco = json.loads(Path(annotations_json).read_text(encoding="utf-8"))
    categories = list(coco["categories"])
    column = {c["id"]: i for i, c in enumerate(categories)}
    by_image: dict[int, list[dict[str, Any]]] = {img["id"]: [] for img in coco["images"]}
    for ann in coco["annotations"]:
        by_image[ann["image_id"]].append(ann)
    tagger_items, segmenter_items = [], []
    for img in coco["images"]:
        anns = by_image[img["id"]]
        labels = np.zeros(len(categories), dtype=np.float32)
        labels[[column[a["category_id"]] for a in anns]] = 1.0
        path = Path(images_dir) / img["file_name"]
        masks = _masks(anns, column, len(categories), img["height"], img["width"])
        tagger_items.append(TaggerItem(path, labels))
        segmenter_items.append(SegmenterItem(path, masks))  # weight 1: hard masks
    tags = tuple(c["name"] for c in categories)
    return CocoSplit(tags, _parents(categories), tagger_items, segmenter_items)


def read_demo(folder: Path) -> CocoSplit:
    """Read a folder written by ``ml.demo.write_demo_dataset``."""
    folder = Path(folder)
    return read_coco(folder / "annotations.json", folder / "images")
