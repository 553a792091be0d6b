"""Properties of the aggregation methods (majority, weighted majority, two-coin DS)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ml.aggregation import METHODS, dawid_skene, get_method, make_votes, split_by_group
from ml.aggregation.dawid_skene import (
    DEFAULT_CONFIG,
    _evidence,
    _layout,
    _m_step,
    vote_weights,
)
from ml.aggregation.votes import Votes, from_dense, to_dense
from tests.aggregation.builders import crowd

FAST = settings(max_examples=15, deadline=None)
seeds = st.integers(0, 2**31 - 1)
method_names = st.sampled_from(sorted(METHODS))


def _permute(votes: Votes, pw: np.ndarray, pi: np.ndarray, order: np.ndarray) -> Votes:
    return make_votes(
        pw[votes.worker][order],
        pi[votes.item][order],
        votes.label[order],
        n_workers=votes.n_workers,
        n_items=votes.n_items,
    )


@FAST
@given(seed=seeds, name=method_names)
def test_invariant_to_order_of_workers_items_and_votes(seed: int, name: str) -> None:
    c, gold = crowd(seed)
    rng = np.random.default_rng(seed)
    pw, pi = rng.permutation(c.votes.n_workers), rng.permutation(c.votes.n_items)
    order = rng.permutation(c.votes.n_votes)
    method = get_method(name)
    a = method(c.votes, gold=gold)
    g2 = np.empty_like(gold)
    g2[pi] = gold
    b = method(_permute(c.votes, pw, pi, order), gold=g2)
    assert np.allclose(b.posterior[pi], a.posterior, atol=1e-7)
    assert np.allclose(b.sensitivity[pw], a.sensitivity, atol=1e-7)
    assert np.allclose(b.specificity[pw], a.specificity, atol=1e-7)


@FAST
@given(seed=seeds, name=method_names, prior=st.booleans())
def test_gold_is_always_reproduced(seed: int, name: str, prior: bool) -> None:
    c, gold = crowd(seed, gold_fraction=0.3)
    p = np.random.default_rng(seed).normal(0, 2, c.votes.n_items) if prior else None
    r = get_method(name)(c.votes, gold=gold, prior_logodds=p)
    known = gold >= 0
    assert np.array_equal(r.posterior[known], gold[known].astype(float))
    assert np.all((r.posterior >= 0) & (r.posterior <= 1))


@FAST
@given(seed=seeds, item=st.integers(0, 79))
def test_a_yes_from_a_credible_volunteer_never_lowers_a_posterior(seed: int, item: int) -> None:
    c, gold = crowd(seed)
    v = c.votes
    before = dawid_skene(v, gold=gold)
    credible = int(np.argmax(before.sensitivity + before.specificity))
    voted = (v.worker == credible) & (v.item == item)
    keep = ~voted
    w = np.append(v.worker[keep], credible)
    i = np.append(v.item[keep], item)
    y = np.append(v.label[keep], 1)
    after = dawid_skene(make_votes(w, i, y, n_workers=v.n_workers, n_items=v.n_items), gold=gold)
    base = make_votes(
        v.worker[keep], v.item[keep], v.label[keep], n_workers=v.n_workers, n_items=v.n_items
    )
    without = dawid_skene(base, gold=gold)
    assert after.posterior[item] >= without.posterior[item] - 1e-9


@FAST
@given(seed=seeds)
def test_vote_weights_are_monotone_for_credible_workers(seed: int) -> None:
    rng = np.random.default_rng(seed)
    s, c = rng.uniform(0.01, 0.99, 50), rng.uniform(0.01, 0.99, 50)
    llr_yes, llr_no = vote_weights(s, c, np.zeros(50, dtype=bool))
    assert np.all(llr_yes >= llr_no)  # a yes never counts less than a no
    assert np.all(llr_yes[s + c >= 1] >= 0)


@FAST
@given(seed=seeds)
def test_adding_a_random_clicker_changes_posteriors_only_slightly(seed: int) -> None:
    c, gold = crowd(seed, n_items=120)
    v = c.votes
    rng = np.random.default_rng(seed + 1)
    items = np.arange(v.n_items)
    clicks_y = rng.integers(0, 2, v.n_items)
    clicks = make_votes(
        np.append(v.worker, np.full(v.n_items, v.n_workers)),
        np.append(v.item, items),
        np.append(v.label, clicks_y),
        n_workers=v.n_workers + 1,
        n_items=v.n_items,
    )
    a, b = dawid_skene(v, gold=gold), dawid_skene(clicks, gold=gold)
    d = np.abs(a.posterior - b.posterior)
    assert d.mean() <= 0.03
    assert np.mean((a.posterior >= 0.5) != (b.posterior >= 0.5)) <= 0.05
    # The clicker's estimated Youden's J follows the chance agreement they actually showed
    # (itself about +-0.1 on 120 items, so a fixed bound on J would be flaky; 0.11 at most
    # over 400 seeds) rather than the J of the crowd they joined.
    j = b.sensitivity[-1] + b.specificity[-1] - 1
    t = c.truth
    shown = clicks_y[t == 1].mean() - clicks_y[t == 0].mean()
    assert abs(j - shown) <= 0.15


@FAST
@given(seed=seeds, with_gold=st.booleans())
def test_an_adversary_block_does_not_pull_posteriors_their_way(seed: int, with_gold: bool) -> None:
    c, gold = crowd(seed, n_items=120, gold_fraction=0.25 if with_gold else 0.0)
    v = c.votes
    rng = np.random.default_rng(seed + 2)
    n_adv = 3
    truth = c.truth
    w: list[np.ndarray] = [v.worker]
    i: list[np.ndarray] = [v.item]
    y: list[np.ndarray] = [v.label]
    for k in range(n_adv):  # each adversary answers the opposite of the truth 85% of the time
        flip = rng.random(v.n_items) < 0.85
        w.append(np.full(v.n_items, v.n_workers + k))
        i.append(np.arange(v.n_items))
        y.append(np.where(flip, 1 - truth, truth))
    adv_answer = y[-1]
    both = make_votes(
        np.concatenate(w),
        np.concatenate(i),
        np.concatenate(y),
        n_workers=v.n_workers + n_adv,
        n_items=v.n_items,
    )
    a, b = dawid_skene(v, gold=gold), dawid_skene(both, gold=gold)
    toward = np.where(adv_answer == 1, b.posterior - a.posterior, a.posterior - b.posterior)
    assert toward.mean() <= 0.02
    assert np.all(b.sensitivity[-n_adv:] + b.specificity[-n_adv:] < 1)


def test_per_category_credibility_splits_workers() -> None:
    v = make_votes([0, 0, 1, 1], [0, 1, 0, 1], [1, 0, 1, 1])
    s = split_by_group(v, np.array([0, 1]), 2)
    assert s.n_workers == 4 and s.worker.tolist() == [0, 1, 2, 3]
    r = dawid_skene(s)
    assert r.sensitivity.reshape(2, 2).shape == (2, 2)


def test_dense_and_coo_round_trip() -> None:
    m = np.array([[1, -1, 0], [-1, 1, 1]], dtype=np.int8)
    assert np.array_equal(to_dense(from_dense(m)), m)


def test_get_method_lists_names() -> None:
    with pytest.raises(KeyError, match="dawid_skene"):
        get_method("nope")


def test_prior_weight_is_learned_from_gold() -> None:
    c, gold = crowd(7, n_items=300, gold_fraction=0.3)
    rng = np.random.default_rng(0)
    good = np.where(c.truth == 1, 2.0, -2.0) + rng.normal(0, 0.5, c.truth.shape)
    noise = rng.normal(0, 2.0, c.truth.shape)
    w_good = dawid_skene(c.votes, gold=gold, prior_logodds=good).prior_weight
    w_noise = dawid_skene(c.votes, gold=gold, prior_logodds=noise).prior_weight
    assert w_good > w_noise


@FAST
@given(seed=seeds, n_items=st.integers(1, 400), n_workers=st.integers(1, 30))
def test_em_steps_match_plain_sums_on_skewed_vote_counts(
    seed: int, n_items: int, n_workers: int
) -> None:
    # Heavy-tailed popularity: items renumbered by vote count, long rank tails in bincount.
    rng = np.random.default_rng(seed)
    p = rng.pareto(1.0, n_items) + 1e-3
    n = int(rng.integers(0, 3000))
    item = rng.choice(n_items, n, p=p / p.sum())
    worker, label = rng.integers(0, n_workers, n), rng.integers(0, 2, n)
    v = make_votes(worker, item, label, n_workers=n_workers, n_items=n_items)
    lay = _layout(v)
    order = np.arange(n_items) if lay.order is None else lay.order
    llr_yes, llr_no = rng.normal(size=n_workers), rng.normal(size=n_workers)
    plain = np.bincount(item, np.where(label == 1, llr_yes[worker], llr_no[worker]), n_items)
    assert np.allclose(_evidence(lay, llr_yes, llr_no, n_items), plain[order])
    q = rng.random(n_items)
    sens, spec = _m_step(lay, q[order], DEFAULT_CONFIG)
    yes, no = label == 1, label == 0
    q_yes = np.bincount(worker[yes], q[item[yes]], n_workers)
    q_no = np.bincount(worker[no], q[item[no]], n_workers)
    neg_yes = np.bincount(worker[yes], 1 - q[item[yes]], n_workers)
    neg_no = np.bincount(worker[no], 1 - q[item[no]], n_workers)
    assert np.allclose(sens, (2 + q_yes) / (3 + q_yes + q_no))
    assert np.allclose(spec, (2 + neg_no) / (3 + neg_no + neg_yes))
