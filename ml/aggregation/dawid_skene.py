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


IntpArray = npt.NDArray[np.intp]

# Rank blocks shorter than this, or beyond this many, go to the bincount tail (see _Layout).
_MIN_BLOCK = 256
_MAX_BLOCKS = 64


@dataclass(frozen=True)
class _Layout:
    """Votes laid out once for fast EM steps (jagged diagonal storage, as for sparse mat-vecs).

    Items are renumbered by descending vote count (``order[k]`` is the original index of item
    ``k``). The r-th vote of every item with more than r votes forms the contiguous block r, which
    covers a *prefix* of the renumbered items, so the E-step sums each item's votes with one
    vectorised add per block (``ev[:m_r] += per_vote[block r]``, no scatter) and the M-step lays
    posteriors out per vote by concatenating prefixes of ``q`` (no gather). Ranks that few items
    reach (a long tail of heavily voted items) use ``np.bincount`` instead, which keeps the Python
    loop short. ``key = worker + n_workers * (label == 0)`` lets one ``np.bincount`` give a
    worker's yes and no sums together.
    """

    key: IntpArray  # (n_votes,) block 0, block 1, ..., then the tail
    blocks: tuple[int, ...]  # m_r: items in block r
    tail_item: IntpArray  # (n_tail,) renumbered item of each tail vote
    order: IntpArray | None  # (n_items,) original index of each renumbered item; None: identity
    n_yes: FloatArray  # (n_workers,)
    n_no: FloatArray  # (n_workers,)


def _item_order(item: npt.NDArray[np.int32], n_items: int) -> IntpArray | None:
    """A stable sort of the votes by item; None when they already are."""
    if np.all(item[1:] >= item[:-1]):
        return None
    shift = max(item.size - 1, 1).bit_length()
    if shift + max(n_items - 1, 1).bit_length() > 62:
        return np.argsort(item, kind="stable")
    # Sorting packed (item, position) keys is several times faster than an argsort and, the
    # keys being distinct, gives the stable order.
    packed = item.astype(np.int64) << shift
    packed |= np.arange(item.size, dtype=np.int64)
    packed.sort()
    return np.asarray(packed & ((1 << shift) - 1), dtype=np.intp)


def _blocks(counts: IntpArray) -> tuple[IntpArray | None, IntpArray]:
    """Renumbering of items by descending vote count, and the size of each rank block.

    Shape:
        counts: ``(n_items,)`` votes per item; returns ``order`` ``(n_items,)`` (None for the
        identity) and ``blocks`` ``(n_blocks,)``.
    """
    order = None if np.all(counts[1:] <= counts[:-1]) else np.argsort(-counts, kind="stable")
    reached = counts.shape[0] - np.cumsum(np.bincount(counts))[:-1]  # (max count,) > r votes
    if not reached.size:
        return order, reached
    dense = reached >= min(_MIN_BLOCK, int(reached[0]))  # block 0 always
    return order, reached[: min(int(dense.sum()), _MAX_BLOCKS)]


def _layout(votes: Votes) -> _Layout:
    nw, ni, n = votes.n_workers, votes.n_items, votes.n_votes
    key = (votes.worker + nw * (votes.label == 0)).astype(np.intp)  # (n,)
    per_key = np.bincount(key, minlength=2 * nw).astype(np.float64, copy=False)
    item = votes.item
    by_item = _item_order(item, ni)
    if by_item is not None:
        key, item = key[by_item], item[by_item]
    counts = np.bincount(item, minlength=ni)  # (ni,)
    order, blocks = _blocks(counts)
    offsets = np.concatenate([[0], np.cumsum(blocks)])  # (n_blocks + 1,)
    rank = np.arange(n, dtype=np.intp) - np.repeat(np.cumsum(counts) - counts, counts)  # (n,)
    pos = item.astype(np.intp)  # (n,) renumbered item of each vote
    if order is not None:
        renumber = np.empty(ni, dtype=np.intp)
        renumber[order] = np.arange(ni, dtype=np.intp)
        pos = renumber[item]
    laid = np.empty(n, dtype=np.intp)
    in_block = rank < blocks.shape[0]
    if in_block.all():  # the usual case: no tail
        laid[offsets[rank] + pos] = key
        tail_item = pos[:0]
    else:
        laid[offsets[rank[in_block]] + pos[in_block]] = key[in_block]
        laid[offsets[-1] :] = key[~in_block]
        tail_item = pos[~in_block]
    blocks_ = tuple(int(m) for m in blocks)
    return _Layout(laid, blocks_, tail_item, order, per_key[:nw], per_key[nw:])


def gold_counts(
    votes: Votes, gold: Int8Array
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """Per-worker counts on gold items: (true pos, false neg, true neg, false pos).

    Shape:
        gold: ``(n_items,)`` with -1 unknown; each output ``(n_workers,)``.
    """
    g = gold[votes.item]  # (n_votes,)
    on_gold = g >= 0
    g, y = g[on_gold], votes.label[on_gold]
    nw = votes.n_workers
    # 0 true pos, 1 false neg, 2 true neg, 3 false pos: one bincount for all four
    outcome = 2 * (1 - g.astype(np.intp)) + (g != y)
    counts = np.bincount(outcome * nw + votes.worker[on_gold], minlength=4 * nw)
    tp, fn, tn, fp = counts.reshape(4, nw).astype(np.float64)
    return tp, fn, tn, fp


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


def _evidence(lay: _Layout, llr_yes: FloatArray, llr_no: FloatArray, n_items: int) -> FloatArray:
    per_vote = np.concatenate([llr_yes, llr_no]).take(lay.key)  # (n_votes,)
    ev = np.zeros(n_items, dtype=np.float64)
    lo = 0
    for m in lay.blocks:
        ev[:m] += per_vote[lo : lo + m]
        lo += m
    if lay.tail_item.size:
        m = lay.blocks[-1]  # tail items have more votes than there are blocks: a prefix
        ev[:m] += np.bincount(lay.tail_item, weights=per_vote[lo:], minlength=m)
    return ev  # (n_items,) renumbered


def _m_step(lay: _Layout, q: FloatArray, config: DawidSkeneConfig) -> tuple[FloatArray, FloatArray]:
    nw = lay.n_yes.shape[0]
    parts = [q[:m] for m in lay.blocks]
    if lay.tail_item.size:
        parts.append(q.take(lay.tail_item))
    q_vote = np.concatenate(parts) if parts else q[:0]  # (n_votes,) laid out like key
    sums = np.bincount(lay.key, weights=q_vote, minlength=2 * nw).astype(np.float64, copy=False)
    q_yes, q_no = sums[:nw], sums[nw:]  # sum of q over j's yes votes, over j's no votes
    return _skills(q_yes, q_no, lay.n_yes - q_yes, lay.n_no - q_no, config)


def _skills(
    pos_yes: FloatArray,
    pos_no: FloatArray,
    neg_yes: FloatArray,
    neg_no: FloatArray,
    config: DawidSkeneConfig,
) -> tuple[FloatArray, FloatArray]:
    """Posterior-mean sensitivity and specificity from (soft) counts. Shape: ``(n_workers,)``."""
    a_s, b_s = config.sens_prior
    a_c, b_c = config.spec_prior
    sens = (a_s + pos_yes) / (a_s + b_s + pos_yes + pos_no)
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


def _sigmoid(z: FloatArray) -> FloatArray:
    """Logistic function with one ``exp`` (faster than ``tanh``); clipped so it cannot overflow."""
    e = np.clip(z, -500.0, 500.0)
    np.negative(e, out=e)
    np.exp(e, out=e)
    e += 1.0
    return np.reciprocal(e, out=e)


@dataclass(frozen=True)
class _Problem:
    """What EM keeps fixed, items in the layout's order."""

    lay: _Layout
    n_items: int
    prior: FloatArray | None  # (n_items,); None when all zero
    learn_prior: bool  # fit the prior's weight on gold in each E-step
    known: IntpArray  # (n_gold,) gold items
    truth: FloatArray  # (n_gold,) their answers
    invert_ok: BoolArray  # (n_workers,)
    config: DawidSkeneConfig


def _problem(
    lay: _Layout, gold: Int8Array, prior: FloatArray, invert_ok: BoolArray, config: DawidSkeneConfig
) -> _Problem:
    if lay.order is not None:
        gold, prior = gold[lay.order], prior[lay.order]
    known = np.flatnonzero(gold >= 0)
    has_prior = bool(np.any(prior != 0))
    learn = config.learn_prior_weight and has_prior and bool(np.any(prior[known] != 0))
    truth = gold[known].astype(np.float64)
    p = prior if has_prior else None
    return _Problem(lay, gold.shape[0], p, learn, known, truth, invert_ok, config)


@dataclass
class _State:
    q: FloatArray
    sens: FloatArray
    spec: FloatArray
    pi: float
    a: float
    logodds: FloatArray


def _e_step(pb: _Problem, sens: FloatArray, spec: FloatArray, pi: float, a: float) -> _State:
    cfg = pb.config
    llr_yes, llr_no = vote_weights(sens, spec, pb.invert_ok, cfg.eps)
    logodds = _evidence(pb.lay, llr_yes, llr_no, pb.n_items)  # (n_items,)
    base = float(logit(pi))
    if pb.prior is not None:
        if pb.learn_prior:
            ev = logodds[pb.known] + base
            a = fit_prior_weight(ev, pb.prior[pb.known], pb.truth, cfg)
        logodds += a * pb.prior
    logodds += base
    q = _sigmoid(logodds)
    q[pb.known] = pb.truth
    a_pi, b_pi = cfg.class_prior
    pi = float((a_pi + q.sum()) / (a_pi + b_pi + q.shape[0]))
    return _State(q, sens, spec, pi, a, logodds)


def _restore(st: _State, order: IntpArray | None) -> _State:
    """Items back in their original order."""
    if order is None:
        return st
    q, logodds = np.empty_like(st.q), np.empty_like(st.logodds)
    q[order], logodds[order] = st.q, st.logodds
    return _State(q, st.sens, st.spec, st.pi, st.a, logodds)


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
    lay = _layout(votes)
    tp, fn, tn, fp = gold_counts(votes, g)
    invert_ok = confirmed_adversary(tp, fn, tn, fp, config)
    pb = _problem(lay, g, prior, invert_ok, config)
    # Start from what gold alone says of each worker (the Beta prior where it says nothing): a
    # gold-aware weighted majority that already ignores random clickers and gold-caught
    # adversaries, so EM needs fewer rounds than from a plain majority vote.
    a_pi, b_pi = config.class_prior
    pi = (a_pi + float(pb.truth.sum())) / (a_pi + b_pi + pb.truth.shape[0])
    st = _e_step(pb, *_skills(tp, fn, fp, tn, config), pi, config.prior_weight)
    converged = False
    it = 0
    for it in range(1, config.max_iter + 1):  # noqa: B007 - reported as iterations
        new = _e_step(pb, *_m_step(lay, st.q, config), st.pi, st.a)
        delta = float(np.max(np.abs(new.q - st.q))) if votes.n_items else 0.0
        st = new
        if delta < config.tol:
            converged = True
            break
    return _result("dawid_skene", _restore(st, lay.order), invert_ok, it, converged)


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
