"""Two-coin Dawid-Skene: binary labels, per-worker sensitivity and specificity, batch EM.

References:
    Dawid & Skene (1979), "Maximum likelihood estimation of observer error-rates using the EM
    algorithm"; Raykar et al. (2010), "Learning from crowds" (the two-coin binary model with Beta
    priors on sensitivity and specificity).

Model and assumptions:
    * each item has a hidden binary truth with class prior ``pi`` (Beta prior, learned);
    * worker j says yes to a positive item with probability ``sens_j`` and no to a negative item
      with probability ``spec_j`` (Beta priors, default Beta(2, 1): better than random);
    * votes are independent given the truth (this makes posteriors over-confident when workers
      share a bias, e.g. all miss a tile that shows only a sliver of the object);
    * an optional prior log-odds per item (CAM or model output) enters as a pseudo-voter with a
      weight ``a`` learned from gold (a 1-D penalised logistic fit with the votes as offset);
    * gold items are clamped to their known answer in every E-step, so they teach credibility
      exactly and are always reproduced.

Log-odds of item i:  ``logit(pi) + a * prior_i + sum_votes (y ? log(s/(1-c)) : log((1-s)/c))``.

Adversaries (sens + spec < 1) would, in plain DS, be inverted: their yes counts as a no. Without
gold that is a gamble (a large colluding block can flip the consensus), so a worker's votes are
used inverted only when their gold answers alone show anti-correlation significantly
(``min_gold_to_invert`` gold votes and a z-score beyond ``adversary_z``); otherwise their weight
is zero. Either way an adversary never pulls posteriors towards their answers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ml.aggregation.votes import (
    AggregationResult,
    BoolArray,
    FloatArray,
    Int8Array,
    Votes,
    check_gold,
    check_prior,
    logit,
    sigmoid,
)


@dataclass(frozen=True)
class DawidSkeneConfig:
    """Priors and stopping rule of the two-coin EM.

    ``sens_prior``/``spec_prior``/``class_prior`` are Beta(alpha, beta) pseudo-counts.
    ``tol`` is the largest change of any posterior between two iterations at convergence.
    """

    sens_prior: tuple[float, float] = (2.0, 1.0)
    spec_prior: tuple[float, float] = (2.0, 1.0)
    class_prior: tuple[float, float] = (1.0, 1.0)
    max_iter: int = 100
    tol: float = 1e-3
    min_gold_to_invert: int = 3
    adversary_z: float = 0.0
    prior_weight: float = 1.0
    learn_prior_weight: bool = True
    prior_weight_penalty: float = 1.0
    max_prior_weight: float = 5.0
    eps: float = 1e-4


DEFAULT_CONFIG = DawidSkeneConfig()


@dataclass(frozen=True)
class _Split:
    """Votes laid out once for fast EM steps.

    Votes are sorted by item, so the E-step sums contiguous runs (``np.add.reduceat``) and the
    M-step spreads item posteriors with ``np.repeat``; ``key = worker + n_workers * (label == 0)``
    lets one ``np.bincount`` give a worker's yes and no sums together. Indices are ``intp`` since
    ``np.bincount`` would otherwise copy int32 input on every call.
    """

    key: npt.NDArray[np.intp]  # (n_votes,) sorted by item
    counts: npt.NDArray[np.intp]  # (n_items,) votes per item
    starts: npt.NDArray[np.intp]  # (n_items_with_votes,) first vote of each such item
    has_votes: BoolArray  # (n_items,)
    n_yes: FloatArray  # (n_workers,)
    n_no: FloatArray  # (n_workers,)


def _split(votes: Votes) -> _Split:
    item = votes.item
    order = None if np.all(item[1:] >= item[:-1]) else np.argsort(item, kind="stable")
    key = votes.worker.astype(np.intp) + votes.n_workers * (votes.label == 0)
    if order is not None:
        key = key[order]
    counts = np.bincount(item, minlength=votes.n_items).astype(np.intp)
    has = counts > 0
    starts = (np.cumsum(counts) - counts)[has]
    per_key = np.bincount(key, minlength=2 * votes.n_workers).astype(np.float64)
    nw = votes.n_workers
    return _Split(key, counts, starts, has, per_key[:nw], per_key[nw:])


def gold_counts(
    votes: Votes, gold: Int8Array
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """Per-worker counts on gold items: (true pos, false neg, true neg, false pos).

    Shape:
        gold: ``(n_items,)`` with -1 unknown; each output ``(n_workers,)``.
    """
    g = gold[votes.item]
    y = votes.label
    nw = votes.n_workers

    def count(mask: BoolArray) -> FloatArray:
        return np.bincount(votes.worker[mask], minlength=nw).astype(np.float64)

    return (
        count((g == 1) & (y == 1)),
        count((g == 1) & (y == 0)),
        count((g == 0) & (y == 0)),
        count((g == 0) & (y == 1)),
    )


def confirmed_adversary(
    tp: FloatArray, fn: FloatArray, tn: FloatArray, fp: FloatArray, config: DawidSkeneConfig
) -> BoolArray:
    """Workers whose gold answers alone anti-correlate with the truth significantly.

    Uses Youden's J = sens + spec - 1 from gold with Laplace smoothing and its standard error.

    Shape:
        each input ``(n_workers,)``; returns ``(n_workers,)`` bool.
    """
    s = (tp + 1.0) / (tp + fn + 2.0)
    c = (tn + 1.0) / (tn + fp + 2.0)
    se = np.sqrt(s * (1 - s) / (tp + fn + 2.0) + c * (1 - c) / (tn + fp + 2.0))
    enough = (tp + fn + tn + fp) >= config.min_gold_to_invert
    return np.asarray(enough & (s + c - 1.0 + config.adversary_z * se < 0.0))


def vote_weights(
    sens: FloatArray, spec: FloatArray, invert_ok: BoolArray, eps: float = 1e-4
) -> tuple[FloatArray, FloatArray]:
    """Log-likelihood ratios of a yes and of a no vote per worker.

    Workers with ``sens + spec < 1`` get zero weight unless ``invert_ok``.

    Shape:
        all inputs and outputs ``(n_workers,)``.

    Returns:
        ``(llr_yes, llr_no)``: ``log(s / (1 - c))`` and ``log((1 - s) / c)``.
    """
    s = np.clip(sens, eps, 1 - eps)
    c = np.clip(spec, eps, 1 - eps)
    keep = (s + c >= 1.0) | invert_ok
    llr_yes = np.where(keep, np.log(s) - np.log1p(-c), 0.0)
    llr_no = np.where(keep, np.log1p(-s) - np.log(c), 0.0)
    return llr_yes, llr_no


def _evidence(sp: _Split, llr_yes: FloatArray, llr_no: FloatArray, n_items: int) -> FloatArray:
    per_vote = np.concatenate([llr_yes, llr_no])[sp.key]  # (n_votes,)
    ev = np.zeros(n_items, dtype=np.float64)
    if per_vote.size:
        ev[sp.has_votes] = np.add.reduceat(per_vote, sp.starts)
    return ev  # (n_items,)


def _m_step(sp: _Split, q: FloatArray, config: DawidSkeneConfig) -> tuple[FloatArray, FloatArray]:
    nw = sp.n_yes.shape[0]
    sums = np.bincount(sp.key, weights=np.repeat(q, sp.counts), minlength=2 * nw)
    q_yes, q_no = sums[:nw], sums[nw:]  # sum of q over j's yes votes, over j's no votes
    a_s, b_s = config.sens_prior
    a_c, b_c = config.spec_prior
    sens = (a_s + q_yes) / (a_s + b_s + q_yes + q_no)
    neg_no, neg_yes = sp.n_no - q_no, sp.n_yes - q_yes
    spec = (a_c + neg_no) / (a_c + b_c + neg_no + neg_yes)
    return sens, spec


def fit_prior_weight(
    evidence: FloatArray, prior: FloatArray, target: FloatArray, config: DawidSkeneConfig
) -> float:
    """Weight of the prior pseudo-voter by penalised logistic regression on gold items.

    Maximises ``sum target*log(sig(z)) + (1-target)*log(1-sig(z))`` with
    ``z = evidence + a * prior`` minus ``penalty/2 * (a - prior_weight)**2``; five Newton steps.

    Shape:
        evidence, prior, target: ``(n_gold,)``.
    """
    a = config.prior_weight
    lam = config.prior_weight_penalty
    for _ in range(5):
        p = sigmoid(evidence + a * prior)
        grad = float(np.dot(p - target, prior)) + lam * (a - config.prior_weight)
        hess = float(np.dot(p * (1 - p), prior * prior)) + lam
        a = float(np.clip(a - grad / hess, 0.0, config.max_prior_weight))
    return a


def _init_posterior(votes: Votes, sp: _Split, prior: FloatArray) -> FloatArray:
    yes = np.bincount(votes.item, weights=votes.label, minlength=votes.n_items)
    total = sp.counts.astype(np.float64)
    # Smoothed majority vote, shifted by the prior: a starting point, not an estimate.
    return sigmoid(logit((yes + 0.5) / (total + 1.0)) + prior)


@dataclass
class _State:
    q: FloatArray
    sens: FloatArray
    spec: FloatArray
    pi: float
    a: float
    logodds: FloatArray


def _iterate(
    votes: Votes,
    sp: _Split,
    gold: Int8Array,
    prior: FloatArray,
    invert_ok: BoolArray,
    st: _State,
    config: DawidSkeneConfig,
) -> _State:
    known = gold >= 0
    sens, spec = _m_step(sp, st.q, config)
    llr_yes, llr_no = vote_weights(sens, spec, invert_ok, config.eps)
    ev = _evidence(sp, llr_yes, llr_no, votes.n_items)
    a = st.a
    if config.learn_prior_weight and known.any() and np.any(prior[known] != 0):
        base = ev[known] + float(logit(st.pi))
        a = fit_prior_weight(base, prior[known], gold[known].astype(np.float64), config)
    logodds = ev + float(logit(st.pi)) + a * prior
    q = sigmoid(logodds)
    q[known] = gold[known]
    a_pi, b_pi = config.class_prior
    pi = float((a_pi + q.sum()) / (a_pi + b_pi + votes.n_items))
    return _State(q, sens, spec, pi, a, logodds)


def dawid_skene(
    votes: Votes,
    *,
    gold: npt.ArrayLike | None = None,
    prior_logodds: npt.ArrayLike | None = None,
    config: DawidSkeneConfig = DEFAULT_CONFIG,
) -> AggregationResult:
    """Batch EM for the two-coin model.

    Args:
        votes: COO votes.
        gold: known answers, -1 unknown.
        prior_logodds: per-item prior (CAM or model), a pseudo-voter with weight learned from gold.
        config: priors and stopping rule.

    Shape:
        gold, prior_logodds: ``(n_items,)``.

    Returns:
        :class:`AggregationResult`; ``iterations`` counts EM rounds.
    """
    g = check_gold(gold, votes.n_items)
    prior = check_prior(prior_logodds, votes.n_items)
    sp = _split(votes)
    invert_ok = confirmed_adversary(*gold_counts(votes, g), config)
    q0 = _init_posterior(votes, sp, prior)
    q0[g >= 0] = g[g >= 0]
    ones = np.ones(votes.n_workers, dtype=np.float64)
    pi = float(np.clip(q0.mean(), 0.01, 0.99)) if votes.n_items else 0.5
    st = _State(q0, ones * 0.5, ones * 0.5, pi, config.prior_weight, logit(q0))
    converged = False
    it = 0
    for it in range(1, config.max_iter + 1):  # noqa: B007 - reported as iterations
        new = _iterate(votes, sp, g, prior, invert_ok, st, config)
        delta = float(np.max(np.abs(new.q - st.q))) if votes.n_items else 0.0
        st = new
        if delta < config.tol:
            converged = True
            break
    return _result("dawid_skene", st, invert_ok, it, converged)


def _result(
    method: str, st: _State, invert_ok: BoolArray, iterations: int, converged: bool
) -> AggregationResult:
    return AggregationResult(
        method=method,
        posterior=st.q,
        logodds=st.logodds,
        sensitivity=st.sens,
        specificity=st.spec,
        adversary=np.asarray(st.sens + st.spec < 1.0),
        inverted=np.asarray((st.sens + st.spec < 1.0) & invert_ok),
        class_prior=st.pi,
        prior_weight=st.a,
        iterations=iterations,
        converged=converged,
    )
