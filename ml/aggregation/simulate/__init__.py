"""Simulated crowds for tests, benchmarks and load tests.

* :mod:`.votes`: volunteers answering yes/no questions about tiles (the grid tasks).
"""

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
    "DEFAULT_MIX",
    "PROFILES",
    "SimulatedCrowd",
    "VolunteerProfile",
    "answer",
    "assign_workers",
    "get_profile",
    "sample_coverage",
    "sample_gold",
    "simulate_crowd",
]
