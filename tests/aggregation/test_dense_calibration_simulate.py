"""Dense fusion, calibration error and the volunteer simulator."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ml.aggregation import expected_calibration_error, fuse_masks
from ml.aggregation.simulate import PROFILES, answer, get_profile, simulate_crowd


def test_fuse_masks_recovers_truth_and_ranks_annotators() -> None:
    rng = np.random.default_rng(0)
    truth = np.zeros((32, 48), dtype=bool)
    truth[8:24, 10:40] = True
    noise = [0.02, 0.05, 0.1, 0.45]
    masks = np.stack([truth ^ (rng.random(truth.shape) < p) for p in noise])
    fused = fuse_masks(masks)
    assert (fused.hard == truth).mean() > 0.98
    assert fused.soft.shape == truth.shape and fused.soft.dtype == np.float32
    j = fused.sensitivity + fused.specificity
    assert j[0] > j[3]


def test_ece() -> None:
    assert expected_calibration_error([], []) == 0.0
    assert expected_calibration_error([1.0, 0.0], [1, 0]) == 0.0
    assert expected_calibration_error([0.9, 0.9], [0, 0]) == pytest.approx(0.9)
    rng = np.random.default_rng(0)
    p = rng.random(100_000)
    assert expected_calibration_error(p, rng.random(p.shape) < p) < 0.01
    with pytest.raises(ValueError):
        expected_calibration_error([0.5], [1, 0])


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_simulation_is_seeded_and_shaped(seed: int) -> None:
    cov = np.random.default_rng(seed).random(50)
    a = simulate_crowd(cov, n_workers=10, votes_per_item=4, rng=np.random.default_rng(seed))
    b = simulate_crowd(cov, n_workers=10, votes_per_item=4, rng=np.random.default_rng(seed))
    assert np.array_equal(a.votes.label, b.votes.label)
    assert a.votes.n_votes == 200 and a.seconds.shape == (200,) and np.all(a.seconds > 0)
    pairs = a.votes.worker.astype(np.int64) * 1000 + a.votes.item
    assert np.unique(pairs).size == 200  # distinct workers per item


def test_profiles_behave() -> None:
    rng = np.random.default_rng(1)
    cov = np.r_[np.zeros(5000), np.ones(5000)]
    lazy, _ = answer(get_profile("lazy"), cov, rng)
    assert lazy.sum() == 0
    adv, _ = answer(PROFILES["adversary"], cov, rng)
    assert adv[:5000].mean() > 0.7 and adv[5000:].mean() < 0.3
    sloppy, t = answer(PROFILES["sloppy"], np.full(1000, 0.1), rng)
    assert sloppy.mean() < 0.3  # below their coverage threshold they rarely select
    assert np.median(t) == pytest.approx(1.5, rel=0.2)
    # The oracle sees any part of the object, and says no to every empty tile.
    oracle, _ = answer(PROFILES["oracle"], np.r_[np.zeros(500), np.full(500, 1e-4)], rng)
    assert oracle[:500].sum() == 0 and oracle[500:].all()
    with pytest.raises(KeyError, match="diligent"):
        get_profile("bored")


def test_people_see_small_parts_by_degrees_and_take_tiles_beside_the_object() -> None:
    rng = np.random.default_rng(2)
    careful = PROFILES["careful"]
    seen = [answer(careful, np.full(4000, c), rng)[0].mean() for c in (0.005, 0.03, 0.2)]
    # No sharp threshold: seen more the more the tile shows, half-way (x sensitivity) at 3%.
    assert seen[0] < 0.2 < seen[1] < seen[2]
    assert seen[1] == pytest.approx(0.5 * careful.sensitivity, abs=0.05)
    empty = np.zeros(4000)
    beside = np.r_[np.ones(2000, dtype=bool), np.zeros(2000, dtype=bool)]
    said, _ = answer(PROFILES["hasty"], empty, rng, beside)
    assert said[:2000].mean() == pytest.approx(0.25, abs=0.03)  # beside the object
    assert said[2000:].mean() == pytest.approx(0.07, abs=0.02)  # elsewhere: 1 - specificity
    # Profiles without boundary errors ignore ``near`` and draw the same stream as before.
    a, _ = answer(PROFILES["diligent"], empty, np.random.default_rng(3), beside)
    b, _ = answer(PROFILES["diligent"], empty, np.random.default_rng(3))
    assert np.array_equal(a, b)
