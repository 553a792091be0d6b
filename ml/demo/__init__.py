"""Procedural demo dataset: shapes on noisy backgrounds with exact ground-truth masks.

``write_demo_dataset(out_dir)`` writes images, a Danbooru-style tag file, the tag vocabulary and
COCO RLE annotations; ``generate_scenes`` yields the scenes in memory and ``size_spread`` counts
their objects in COCO's small, medium and large classes. Pure numpy, Pillow and
pycocotools; the same seed gives byte-identical files.
"""

from ml.demo.dataset import DemoManifest, write_demo_dataset
from ml.demo.scenes import Scene, SceneObject, generate_scene, generate_scenes
from ml.demo.sizes import SizeSpread, size_spread
from ml.demo.vocabulary import VOCABULARY, DemoTag

__all__ = [
    "VOCABULARY",
    "DemoManifest",
    "DemoTag",
    "Scene",
    "SceneObject",
    "SizeSpread",
    "generate_scene",
    "generate_scenes",
    "size_spread",
    "write_demo_dataset",
]
