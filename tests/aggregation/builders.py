"""Typed builders for aggregation tests."""

from __future__ import annotations

import numpy as np

from ml.aggregation.simulate import SimulatedCrowd, sample_coverage, sample_gold, simulate_crowd


def crowd(
    seed: int,
    *,
    n_items: int = 80,
    n_workers: int = 12,
    votes_per_item: int = 5,
    gold_fraction: float = 0.1,
    mix: dict[str, float] | None = None,
) -> tuple[SimulatedCrowd, np.ndarray]:
    """A small simulated crowd and a gold vector (-1 unknown)."""
    rng = np.random.default_rng(seed)
    cov = sample_coverage(n_items, rng)
    c = simulate_crowd(
        cov,
        n_workers=n_workers,
        votes_per_item=votes_per_item,
        rng=rng,
        mix=mix or {"diligent": 0.6, "sloppy": 0.2, "random_clicker": 0.2},
    )
    return c, sample_gold(c.truth, gold_fraction, rng)
