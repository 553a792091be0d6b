"""Online two-coin Dawid-Skene: update posteriors and credibility per submission.

Algorithm: incremental EM (Neal & Hinton 1998, "A view of the EM algorithm that justifies
incremental, sparse, and other variants") on the model of :mod:`ml.aggregation.dawid_skene`.
Each item contributes its current posterior ``q_i`` to the soft counts of every worker who voted
on it. A submission (worker, item, label) re-computes that item's posterior from all its votes
with the workers' *current* credibility, then replaces the item's old contribution to those
workers' counts by the new one. Gold items contribute their known answer, so credibility is
learned from gold exactly and at once. The class prior follows the running mean posterior; the
prior pseudo-voter keeps the weight it was given (learn it in the periodic batch pass).

Tolerance (tested in ``tests/aggregation/test_online.py``): on simulated crowds with at least
5 votes per item and some gold, streaming every vote in any order from a cold start ends with
posteriors whose mean absolute difference from batch EM on the same votes is at most 0.03, with
at most 3% of hard labels (and never more than 2 items below 67 items) different; after
one :meth:`OnlineDawidSkene.sweep` (a vectorised EM step, what a periodic job can run) the mean
difference is at most 0.015 (0.0006 on average over 300 random crowds, at most 0.0096 there; a
property-test run found one at 0.0101), and after two sweeps at most 0.01.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ml.aggregation.credibility import COUNT_FIELDS
from ml.aggregation.dawid_skene import (
    DEFAULT_CONFIG,
    DawidSkeneConfig,
    confirmed_adversary,
    dawid_skene,
    vote_weights,
)
from ml.aggregation.votes import (
    AggregationResult,
    FloatArray,
    Votes,
    check_gold,
    check_prior,
    logit,
    make_votes,
    sigmoid,
)


class OnlineDawidSkene:
    """Per-submission consensus and credibility.

    Public arrays (grow as new worker or item indices arrive):
        posterior, logodds: ``(n_items,)``;
        pos_yes, pos_no, neg_no, neg_yes: ``(n_workers,)`` soft counts of the worker's answers
        on positive and negative items (Beta posterior = prior + counts);
        gold_tp, gold_fn, gold_tn, gold_fp: ``(n_workers,)`` exact counts on gold items.
    """

    def __init__(
        self,
        n_workers: int,
        n_items: int,
        *,
        gold: npt.ArrayLike | None = None,
        prior_logodds: npt.ArrayLike | None = None,
        config: DawidSkeneConfig = DEFAULT_CONFIG,
        prior_weight: float | None = None,
    ) -> None:
        self.config = config
        self.gold = check_gold(gold, n_items)
        self.prior = check_prior(prior_logodds, n_items)
        self.prior_weight = config.prior_weight if prior_weight is None else prior_weight
        z = np.zeros(n_workers, dtype=np.float64)
        self.pos_yes, self.pos_no, self.neg_no, self.neg_yes = z.copy(), z.copy(), z.copy(), z
        self.gold_tp, self.gold_fn = z.copy(), z.copy()
        self.gold_tn, self.gold_fp = z.copy(), z.copy()
        self.class_logodds = 0.0
        self.logodds = self.prior_weight * self.prior
        self.posterior = sigmoid(self.logodds)
        known = self.gold >= 0
        self.posterior[known] = self.gold[known]
        self._credited = np.full(n_items, np.nan)  # q each item last credited to its voters
        self._item_votes: list[list[tuple[int, int]]] = [[] for _ in range(n_items)]

    # -- sizes ---------------------------------------------------------------------------
    @property
    def n_workers(self) -> int:
        return int(self.pos_yes.shape[0])

    @property
    def n_items(self) -> int:
        return int(self.posterior.shape[0])

    def grow(self, n_workers: int, n_items: int) -> None:
        """Make room for worker indices < n_workers and item indices < n_items."""
        if n_workers > self.n_workers:
            extra = n_workers - self.n_workers
            for name in COUNT_FIELDS:
                setattr(self, name, np.concatenate([getattr(self, name), np.zeros(extra)]))
        if n_items > self.n_items:
            extra = n_items - self.n_items
            self.gold = np.concatenate([self.gold, np.full(extra, -1, dtype=np.int8)])
            self.prior = np.concatenate([self.prior, np.zeros(extra)])
            self.logodds = np.concatenate([self.logodds, np.zeros(extra)])
            self.posterior = np.concatenate([self.posterior, np.full(extra, 0.5)])
            self._credited = np.concatenate([self._credited, np.full(extra, np.nan)])
            self._item_votes.extend([] for _ in range(extra))

    # -- credibility -----------------------------------------------------------------------
    def sensitivity(self) -> FloatArray:
        """Posterior-mean sensitivity per worker. Shape: ``(n_workers,)``."""
        a, b = self.config.sens_prior
        return (a + self.pos_yes) / (a + b + self.pos_yes + self.pos_no)

    def specificity(self) -> FloatArray:
        """Posterior-mean specificity per worker. Shape: ``(n_workers,)``."""
        a, b = self.config.spec_prior
        return (a + self.neg_no) / (a + b + self.neg_no + self.neg_yes)

    def _weights(self, workers: npt.NDArray[np.int64]) -> tuple[FloatArray, FloatArray]:
        a_s, b_s = self.config.sens_prior
        a_c, b_c = self.config.spec_prior
        py, pn, nn, ny = (
            self.pos_yes[workers],
            self.pos_no[workers],
            self.neg_no[workers],
            self.neg_yes[workers],
        )
        sens = (a_s + py) / (a_s + b_s + py + pn)
        spec = (a_c + nn) / (a_c + b_c + nn + ny)
        ok = confirmed_adversary(
            self.gold_tp[workers],
            self.gold_fn[workers],
            self.gold_tn[workers],
            self.gold_fp[workers],
            self.config,
        )
        return vote_weights(sens, spec, ok, self.config.eps)

    def _credit(
        self, workers: npt.NDArray[np.int64], labels: FloatArray, q: float, sign: float = 1.0
    ) -> None:
        # np.add.at: a worker may appear once per item, but keep it correct for duplicates.
        np.add.at(self.pos_yes, workers, sign * q * labels)
        np.add.at(self.pos_no, workers, sign * q * (1 - labels))
        np.add.at(self.neg_no, workers, sign * (1 - q) * (1 - labels))
        np.add.at(self.neg_yes, workers, sign * (1 - q) * labels)

    def _count_gold(self, worker: int, label: int, truth: int) -> None:
        if truth == 1:
            self.gold_tp[worker] += label
            self.gold_fn[worker] += 1 - label
        else:
            self.gold_tn[worker] += 1 - label
            self.gold_fp[worker] += label

    # -- the update ----------------------------------------------------------------------
    def submit(self, worker: int, item: int, label: int) -> float:
        """Take one vote; return the item's new posterior.

        Args:
            worker, item: indices (arrays grow as needed).
            label: 1 = yes (the tile shows the tag), 0 = no.
        """
        if label not in (0, 1):
            raise ValueError(f"label must be 0 or 1, got {label!r}")
        self.grow(worker + 1, item + 1)
        truth = int(self.gold[item])
        if truth >= 0:
            self._count_gold(worker, label, truth)
        self._item_votes[item].append((worker, label))
        return self._refresh(item)

    def _refresh(self, item: int) -> float:
        pairs = np.asarray(self._item_votes[item], dtype=np.int64).reshape(-1, 2)
        workers, labels = pairs[:, 0], pairs[:, 1].astype(np.float64)
        llr_yes, llr_no = self._weights(workers)
        evidence = float(np.sum(np.where(labels == 1, llr_yes, llr_no)))
        z = self.class_logodds + self.prior_weight * self.prior[item] + evidence
        truth = int(self.gold[item])
        q = float(truth) if truth >= 0 else float(sigmoid(z))
        old = self._credited[item]
        if not np.isnan(old):  # replace the item's old contribution, all but the new vote
            self._credit(workers[:-1], labels[:-1], float(old), sign=-1.0)
            self._credit(workers[:-1], labels[:-1], q)
            self._credit(workers[-1:], labels[-1:], q)
        else:
            self._credit(workers, labels, q)
        self._credited[item] = q
        self.logodds[item], self.posterior[item] = z, q
        self._update_class_prior()
        return q

    def _update_class_prior(self) -> None:
        a, b = self.config.class_prior
        seen = ~np.isnan(self._credited)
        pi = (a + float(self.posterior[seen].sum())) / (a + b + float(seen.sum()))
        self.class_logodds = float(logit(pi))

    # -- batch helpers -------------------------------------------------------------------
    def votes(self) -> Votes:
        """All votes taken so far, in COO layout."""
        w = [v[0] for lst in self._item_votes for v in lst]
        y = [v[1] for lst in self._item_votes for v in lst]
        i = [k for k, lst in enumerate(self._item_votes) for _ in lst]
        return make_votes(w, i, y, n_workers=self.n_workers, n_items=self.n_items)

    def sweep(self) -> None:
        """One vectorised E-step over every item with votes, then recount credibility."""
        v = self.votes()
        llr_yes, llr_no = self._weights(np.arange(self.n_workers))
        per_vote = np.where(v.label == 1, llr_yes[v.worker], llr_no[v.worker])
        ev = np.bincount(v.item, weights=per_vote, minlength=self.n_items)
        seen = np.bincount(v.item, minlength=self.n_items) > 0
        z = self.class_logodds + self.prior_weight * self.prior + ev
        q = sigmoid(z)
        known = self.gold >= 0
        q[known] = self.gold[known]
        self.logodds = np.where(seen, z, self.logodds)
        self.posterior = np.where(seen, q, self.posterior)
        self._recount(v)

    def _recount(self, v: Votes) -> None:
        seen = np.bincount(v.item, minlength=self.n_items) > 0
        self._credited = np.where(seen, self.posterior, np.nan)
        q = self.posterior[v.item]
        y = v.label.astype(np.float64)
        nw = self.n_workers

        def per_worker(weights: FloatArray) -> FloatArray:
            return np.bincount(v.worker, weights=weights, minlength=nw).astype(np.float64)

        self.pos_yes, self.pos_no = per_worker(q * y), per_worker(q * (1 - y))
        self.neg_no, self.neg_yes = per_worker((1 - q) * (1 - y)), per_worker((1 - q) * y)
        self._update_class_prior()

    def refit(self) -> AggregationResult:
        """Batch EM on all votes so far (the periodic pass); adopts its posteriors and weight."""
        result = dawid_skene(
            self.votes(), gold=self.gold, prior_logodds=self.prior, config=self.config
        )
        self.prior_weight = result.prior_weight
        self.posterior = result.posterior.copy()
        self.logodds = result.logodds.copy()
        self._recount(self.votes())
        return result
