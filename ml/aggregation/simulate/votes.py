"""Simulated volunteers for tests, benchmarks and load tests.

Each volunteer kind has a sensitivity and specificity, a coverage threshold (the fraction of a
tile that must show the object before they see it) and a lognormal response time. Given the
true coverage of each tile, a volunteer *sees* the object when ``coverage >= threshold`` and
answers yes with probability ``sensitivity`` if they see it, ``1 - specificity`` otherwise.
Everything is driven by a caller-supplied ``numpy.random.Generator``, so runs are reproducible.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ml.aggregation.votes import FloatArray, Int8Array, Votes, make_votes


@dataclass(frozen=True)
class VolunteerProfile:
    """One kind of volunteer.

    ``time_median_s`` and ``time_sigma`` parametrise a lognormal response time per tile.
    """

    name: str
    sensitivity: float
    specificity: float
    coverage_threshold: float
    time_median_s: float
    time_sigma: float = 0.5
    # People do not see a part of the object at a sharp threshold: with ``spread`` > 0 the
    # chance of seeing it rises as a logistic in log(coverage), even at ``coverage_threshold``
    # (0: a sharp threshold). ``near_yes``: the chance of a "yes" on an empty tile that borders
    # the object (its shadow, its outline a few pixels away), where people err most.
    spread: float = 0.0
    near_yes: float = 0.0


PROFILES: dict[str, VolunteerProfile] = {
    "diligent": VolunteerProfile("diligent", 0.92, 0.95, 0.02, 2.5, 0.4),
    "sloppy": VolunteerProfile("sloppy", 0.75, 0.85, 0.25, 1.5, 0.6),
    "random_clicker": VolunteerProfile("random_clicker", 0.5, 0.5, 0.0, 0.6, 0.5),
    "adversary": VolunteerProfile("adversary", 0.15, 0.15, 0.02, 1.8, 0.5),
    "lazy": VolunteerProfile("lazy", 0.0, 1.0, 1.0, 0.4, 0.3),
    # Boundary errors as people make them (``spread``, ``near_yes``): a careful person sees
    # half the time a part covering 3% of a tile, and says yes to a tenth of the empty tiles
    # beside the object; a hasty one needs 12% and takes a quarter of those tiles.
    "careful": VolunteerProfile("careful", 0.95, 0.97, 0.03, 2.5, 0.4, 0.6, 0.10),
    "hasty": VolunteerProfile("hasty", 0.85, 0.93, 0.12, 1.5, 0.6, 0.8, 0.25),
    # Never wrong, and sees any part of the object however little of a tile it covers: what the
    # protocol itself allows at a budget (``bench/campaign.py --crowd oracle``).
    "oracle": VolunteerProfile("oracle", 1.0, 1.0, 0.0, 2.5, 0.4),
}

DEFAULT_MIX: dict[str, float] = {
    "diligent": 0.5,
    "sloppy": 0.2,
    "random_clicker": 0.2,
    "adversary": 0.1,
}


def get_profile(name: str) -> VolunteerProfile:
    """The named profile; KeyError lists the names."""
    try:
        return PROFILES[name]
    except KeyError:
        raise KeyError(f"unknown volunteer kind {name!r}; choose from {sorted(PROFILES)}") from None


def answer(
    profile: VolunteerProfile,
    coverage: npt.ArrayLike,
    rng: np.random.Generator,
    near: npt.ArrayLike | None = None,
) -> tuple[Int8Array, FloatArray]:
    """One volunteer's labels and response times on tiles.

    Shape:
        coverage: ``(n,)`` true coverage fractions in [0, 1]; ``near`` ``(n,)``: which tiles
        border the object (for ``profile.near_yes``); returns two ``(n,)`` arrays.

    Returns:
        ``(labels int8 in {0, 1}, seconds float64)``.
    """
    cov = np.asarray(coverage, dtype=np.float64)
    threshold = max(profile.coverage_threshold, 1e-12)
    if profile.spread > 0:  # drawn only for such profiles: the others' streams stay as they were
        with np.errstate(divide="ignore"):
            z = (np.log(np.maximum(cov, 1e-12)) - np.log(threshold)) / profile.spread
        sees = (cov > 0) & (rng.random(cov.shape) < 1.0 / (1.0 + np.exp(-z)))
    else:
        sees = cov >= threshold
    false_yes = np.full(cov.shape, 1.0 - profile.specificity)
    if near is not None and profile.near_yes > 0:
        beside = np.asarray(near, dtype=bool) & (cov == 0)
        false_yes = np.where(beside, max(profile.near_yes, 1.0 - profile.specificity), false_yes)
    p_yes = np.where(sees, profile.sensitivity, false_yes)
    labels = (rng.random(cov.shape) < p_yes).astype(np.int8)
    seconds = rng.lognormal(np.log(profile.time_median_s), profile.time_sigma, cov.shape)
    return labels, seconds


@dataclass(frozen=True)
class SimulatedCrowd:
    """Votes of a simulated crowd plus the hidden truth.

    Shape:
        truth, coverage: ``(n_items,)``; kind: ``(n_workers,)`` index into ``kinds``;
        seconds: ``(n_votes,)`` aligned with ``votes``.
    """

    votes: Votes
    seconds: FloatArray
    truth: Int8Array
    coverage: FloatArray
    kind: npt.NDArray[np.int64]
    kinds: tuple[str, ...]


def sample_coverage(
    n_items: int, rng: np.random.Generator, *, positive_rate: float = 0.35, partial: float = 0.15
) -> FloatArray:
    """Coverage fractions: mostly 0 or 1, with a share of partial tiles (object borders)."""
    u = rng.random(n_items)
    cov = (u < positive_rate).astype(np.float64)
    part = rng.random(n_items) < partial
    cov[part] = rng.beta(0.7, 0.7, int(part.sum()))
    return cov


def assign_workers(
    n_items: int, n_workers: int, votes_per_item: int, rng: np.random.Generator
) -> npt.NDArray[np.int64]:
    """``votes_per_item`` distinct random workers per item.

    Shape:
        returns ``(n_items, votes_per_item)``.
    """
    if votes_per_item > n_workers:
        raise ValueError("votes_per_item cannot exceed n_workers")
    step = max(n_workers // votes_per_item, 1)
    gaps = rng.integers(1, step + 1, size=(n_items, votes_per_item))
    gaps[:, 0] = 0
    offsets = np.cumsum(gaps, axis=1)  # strictly increasing, max < n_workers: distinct
    start = rng.integers(0, n_workers, size=(n_items, 1))
    return np.asarray((start + offsets) % n_workers)


def simulate_crowd(
    coverage: npt.ArrayLike,
    *,
    n_workers: int,
    votes_per_item: int,
    rng: np.random.Generator,
    mix: Mapping[str, float] | None = None,
    truth_threshold: float = 0.0,
) -> SimulatedCrowd:
    """Votes of a crowd mixed from volunteer kinds.

    Args:
        coverage: true coverage of each item (tile).
        n_workers: crowd size; kinds are assigned in proportion to ``mix``.
        votes_per_item: distinct workers per item.
        rng: the random source.
        mix: kind name -> share (normalised); default 50% diligent, 20% sloppy,
            20% random clickers, 10% adversaries.
        truth_threshold: an item is positive when ``coverage > truth_threshold``.
    """
    cov = np.asarray(coverage, dtype=np.float64)
    shares = dict(mix or DEFAULT_MIX)
    kinds = tuple(shares)
    profiles = [get_profile(k) for k in kinds]
    p = np.asarray([shares[k] for k in kinds], dtype=np.float64)
    counts = np.floor(p / p.sum() * n_workers).astype(np.int64)
    counts[0] += n_workers - counts.sum()
    kind = rng.permutation(np.repeat(np.arange(len(kinds)), counts))
    who = assign_workers(cov.shape[0], n_workers, votes_per_item, rng).reshape(-1)
    item = np.repeat(np.arange(cov.shape[0]), votes_per_item)
    labels, seconds = _answer_by_kind(profiles, kind[who], cov[item], rng)
    votes = make_votes(who, item, labels, n_workers=n_workers, n_items=cov.shape[0])
    truth = (cov > truth_threshold).astype(np.int8)
    return SimulatedCrowd(votes, seconds, truth, cov, kind, kinds)


def _answer_by_kind(
    profiles: list[VolunteerProfile],
    vote_kind: npt.NDArray[np.int64],
    cov: FloatArray,
    rng: np.random.Generator,
) -> tuple[Int8Array, FloatArray]:
    sens = np.asarray([pr.sensitivity for pr in profiles])[vote_kind]
    spec = np.asarray([pr.specificity for pr in profiles])[vote_kind]
    thr = np.maximum(np.asarray([pr.coverage_threshold for pr in profiles]), 1e-12)[vote_kind]
    med = np.log(np.asarray([pr.time_median_s for pr in profiles]))[vote_kind]
    sig = np.asarray([pr.time_sigma for pr in profiles])[vote_kind]
    p_yes = np.where(cov >= thr, sens, 1.0 - spec)
    labels = (rng.random(cov.shape) < p_yes).astype(np.int8)
    seconds = np.exp(med + sig * rng.standard_normal(cov.shape))
    return labels, seconds


def sample_gold(truth: Int8Array, fraction: float, rng: np.random.Generator) -> Int8Array:
    """Reveal the truth of a random ``fraction`` of items as gold (-1 elsewhere)."""
    gold = np.full(truth.shape, -1, dtype=np.int8)
    known = rng.random(truth.shape) < fraction
    gold[known] = truth[known]
    return gold
