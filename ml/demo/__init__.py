"""Procedural demo dataset: shapes on noisy backgrounds with exact ground-truth masks.

``write_demo_dataset(out_dir)`` writes images, a Danbooru-style tag file, the tag vocabulary and
COCO RLE annotations; ``generate_scenes`` yields the scenes in memory. Pure numpy, Pillow and
pycocotools; the same seed gives byte-identical files.
"""

from ml.demo.dataset import DemoManifest, write_demo_dataset
from ml.demo.scenes import Scene, SceneObject, generate_scene, generate_scenes
from ml.demo.vocabulary import VOCABULARY, DemoTag

__all__ = [
    "VOCABULARY",
    "DemoManifest",
    "DemoTag",
    "Scene",
    "SceneObject",
    "generate_scene",
    "generate_scenes",
    "write_demo_dataset",
]
