"""Tessera's consensus core: pure numpy, usable from a notebook.

Grid geometry (:mod:`.grid`), votes in COO layout (:mod:`.votes`), aggregation methods behind a
registry (:mod:`.registry`: majority vote, weighted majority, two-coin Dawid-Skene), online
updates (:mod:`.online`), retirement and refinement (:mod:`.rules`), dense mask fusion
(:mod:`.dense`), calibration (:mod:`.calibration`), simulated volunteers (:mod:`.simulate`) and
file I/O for ``tessera aggregate`` (:mod:`.io`).
"""

from ml.aggregation.calibration import expected_calibration_error, reliability_table
from ml.aggregation.dawid_skene import DawidSkeneConfig, dawid_skene
from ml.aggregation.dense import DenseConsensus, fuse_masks
from ml.aggregation.grid import (
    Cell,
    PixelRect,
    cell_coverage,
    cell_rect,
    children,
    compose,
    level_coverage,
    parent,
)
from ml.aggregation.majority import majority_vote, weighted_majority
from ml.aggregation.online import OnlineDawidSkene
from ml.aggregation.registry import METHODS, AggregationMethod, get_method
from ml.aggregation.rules import (
    RefinementConfig,
    Retirement,
    RetirementConfig,
    choose_refinements,
    retire,
)
from ml.aggregation.simulate import PROFILES, VolunteerProfile, simulate_crowd
from ml.aggregation.votes import AggregationResult, Votes, from_dense, make_votes, split_by_group

__all__ = [
    "METHODS",
    "PROFILES",
    "AggregationMethod",
    "AggregationResult",
    "Cell",
    "DawidSkeneConfig",
    "DenseConsensus",
    "OnlineDawidSkene",
    "PixelRect",
    "RefinementConfig",
    "Retirement",
    "RetirementConfig",
    "VolunteerProfile",
    "Votes",
    "cell_coverage",
    "cell_rect",
    "children",
    "choose_refinements",
    "compose",
    "dawid_skene",
    "expected_calibration_error",
    "from_dense",
    "fuse_masks",
    "get_method",
    "level_coverage",
    "majority_vote",
    "make_votes",
    "parent",
    "reliability_table",
    "retire",
    "simulate_crowd",
    "split_by_group",
    "weighted_majority",
]
