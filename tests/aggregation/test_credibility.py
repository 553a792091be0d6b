"""The stateless credibility used by the database-backed vote path."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ml.aggregation.credibility import (
    WorkerCounts,
    budget_shares,
    cells_logodds,
    gold_credit,
    sensitivity_specificity,
    worker_llr,
)
from ml.aggregation.dawid_skene import DawidSkeneConfig, dawid_skene
from ml.aggregation.votes import make_votes


def counts(*rows: tuple[float, ...]) -> WorkerCounts:
    return WorkerCounts.from_rows(np.array(rows, dtype=float))


NEW = (0, 0, 0, 0, 0, 0, 0, 0)
GOOD = (40, 2, 45, 3, 10, 0, 10, 0)
ADVERSARY_NO_GOLD = (2, 40, 3, 45, 0, 0, 0, 0)
ADVERSARY_ON_GOLD = (2, 40, 3, 45, 0, 10, 0, 10)


def test_new_volunteer_counts_a_little_a_good_one_a_lot() -> None:
    llr_yes, llr_no = worker_llr(counts(NEW, GOOD))
    assert 0 < llr_yes[0] < llr_yes[1]
    assert llr_no[1] < llr_no[0] < 0


def test_adversary_weighs_nothing_until_gold_confirms_the_inversion() -> None:
    llr_yes, llr_no = worker_llr(counts(ADVERSARY_NO_GOLD, ADVERSARY_ON_GOLD))
    assert llr_yes[0] == 0 and llr_no[0] == 0
    assert llr_yes[1] < 0 < llr_no[1]


RANDOM_ON_GOLD = (20, 20, 20, 20, 20, 20, 20, 20)  # a coin on 80 gold tiles


def test_budget_counts_a_vote_in_proportion_to_what_it_says_up_to_a_newcomers() -> None:
    shares = budget_shares(counts(NEW, GOOD, RANDOM_ON_GOLD, ADVERSARY_NO_GOLD, ADVERSARY_ON_GOLD))
    new, good, coin, unconfirmed, confirmed = shares
    assert new == good == confirmed == 1.0  # informative votes count in full, inverted or not
    assert 0.0 <= coin < 0.1  # a random clicker's vote spends almost nothing
    assert unconfirmed == 0.0  # the consensus drops it: so does the budget


def test_budget_shares_under_flat_priors_stay_finite() -> None:
    flat = DawidSkeneConfig(sens_prior=(1.0, 1.0), spec_prior=(1.0, 1.0))
    shares = budget_shares(counts(NEW, GOOD, RANDOM_ON_GOLD), flat)
    assert shares[0] == 0.0 and shares[1] == 1.0 and 0.0 <= shares[2] < 0.2


@settings(max_examples=50, deadline=None)
@given(rows=st.lists(st.tuples(*[st.integers(0, 60)] * 8), min_size=1, max_size=8))
def test_budget_shares_lie_in_the_unit_interval(rows: list[tuple[int, ...]]) -> None:
    shares = budget_shares(counts(*rows))
    assert np.all((shares >= 0.0) & (shares <= 1.0))


def test_gold_credit() -> None:
    assert gold_credit(1, 1) == (1, 0, 0, 0)
    assert gold_credit(0, 1) == (0, 1, 0, 0)
    assert gold_credit(0, 0) == (0, 0, 1, 0)
    assert gold_credit(1, 0) == (0, 0, 0, 1)
    with pytest.raises(ValueError, match="0 or 1"):
        gold_credit(2, 0)


@settings(max_examples=30, deadline=None)
@given(
    base=st.floats(-3, 3),
    rows=st.lists(st.tuples(*[st.integers(0, 30)] * 8), min_size=1, max_size=6),
    labels=st.lists(st.integers(0, 1), min_size=1, max_size=6),
)
def test_a_yes_from_a_credible_volunteer_never_lowers_the_cell(
    base: float, rows: list[tuple[int, ...]], labels: list[int]
) -> None:
    c = counts(*rows)
    n = min(len(rows), len(labels))
    workers, lab = np.arange(n), np.array(labels[:n])
    before = cells_logodds([base], np.zeros(n), workers, lab, c)
    sens, spec = sensitivity_specificity(c)
    credible = int(np.argmax(sens + spec))
    after = cells_logodds([base], np.zeros(n + 1), [*workers, credible], [*lab, 1], c)
    if sens[credible] + spec[credible] >= 1:
        assert after[0] >= before[0] - 1e-12


def test_cell_logodds_equal_the_batch_e_step_with_batch_credibility() -> None:
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2, 200)
    workers, items, labels = [], [], []
    for w in range(8):
        for i in rng.choice(200, 60, replace=False):
            flip = rng.random() < (0.1 if w < 6 else 0.5)
            workers.append(w)
            items.append(i)
            labels.append(int(truth[i] ^ flip))
    votes = make_votes(workers, items, labels, n_workers=8, n_items=200)
    batch = dawid_skene(votes)
    q = batch.posterior[votes.item]
    y = votes.label.astype(float)
    soft = np.stack(
        [
            np.bincount(votes.worker, weights=w, minlength=8)
            for w in (q * y, q * (1 - y), (1 - q) * (1 - y), (1 - q) * y)
        ],
        axis=1,
    )
    c = WorkerCounts.from_rows(np.hstack([soft, np.zeros((8, 4))]))
    base = np.full(200, np.log(batch.class_prior / (1 - batch.class_prior)))
    online = cells_logodds(base, votes.item, votes.worker, votes.label, c)
    voted = np.bincount(votes.item, minlength=200) > 0
    agree = ((online > 0) == (batch.posterior > 0.5))[voted]
    assert agree.mean() > 0.97


def test_agreement_credit_scores_each_vote_against_the_others_only() -> None:
    from ml.aggregation.credibility import WorkerCounts, agreement_credit

    counts = WorkerCounts.from_rows(np.zeros((4, 8)))
    cell = np.array([0, 0, 0, 0])
    worker = np.array([0, 1, 2, 3])
    label = np.array([1, 1, 1, 0])  # three say yes, one says no
    rows = agreement_credit(cell, worker, label, np.ones(4, dtype=bool), counts)
    # The dissenter is scored against three yeses: mostly a missed positive (pos_no).
    assert rows[3, 1] > 0.85 and rows[3, 0] == 0
    # A yes-voter is scored against two yeses and a no: a weaker, but still positive, credit.
    assert 0.5 < rows[0, 0] < rows[3, 1]
    # Votes not marked for credit count nothing.
    none = agreement_credit(cell, worker, label, np.zeros(4, dtype=bool), counts)
    assert not none.any()


def test_agreement_credit_scores_against_a_base_rate_from_outside_the_votes() -> None:
    from ml.aggregation.credibility import WorkerCounts, agreement_credit

    counts = WorkerCounts.from_rows(np.zeros((3, 8)))  # three newcomers
    cell, worker = np.array([0, 0, 0]), np.array([0, 1, 2])
    nos = np.array([0, 0, 0])  # they agree the square is empty
    flat = agreement_credit(cell, worker, nos, np.ones(3, dtype=bool), counts)
    # Where one square in five shows the tag, the same agreeing "no"s are charged as far less of
    # a miss (pos_no), and count as more of a correct rejection (neg_no).
    rare = agreement_credit(
        cell, worker, nos, np.ones(3, dtype=bool), counts, base_logodds=np.array([np.log(0.25)])
    )
    assert rare[:, 1].sum() < 0.5 * flat[:, 1].sum()
    assert rare[:, 2].sum() > flat[:, 2].sum()
    # A flat base rate (log-odds 0) is the same as none.
    zero = agreement_credit(
        cell, worker, nos, np.ones(3, dtype=bool), counts, base_logodds=np.zeros(1)
    )
    np.testing.assert_allclose(zero, flat)


def test_agreement_scores_a_vote_against_the_others_answer_where_they_are_sure() -> None:
    from ml.aggregation.credibility import WorkerCounts, agreement_credit

    counts = WorkerCounts.from_rows(np.zeros((5, 8)))  # five newcomers
    cell, worker = np.zeros(5, dtype=np.intp), np.arange(5)
    # Four agree the square is empty: on each vote's others (three newcomers' noes: 0.11) the
    # square is surely empty, so an agreeing "no" is a correct rejection and nothing of a miss
    # (on the others' odds it was charged a tenth of a miss, on every empty square).
    nos = agreement_credit(cell[:4], worker[:4], np.zeros(4), np.ones(4, dtype=bool), counts)
    np.testing.assert_allclose(nos[:4], [[0.0, 0.0, 1.0, 0.0]] * 4)
    # Three noes and a yes: the yes is scored as a false alarm in full; a no, whose others
    # (two noes and the yes: 0.33) are less sure than SURE_OTHERS, on their odds.
    label = np.array([0, 0, 0, 1])
    rows = agreement_credit(cell[:4], worker[:4], label, np.ones(4, dtype=bool), counts)
    np.testing.assert_allclose(rows[3], [0.0, 0.0, 0.0, 1.0])
    assert rows[0, 1] == pytest.approx(1 / 3) and rows[0, 2] == pytest.approx(2 / 3)
