"""Votes as flat COO arrays, and the result every aggregation method returns.

A vote is one (worker, item, label) triple with label 1 (yes, the tile shows the tag) or 0 (no).
Items are cells or tiles; workers are volunteers (or volunteer x tag-category keys, see
:func:`split_by_group`). The COO layout keeps EM over millions of votes vectorised with
``np.bincount``; a dense ``workers x items`` matrix would be mostly empty.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
Int32Array = npt.NDArray[np.int32]
Int8Array = npt.NDArray[np.int8]

UNKNOWN = -1  # gold / dense-matrix marker for "no answer"


@dataclass(frozen=True)
class Votes:
    """Votes in COO layout.

    Shape:
        worker, item, label: ``(n_votes,)``; int32, int32, int8 in {0, 1}.
    """

    worker: Int32Array
    item: Int32Array
    label: Int8Array
    n_workers: int
    n_items: int

    @property
    def n_votes(self) -> int:
        return int(self.label.shape[0])

    def __post_init__(self) -> None:
        n = self.label.shape[0]
        if self.worker.shape != (n,) or self.item.shape != (n,):
            raise ValueError("worker, item and label must be 1-D arrays of the same length")
        if n and (self.worker.min() < 0 or self.worker.max() >= self.n_workers):
            raise ValueError(f"worker indices must lie in [0, {self.n_workers})")
        if n and (self.item.min() < 0 or self.item.max() >= self.n_items):
            raise ValueError(f"item indices must lie in [0, {self.n_items})")
        if n and not _all_within(self.label, 0, 1):
            raise ValueError("labels must be 0 or 1")


def _all_within(a: npt.NDArray[np.generic], low: int, high: int) -> bool:
    """Whether every value is one of the integers ``low..high`` (two reductions for integer
    arrays; ``np.isin`` would cost ten times as much on millions of votes)."""
    if a.dtype.kind in "iub":
        return bool(a.min() >= low) and bool(a.max() <= high)
    return bool(np.isin(a, np.arange(low, high + 1)).all())


def make_votes(
    worker: npt.ArrayLike,
    item: npt.ArrayLike,
    label: npt.ArrayLike,
    *,
    n_workers: int | None = None,
    n_items: int | None = None,
) -> Votes:
    """Build :class:`Votes` from array-likes; sizes default to ``max index + 1``."""
    w = np.ascontiguousarray(worker, dtype=np.int32).reshape(-1)
    i = np.ascontiguousarray(item, dtype=np.int32).reshape(-1)
    y = np.ascontiguousarray(label, dtype=np.int8).reshape(-1)
    nw = int(w.max()) + 1 if n_workers is None and w.size else (n_workers or 0)
    ni = int(i.max()) + 1 if n_items is None and i.size else (n_items or 0)
    return Votes(worker=w, item=i, label=y, n_workers=nw, n_items=ni)


def from_dense(matrix: npt.ArrayLike) -> Votes:
    """Convert a dense vote matrix to COO.

    Args:
        matrix: ``-1`` = no vote, 0 = no, 1 = yes.

    Shape:
        matrix: ``(n_workers, n_items)``.
    """
    m = np.asarray(matrix)
    if m.ndim != 2:
        raise ValueError(f"vote matrix must be 2-D (workers, items), got shape {m.shape}")
    w, i = np.nonzero(m != UNKNOWN)
    return make_votes(w, i, m[w, i], n_workers=m.shape[0], n_items=m.shape[1])


def to_dense(votes: Votes) -> Int8Array:
    """Inverse of :func:`from_dense` (the last vote wins for duplicate pairs)."""
    m = np.full((votes.n_workers, votes.n_items), UNKNOWN, dtype=np.int8)
    m[votes.worker, votes.item] = votes.label
    return m


def split_by_group(votes: Votes, item_group: npt.ArrayLike, n_groups: int) -> Votes:
    """Give each worker a separate credibility per item group (e.g. tag category).

    Worker index becomes ``worker * n_groups + item_group[item]``, so results reshape to
    ``(n_workers, n_groups)``.

    Shape:
        item_group: ``(n_items,)`` ints in ``[0, n_groups)``.
    """
    g = np.asarray(item_group, dtype=np.int64)
    if g.shape != (votes.n_items,) or (g.size and (g.min() < 0 or g.max() >= n_groups)):
        raise ValueError(
            f"item_group must have shape ({votes.n_items},) and values in [0, {n_groups})"
        )
    key = votes.worker.astype(np.int64) * n_groups + g[votes.item]
    return Votes(
        worker=key.astype(np.int32),
        item=votes.item,
        label=votes.label,
        n_workers=votes.n_workers * n_groups,
        n_items=votes.n_items,
    )


def check_gold(gold: npt.ArrayLike | None, n_items: int) -> Int8Array:
    """Normalise gold to int8 ``(n_items,)`` with -1 for unknown."""
    if gold is None:
        return np.full(n_items, UNKNOWN, dtype=np.int8)
    g = np.asarray(gold)
    if g.shape != (n_items,):
        raise ValueError(f"gold must have shape ({n_items},), got {g.shape}")
    if g.size and not _all_within(g, UNKNOWN, 1):
        raise ValueError("gold values must be -1 (unknown), 0 or 1")
    return g.astype(np.int8)


def check_prior(prior_logodds: npt.ArrayLike | None, n_items: int) -> FloatArray:
    """Normalise prior log-odds to float64 ``(n_items,)``, zeros when absent."""
    if prior_logodds is None:
        return np.zeros(n_items, dtype=np.float64)
    p = np.asarray(prior_logodds, dtype=np.float64)
    if p.shape != (n_items,):
        raise ValueError(f"prior log-odds must have shape ({n_items},), got {p.shape}")
    if not np.isfinite(p).all():
        raise ValueError("prior log-odds must be finite (clip probabilities away from 0 and 1)")
    return p


def sigmoid(z: npt.ArrayLike) -> FloatArray:
    """Numerically safe logistic function."""
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64))))


def logit(p: npt.ArrayLike, eps: float = 1e-6) -> FloatArray:
    """Log-odds of probabilities clipped to ``[eps, 1 - eps]``."""
    q = np.clip(np.asarray(p, dtype=np.float64), eps, 1.0 - eps)
    return np.asarray(np.log(q) - np.log1p(-q))


@dataclass(frozen=True)
class AggregationResult:
    """What every method returns.

    Shape:
        posterior, logodds, label: ``(n_items,)``; sensitivity, specificity, adversary,
        inverted: ``(n_workers,)``.

    ``logodds`` is the unclamped evidence (gold items keep their vote evidence there while their
    ``posterior`` is the gold answer). ``adversary`` marks workers whose estimated
    sensitivity + specificity < 1; ``inverted`` those of them whose votes are used inverted
    because gold confirms the anti-correlation (the rest get weight zero).
    """

    method: str
    posterior: FloatArray
    logodds: FloatArray
    sensitivity: FloatArray
    specificity: FloatArray
    adversary: BoolArray
    inverted: BoolArray
    class_prior: float
    prior_weight: float
    iterations: int
    converged: bool

    @property
    def label(self) -> Int8Array:
        return (self.posterior >= 0.5).astype(np.int8)
