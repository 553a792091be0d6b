"""Online updates stay within the tolerance stated in ml.aggregation.online."""

from __future__ import annotations

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ml.aggregation import OnlineDawidSkene, dawid_skene
from tests.aggregation.builders import crowd


def _stream(seed: int, n_items: int, vpi: int, gold_fraction: float) -> tuple:
    c, gold = crowd(
        seed,
        n_items=n_items,
        votes_per_item=vpi,
        gold_fraction=gold_fraction,
        mix={"diligent": 0.6, "sloppy": 0.2, "random_clicker": 0.1, "adversary": 0.1},
    )
    v = c.votes
    online = OnlineDawidSkene(v.n_workers, v.n_items, gold=gold)
    for k in np.random.default_rng(seed).permutation(v.n_votes):
        online.submit(int(v.worker[k]), int(v.item[k]), int(v.label[k]))
    return online, dawid_skene(v, gold=gold), gold


@settings(max_examples=8, deadline=None)
@example(seed=72, n_items=99, vpi=5, gold_fraction=0.125)  # 0.0101 after one sweep (a CI run)
@given(
    seed=st.integers(0, 2**31 - 1),
    n_items=st.integers(60, 160),
    vpi=st.integers(5, 8),
    gold_fraction=st.floats(0.05, 0.3),
)
def test_online_matches_batch_within_tolerance(
    seed: int, n_items: int, vpi: int, gold_fraction: float
) -> None:
    online, batch, gold = _stream(seed, n_items, vpi, gold_fraction)
    d = np.abs(online.posterior - batch.posterior)
    flips = int(np.sum((online.posterior >= 0.5) != (batch.posterior >= 0.5)))
    assert d.mean() <= 0.03
    assert flips <= max(2, int(0.03 * n_items))
    known = gold >= 0
    assert np.array_equal(online.posterior[known], gold[known].astype(float))
    online.sweep()
    assert np.abs(online.posterior - batch.posterior).mean() <= 0.015
    online.sweep()
    assert np.abs(online.posterior - batch.posterior).mean() <= 0.01


def test_submit_grows_and_gold_teaches_at_once() -> None:
    online = OnlineDawidSkene(1, 1, gold=np.array([1], dtype=np.int8))
    assert online.submit(0, 0, 1) == 1.0
    assert online.gold_tp[0] == 1
    q = online.submit(3, 5, 1)
    assert online.n_workers == 4 and online.n_items == 6 and q > 0.5


def test_refit_adopts_batch() -> None:
    online, batch, _ = _stream(3, 80, 5, 0.1)
    result = online.refit()
    assert np.allclose(online.posterior, batch.posterior)
    assert result.iterations == batch.iterations
