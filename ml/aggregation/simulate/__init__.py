"""Simulated crowds for tests, benchmarks and load tests.

* :mod:`.votes`: volunteers answering yes/no questions about tiles (the grid tasks).
* :mod:`.masks`: annotators drawing a polygon around an object in a photograph-like image
  (dense consensus), with the mistakes real crowds make.
"""

from ml.aggregation.simulate.masks import (
    ANNOTATOR_MIX,
    ANNOTATOR_STYLES,
    AnnotatorStyle,
    DenseCrowd,
    DenseScene,
    draw_mask,
    photo_like_scene,
    simulate_annotators,
)
from ml.aggregation.simulate.votes import (
    DEFAULT_MIX,
    PROFILES,
    SimulatedCrowd,
    VolunteerProfile,
    answer,
    assign_workers,
    get_profile,
    sample_coverage,
    sample_gold,
    simulate_crowd,
)

__all__ = [
    "ANNOTATOR_MIX",
    "ANNOTATOR_STYLES",
    "DEFAULT_MIX",
    "PROFILES",
    "AnnotatorStyle",
    "DenseCrowd",
    "DenseScene",
    "SimulatedCrowd",
    "VolunteerProfile",
    "answer",
    "assign_workers",
    "draw_mask",
    "get_profile",
    "photo_like_scene",
    "sample_coverage",
    "sample_gold",
    "simulate_annotators",
    "simulate_crowd",
]
