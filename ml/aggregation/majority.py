"""Majority vote and weighted majority vote.

Majority vote: the posterior is the share of yes votes (0.5 on ties, the prior where an item
has no vote); every worker counts the same. Assumes workers are better than random.

Weighted majority (one-coin, after Littlestone & Warmuth 1994 / Karger, Oh & Shah 2011 in
spirit): each worker has one accuracy ``acc_j``, estimated against gold where known and the
current consensus elsewhere (Beta(2, 1) smoothing), and votes with weight
``log(acc / (1 - acc))`` clipped to ``[0, max_weight]``. Workers at or below chance (random
clickers, adversaries, lazy) thus get weight zero: weighted majority never inverts anyone.
Posterior ``= sigmoid(prior + sum_j w_j * (2 y - 1))``.

Both clamp gold items to their known answer and report per-worker sensitivity and specificity
measured against the final hard consensus (gold where known), as crowd-kit's ``skills_`` do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ml.aggregation.votes import (
    AggregationResult,
    FloatArray,
    Int8Array,
    Votes,
    check_gold,
    check_prior,
    logit,
    sigmoid,
)


def _counts(votes: Votes) -> tuple[FloatArray, FloatArray]:
    yes = np.bincount(votes.item, weights=votes.label, minlength=votes.n_items).astype(np.float64)
    total = np.bincount(votes.item, minlength=votes.n_items).astype(np.float64)
    return yes, total


def empirical_skills(
    votes: Votes, posterior: FloatArray, prior: tuple[float, float] = (1.0, 1.0)
) -> tuple[FloatArray, FloatArray]:
    """Sensitivity and specificity of each worker against soft labels ``posterior``.

    Shape:
        posterior: ``(n_items,)``; returns two ``(n_workers,)`` arrays.
    """
    q = posterior[votes.item]
    y = votes.label.astype(np.float64)
    nw = votes.n_workers
    pos = np.bincount(votes.worker, weights=q, minlength=nw)
    tp = np.bincount(votes.worker, weights=q * y, minlength=nw)
    neg = np.bincount(votes.worker, weights=1 - q, minlength=nw)
    tn = np.bincount(votes.worker, weights=(1 - q) * (1 - y), minlength=nw)
    a, b = prior
    return (a + tp) / (a + b + pos), (a + tn) / (a + b + neg)


def _finish(
    method: str, votes: Votes, q: FloatArray, z: FloatArray, gold: Int8Array, iterations: int
) -> AggregationResult:
    known = gold >= 0
    q = q.copy()
    q[known] = gold[known]
    hard = (q >= 0.5).astype(np.float64)
    sens, spec = empirical_skills(votes, hard)
    none = np.zeros(votes.n_workers, dtype=bool)
    return AggregationResult(
        method=method,
        posterior=q,
        logodds=z,
        sensitivity=sens,
        specificity=spec,
        adversary=np.asarray(sens + spec < 1.0),
        inverted=none,
        class_prior=float(q.mean()) if q.size else 0.5,
        prior_weight=1.0,
        iterations=iterations,
        converged=True,
    )


def majority_vote(
    votes: Votes,
    *,
    gold: npt.ArrayLike | None = None,
    prior_logodds: npt.ArrayLike | None = None,
) -> AggregationResult:
    """Share of yes votes per item; the prior only for items without votes.

    Shape:
        gold, prior_logodds: ``(n_items,)``.
    """
    g = check_gold(gold, votes.n_items)
    prior = check_prior(prior_logodds, votes.n_items)
    yes, total = _counts(votes)
    q = np.where(total > 0, yes / np.maximum(total, 1), sigmoid(prior))
    return _finish("majority_vote", votes, q, logit(q), g, 1)


@dataclass(frozen=True)
class WeightedMajorityConfig:
    """Smoothing of accuracies, weight cap and number of re-weighting rounds."""

    accuracy_prior: tuple[float, float] = (2.0, 1.0)
    max_weight: float = 4.0
    rounds: int = 10


def weighted_majority(
    votes: Votes,
    *,
    gold: npt.ArrayLike | None = None,
    prior_logodds: npt.ArrayLike | None = None,
    config: WeightedMajorityConfig = WeightedMajorityConfig(),
) -> AggregationResult:
    """Iteratively re-weighted majority vote with non-negative log-odds weights.

    Shape:
        gold, prior_logodds: ``(n_items,)``.
    """
    g = check_gold(gold, votes.n_items)
    prior = check_prior(prior_logodds, votes.n_items)
    known = g >= 0
    sign = 2.0 * votes.label.astype(np.float64) - 1.0
    weight = np.ones(votes.n_workers, dtype=np.float64)
    a, b = config.accuracy_prior
    n = np.bincount(votes.worker, minlength=votes.n_workers).astype(np.float64)
    z = prior
    for _ in range(config.rounds):
        z = prior + np.bincount(
            votes.item, weights=weight[votes.worker] * sign, minlength=votes.n_items
        )
        q = sigmoid(z)
        q[known] = g[known]
        agree = np.where(votes.label == 1, q[votes.item], 1.0 - q[votes.item])
        acc = (a + np.bincount(votes.worker, weights=agree, minlength=votes.n_workers)) / (
            a + b + n
        )
        weight = np.clip(logit(acc), 0.0, config.max_weight)
    return _finish("weighted_majority", votes, sigmoid(z), z, g, config.rounds)
