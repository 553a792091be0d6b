"""Tessera's consensus core: pure numpy, usable from a notebook.

Grid geometry (:mod:`.grid`), votes in COO layout (:mod:`.votes`), aggregation methods behind a
registry (:mod:`.registry`: majority vote, weighted majority, two-coin Dawid-Skene), online
updates (:mod:`.online`), retirement and refinement (:mod:`.rules`), dense mask fusion
(:mod:`.dense`), calibration (:mod:`.calibration`), simulated volunteers (:mod:`.simulate`) and
file I/O for ``tessera aggregate`` (:mod:`.io`).
"""

import importlib
from typing import TYPE_CHECKING, Any

# Imported at once: the function shares its name with its module, and the package attribute
# must be the function even after someone imports the module.
from ml.aggregation.dawid_skene import DawidSkeneConfig, dawid_skene

if TYPE_CHECKING:
    from ml.aggregation.calibration import expected_calibration_error, reliability_table
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
    from ml.aggregation.votes import (
        AggregationResult,
        Votes,
        from_dense,
        make_votes,
        split_by_group,
    )

_EXPORTS: dict[str, str] = {
    "AggregationMethod": "registry",
    "AggregationResult": "votes",
    "Cell": "grid",
    "cell_coverage": "grid",
    "cell_rect": "grid",
    "children": "grid",
    "choose_refinements": "rules",
    "compose": "grid",
    "DenseConsensus": "dense",
    "expected_calibration_error": "calibration",
    "from_dense": "votes",
    "fuse_masks": "dense",
    "get_method": "registry",
    "level_coverage": "grid",
    "majority_vote": "majority",
    "make_votes": "votes",
    "METHODS": "registry",
    "OnlineDawidSkene": "online",
    "parent": "grid",
    "PixelRect": "grid",
    "PROFILES": "simulate",
    "RefinementConfig": "rules",
    "reliability_table": "calibration",
    "retire": "rules",
    "Retirement": "rules",
    "RetirementConfig": "rules",
    "simulate_crowd": "simulate",
    "split_by_group": "votes",
    "VolunteerProfile": "simulate",
    "Votes": "votes",
    "weighted_majority": "majority",
}


def __getattr__(name: str) -> Any:
    """Import a name's module on first use (PEP 562): ``tessera aggregate`` starts in a fraction
    of the time when it does not load the grid, the rules and the simulators it never calls."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ml.aggregation' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"ml.aggregation.{module}"), name)
    globals()[name] = value
    return value


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
