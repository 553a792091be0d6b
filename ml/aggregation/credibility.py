"""Stateless two-coin credibility for a vote path whose state lives in a database.

Model: the two-coin Dawid-Skene of :mod:`ml.aggregation.dawid_skene` (Dawid & Skene 1979;
Raykar et al. 2010). A volunteer is described by soft counts of their yes and no answers on
cells believed positive and negative (``pos_yes, pos_no, neg_no, neg_yes``; sensitivity and
specificity are their Beta posteriors under the config's priors) and by exact counts on gold
cells (``gold_tp, gold_fn, gold_tn, gold_fp``), which alone may license using an apparent
adversary's answers inverted; otherwise a volunteer with sensitivity + specificity < 1 weighs 0.

Between batch EM passes (``dawid_skene`` over every vote, run periodically), the web process
updates a volunteer's counts on gold, exactly and at once (:func:`gold_credit`), and from
agreement (:func:`agreement_credit`): once a cell has ``AGREEMENT_VOTES`` votes, each of its
votes is scored once against what the *other* votes say (leave-one-out, on the project's base
rate from control truth, not on the cell's prior), an online step of the batch EM (Neal and
Hinton 1998) that leaves out the vote's own weight, so that a volunteer is not credited for
agreeing with themselves, nor with a prior (CAM, inheritance) that is only a guess. A project
without gold thus learns who answers well from its first answers, instead of waiting for the
next EM pass with every volunteer at the prior (where three agreeing votes reach only 0.89). It
recomputes a cell's log-odds from all its votes with the voters' current credibility
(:func:`cells_logodds`): this is the E-step of the batch model for that cell, so a cell's online
posterior equals the batch posterior whenever the credibility is the batch credibility.

A cell's vote budget and its minimum votes count *credible* votes (:func:`budget_shares`): a vote
counts in full when its volunteer is at least as informative as one the model knows nothing
about yet, and in proportion to their informativeness below that. The budget bounds what a cell
may cost when credible volunteers cannot agree; a random clicker's coin is no disagreement, and
counting it would retire a cell as uncertain before enough people who look have answered.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import numpy.typing as npt

from ml.aggregation.dawid_skene import (
    DEFAULT_CONFIG,
    DawidSkeneConfig,
    confirmed_adversary,
    vote_weights,
)
from ml.aggregation.votes import FloatArray


@dataclass(frozen=True)
class WorkerCounts:
    """Credibility counts of several volunteers. Shape: each ``(n_workers,)``."""

    pos_yes: FloatArray
    pos_no: FloatArray
    neg_no: FloatArray
    neg_yes: FloatArray
    gold_tp: FloatArray
    gold_fn: FloatArray
    gold_tn: FloatArray
    gold_fp: FloatArray

    @classmethod
    def from_rows(cls, rows: npt.ArrayLike) -> WorkerCounts:
        """From an ``(n_workers, 8)`` array in the field order above."""
        table = np.asarray(rows, dtype=np.float64).reshape(-1, len(COUNT_FIELDS))
        return cls(*(table[:, k].copy() for k in range(len(COUNT_FIELDS))))


# The field names in order: the columns of a stored credibility row.
COUNT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(WorkerCounts))


def sensitivity_specificity(
    counts: WorkerCounts, config: DawidSkeneConfig = DEFAULT_CONFIG
) -> tuple[FloatArray, FloatArray]:
    """Posterior-mean sensitivity and specificity. Shape: each ``(n_workers,)``."""
    a_s, b_s = config.sens_prior
    a_c, b_c = config.spec_prior
    sens = (a_s + counts.pos_yes) / (a_s + b_s + counts.pos_yes + counts.pos_no)
    spec = (a_c + counts.neg_no) / (a_c + b_c + counts.neg_no + counts.neg_yes)
    return sens, spec


def worker_llr(
    counts: WorkerCounts, config: DawidSkeneConfig = DEFAULT_CONFIG
) -> tuple[FloatArray, FloatArray]:
    """Log-likelihood ratio of a yes and of a no from each volunteer.

    Returns:
        ``(llr_yes, llr_no)``, each ``(n_workers,)``; zero for volunteers who answer worse than
        chance unless their own gold answers confirm it.
    """
    sens, spec = sensitivity_specificity(counts, config)
    invert_ok = confirmed_adversary(
        counts.gold_tp, counts.gold_fn, counts.gold_tn, counts.gold_fp, config
    )
    return vote_weights(sens, spec, invert_ok, config.eps)


# Below this Youden's J a vote counts towards a cell's budget in proportion (see budget_shares),
# when the priors grant a newcomer less (flat priors: J = 0, a newcomer's votes weigh nothing).
MIN_FULL_VOTE_J = 0.1


def budget_shares(counts: WorkerCounts, config: DawidSkeneConfig = DEFAULT_CONFIG) -> FloatArray:
    """How much one vote of each volunteer counts towards a cell's vote budget, in [0, 1].

    With Youden's J = sensitivity + specificity - 1 of the posterior means, a vote counts
    ``min(1, |J| / J_0)``, where ``J_0`` is the J a volunteer without any answer has under the
    priors (1/3 under Beta(2, 1); at least ``MIN_FULL_VOTE_J``): newcomers and every volunteer at
    least as good count 1, a random clicker (J near 0) almost nothing, a confirmed adversary (whose
    votes are used inverted) by their |J|, and a vote the consensus drops (an apparent adversary
    not confirmed on gold) 0.

    Shape:
        returns ``(n_workers,)``.
    """
    sens, spec = sensitivity_specificity(counts, config)
    j = sens + spec - 1.0
    invert_ok = confirmed_adversary(
        counts.gold_tp, counts.gold_fn, counts.gold_tn, counts.gold_fp, config
    )
    (a_s, b_s), (a_c, b_c) = config.sens_prior, config.spec_prior
    j_0 = max(a_s / (a_s + b_s) + a_c / (a_c + b_c) - 1.0, MIN_FULL_VOTE_J)
    share = np.minimum(np.abs(j) / j_0, 1.0)
    return np.where((j >= 0.0) | invert_ok, share, 0.0)


def cells_logodds(
    base_logodds: npt.ArrayLike,
    vote_cell: npt.ArrayLike,
    vote_worker: npt.ArrayLike,
    vote_label: npt.ArrayLike,
    counts: WorkerCounts,
    config: DawidSkeneConfig = DEFAULT_CONFIG,
) -> FloatArray:
    """Posterior log-odds of several cells from all their votes.

    Args:
        base_logodds: per cell, the class prior plus the weighted prior (CAM or model).
        vote_cell: per vote, the index of its cell in ``base_logodds``.
        vote_worker: per vote, the index of its volunteer in ``counts``.
        vote_label: per vote, 1 = yes, 0 = no.

    Shape:
        base_logodds ``(n_cells,)``; the vote arrays ``(n_votes,)``.

    Returns:
        ``(n_cells,)`` log-odds that each cell contains the tag.
    """
    base = np.asarray(base_logodds, dtype=np.float64)
    cell = np.asarray(vote_cell, dtype=np.intp)
    worker = np.asarray(vote_worker, dtype=np.intp)
    label = np.asarray(vote_label)
    llr_yes, llr_no = worker_llr(counts, config)
    per_vote = np.where(label == 1, llr_yes[worker], llr_no[worker])
    return base + np.bincount(cell, weights=per_vote, minlength=base.shape[0])


# A vote that speaks for the object: one that makes it at least this many times more likely (a
# newcomer's yes makes it 2x; a proven volunteer's 10-20x; a coin's, 1x).
SUPPORT_RATIO = 4.0


def vote_evidence(
    vote_worker: npt.ArrayLike,
    vote_label: npt.ArrayLike,
    counts: WorkerCounts,
    config: DawidSkeneConfig = DEFAULT_CONFIG,
) -> FloatArray:
    """Per vote, its log-likelihood ratio for the object. Shape: ``(n_votes,)``."""
    worker = np.asarray(vote_worker, dtype=np.intp)
    llr_yes, llr_no = worker_llr(counts, config)
    return np.where(np.asarray(vote_label) == 1, llr_yes[worker], llr_no[worker])


def supporting_votes(
    vote_cell: npt.ArrayLike,
    vote_worker: npt.ArrayLike,
    vote_label: npt.ArrayLike,
    counts: WorkerCounts,
    n_cells: int,
    config: DawidSkeneConfig = DEFAULT_CONFIG,
) -> FloatArray:
    """Per cell, its credible votes (each weighed by ``budget_shares``) that speak for the
    object: those that make it at least ``SUPPORT_RATIO`` times more likely (a proven
    volunteer's yes, a confirmed adversary's no).

    Shape:
        the vote arrays ``(n_votes,)``; returns ``(n_cells,)``.
    """
    worker = np.asarray(vote_worker, dtype=np.intp)
    speaks = vote_evidence(worker, vote_label, counts, config) >= np.log(SUPPORT_RATIO)
    shares = budget_shares(counts, config)[worker]
    return np.bincount(
        np.asarray(vote_cell, dtype=np.intp), weights=shares * speaks, minlength=n_cells
    ).astype(np.float64)


AGREEMENT_VOTES = 3  # votes a cell needs before its votes are scored against each other
# Where the other votes are at least this sure (either way), a vote is scored against their
# answer, not against their odds. Votes are scored once, early, with the credibility their
# voters had then (near the prior): a square that newcomers agree is empty stays at 0.1 on their
# odds, so every agreeing "no" was charged a tenth of a miss, and summed over the many empty
# squares that made careful volunteers look careless (sensitivity 0.45-0.85 online, 0.8-0.95
# from the EM pass over the same votes, 0.92 true, on photograph-like scenes): every "no"
# weighed 2.5x instead of 11x, and first windows took 5-6 grids instead of 3-4.
SURE_OTHERS = 0.8


def agreement_credit(
    vote_cell: npt.ArrayLike,
    vote_worker: npt.ArrayLike,
    vote_label: npt.ArrayLike,
    credit: npt.ArrayLike,
    counts: WorkerCounts,
    config: DawidSkeneConfig = DEFAULT_CONFIG,
    base_logodds: npt.ArrayLike | None = None,
) -> FloatArray:
    """Soft-count increments from the agreement of the votes marked in ``credit``.

    Each marked vote counts towards its volunteer's ``(pos_yes, pos_no, neg_no, neg_yes)`` with
    weights ``(q y, q (1 - y), (1 - q)(1 - y), (1 - q) y)``, where ``y`` is the vote and ``q``
    the probability that the cell shows the tag from every *other* vote of the cell
    (leave-one-out; 0 or 1 where that is at least ``SURE_OTHERS`` sure), on top of
    ``base_logodds``: how often such a cell shows the tag, known from
    outside these votes (flat where None). The base rate matters while volunteers are new: with
    a flat one, two newcomers' "no" leave ``q`` = 0.2, and every agreeing "no" on an empty square
    is charged as a fifth of a miss, which deflates everyone's sensitivity and keeps empty squares
    open for many more votes. It must not come from the votes it scores: a crowd that says yes to
    everything would confirm itself.

    Shape:
        the vote arrays ``(n_votes,)``; ``base_logodds`` ``(n_cells,)``, indexed by
        ``vote_cell``; returns ``(n_workers, 4)``.
    """
    cell = np.asarray(vote_cell, dtype=np.intp)
    worker = np.asarray(vote_worker, dtype=np.intp)
    y = np.asarray(vote_label, dtype=np.float64)
    w = np.asarray(credit, dtype=np.float64)
    llr_yes, llr_no = worker_llr(counts, config)
    per_vote = np.where(y == 1, llr_yes[worker], llr_no[worker])  # (n_votes,)
    total = np.bincount(cell, weights=per_vote).astype(np.float64)
    if base_logodds is not None:
        total = total + np.asarray(base_logodds, dtype=np.float64)[: total.shape[0]]
    q = 1.0 / (1.0 + np.exp(-(total[cell] - per_vote)))  # leave-one-out posterior per vote
    q = np.where(q >= SURE_OTHERS, 1.0, np.where(q <= 1.0 - SURE_OTHERS, 0.0, q))
    n = counts.pos_yes.shape[0]
    parts = (q * y, q * (1 - y), (1 - q) * (1 - y), (1 - q) * y)
    return np.column_stack([np.bincount(worker, weights=w * v, minlength=n) for v in parts])


def gold_credit(label: int, truth: int) -> tuple[int, int, int, int]:
    """Increments of ``(gold_tp, gold_fn, gold_tn, gold_fp)`` for one answer on a gold cell.

    The soft counts take the same increments (``pos_yes += tp``, ``pos_no += fn``,
    ``neg_no += tn``, ``neg_yes += fp``): a gold cell's posterior is its known answer.
    """
    if label not in (0, 1) or truth not in (0, 1):
        raise ValueError(f"label and truth must be 0 or 1, got {label!r} and {truth!r}")
    if truth == 1:
        return label, 1 - label, 0, 0
    return 0, 0, 1 - label, label
