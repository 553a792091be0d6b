"""Metrics against hand-computed values, threshold tuning, hierarchy closure, calibration."""

from __future__ import annotations

import numpy as np
import pytest

from ml.calibration import Calibrator, fit_calibrator, fit_platt, get_calibrator_method
from ml.hierarchy import ancestor_matrix, check_parents, close_hierarchy, close_probabilities
from ml.metrics import (
    apply_thresholds,
    average_precision,
    boundary_f1,
    intersection_union,
    iou_per_tag,
    mean_average_precision,
    mean_iou,
    tag_scores,
    tune_thresholds,
)


def test_average_precision_by_hand() -> None:
    scores = np.array([[0.9, 0.2], [0.8, 0.4], [0.7, 0.6], [0.1, 0.8]])
    labels = np.array([[1, 0], [0, 0], [1, 0], [0, 0]])
    ap = average_precision(scores, labels)
    # ranks of the positives: 1 and 3 -> (1/1 + 2/3) / 2; tag 1 has no positive
    assert ap[0] == pytest.approx((1 + 2 / 3) / 2)
    assert np.isnan(ap[1])
    assert mean_average_precision(scores, labels) == pytest.approx((1 + 2 / 3) / 2)


def test_precision_recall_f1_by_hand() -> None:
    predicted = np.array([[1, 1], [1, 0], [0, 0], [0, 1]])
    labels = np.array([[1, 0], [0, 0], [1, 0], [0, 0]])
    s = tag_scores(predicted, labels)
    # tag 0: tp 1, fp 1, fn 1 -> P 0.5, R 0.5, F1 0.5; tag 1: no positive, 2 fp -> all 0
    np.testing.assert_allclose(s.precision, [0.5, 0.0])
    np.testing.assert_allclose(s.recall, [0.5, 0.0])
    np.testing.assert_allclose(s.f1, [0.5, 0.0])
    np.testing.assert_array_equal(s.support, [2, 0])


def test_tuned_thresholds_beat_one_half_on_rare_tags() -> None:
    rng = np.random.default_rng(0)
    n, rates = 1000, np.array([0.5, 0.05, 0.02])
    labels = rng.random((n, 3)) < rates
    # a model that ranks well but is under-confident on rare tags: positives score ~0.3
    scores = np.clip(np.where(labels, 0.3, 0.1) + rng.normal(0, 0.05, (n, 3)), 0, 1)
    scores[:, 0] = np.clip(np.where(labels[:, 0], 0.7, 0.3) + rng.normal(0, 0.1, n), 0, 1)
    # tuned on one half, scored on the other: no credit for fitting the scored split
    thresholds = tune_thresholds(scores[: n // 2], labels[: n // 2])
    test_scores, test_labels = scores[n // 2 :], labels[n // 2 :]
    tuned = tag_scores(apply_thresholds(test_scores, thresholds), test_labels)
    half = tag_scores(test_scores >= 0.5, test_labels)
    assert tuned.f1[1] > half.f1[1] + 0.5 and tuned.f1[2] > half.f1[2] + 0.5
    assert tuned.macro_f1 > half.macro_f1
    assert thresholds[1] < 0.5


def test_tuned_threshold_is_exact_on_separable_scores() -> None:
    scores = np.array([[0.1], [0.2], [0.35], [0.4]])
    labels = np.array([[0], [0], [1], [1]])
    assert tune_thresholds(scores, labels)[0] == pytest.approx(0.35)
    assert tune_thresholds(scores, np.zeros_like(labels))[0] == 0.5  # no positive: default
    assert list(tune_thresholds(np.zeros((0, 2)), np.zeros((0, 2)))) == [0.5, 0.5]  # no images


def test_iou_and_boundary_f1_by_hand() -> None:
    truth = np.zeros((1, 2, 4, 4), bool)
    pred = np.zeros((1, 2, 4, 4), bool)
    truth[0, 0, :2, :2] = True  # 4 pixels
    pred[0, 0, :2, :3] = True  # 6 pixels, 4 shared -> IoU 4/6
    inter, union = intersection_union(pred, truth)
    iou = iou_per_tag(inter, union)
    assert iou[0] == pytest.approx(4 / 6) and np.isnan(iou[1])
    assert mean_iou(iou) == pytest.approx(4 / 6)
    square = np.zeros((20, 20), bool)
    square[5:15, 5:15] = True
    assert boundary_f1(square, square) == 1.0
    far = np.zeros((20, 20), bool)
    far[0:3, 0:3] = True
    assert boundary_f1(far, square, tolerance=1) == 0.0
    shifted = np.roll(square, 1, axis=1)
    assert boundary_f1(shifted, square, tolerance=1) == 1.0
    assert boundary_f1(shifted, square, tolerance=0) < 1.0


DEMO_PARENTS = (-1, 0, 0, 1, 1, 1, 2, 5, -1, -1, -1, -1, -1, 12, 12, 12)  # ml.coco on the demo


def test_hierarchy_closure_turns_ancestors_on() -> None:
    predicted = np.zeros((2, 16), bool)
    predicted[0, 6] = True  # red_circle -> circle -> shape
    predicted[1, 7] = True  # blue_star -> star -> polygon -> shape
    closed = close_hierarchy(predicted, DEMO_PARENTS)
    assert set(np.flatnonzero(closed[0])) == {0, 2, 6}
    assert set(np.flatnonzero(closed[1])) == {0, 1, 5, 7}
    probs = np.zeros((1, 16))
    probs[0, 14] = 0.9  # dotted -> patterned
    assert close_probabilities(probs, DEMO_PARENTS)[0, 12] == 0.9
    assert ancestor_matrix(DEMO_PARENTS).sum() == 16 + 1 + 1 + 2 * 3 + 2 + 3 + 3 * 1


def test_hierarchy_rejects_cycles_and_bad_indices() -> None:
    with pytest.raises(ValueError, match="cycle"):
        check_parents([1, 0])
    with pytest.raises(ValueError, match="parent indices"):
        check_parents([5])


@pytest.mark.parametrize("method", ["isotonic", "platt"])
def test_calibrator_is_monotone_and_fitted(method: str) -> None:
    rng = np.random.default_rng(1)
    heat = rng.random(5000)
    truth = heat**2  # heat over-states the probability
    labels = rng.random(5000) < truth
    cal = fit_calibrator(heat, labels, method)
    grid = np.linspace(0, 1, 101)
    p = cal.apply(grid)
    assert np.all(np.diff(p) >= -1e-12) and p.min() > 0 and p.max() < 1
    assert np.abs(cal.apply([0.25, 0.5, 0.9]) - np.array([0.0625, 0.25, 0.81])).max() < 0.12
    assert np.all(np.isfinite(cal.log_odds(grid)))
    assert Calibrator.from_dict(cal.to_dict()) == cal


def test_calibrator_registry_names_the_known_methods() -> None:
    with pytest.raises(KeyError, match="isotonic"):
        get_calibrator_method("magic")


def test_platt_with_an_offset_fits_the_evidence_over_the_known_rate() -> None:
    """Cells whose rate without the model differs by level: fitted with each cell's rate as an
    offset, (a, b) is the model's own log-likelihood ratio, the same at every level."""
    rng = np.random.default_rng(0)
    scores = rng.random(40_000)
    offset = np.where(rng.random(scores.size) < 0.5, -3.0, 1.0)  # two levels' rates
    truth_a, truth_b = 3.0, -1.5
    labels = rng.random(scores.size) < 1 / (1 + np.exp(-(offset + truth_a * scores + truth_b)))
    fitted = fit_platt(scores, labels, offset=offset)
    assert abs(fitted.x[0] - truth_a) < 0.15 and abs(fitted.y[0] - truth_b) < 0.1
    with pytest.raises(ValueError, match="offset per score"):
        fit_platt(scores, labels, offset=offset[:10])
