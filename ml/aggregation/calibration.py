"""Calibration of posteriors: expected calibration error (ECE) and the reliability table.

Reference: Naeini, Cooper & Hauskrecht (2015), "Obtaining well calibrated probabilities using
Bayesian binning"; Guo et al. (2017). Posteriors are binned into equal-width bins of the
predicted probability of the positive class; ECE is the item-weighted mean over bins of
``|mean predicted - observed positive rate|``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ml.aggregation.votes import FloatArray


@dataclass(frozen=True)
class ReliabilityTable:
    """Per-bin counts, mean predicted probability and observed positive rate.

    Shape:
        each field ``(n_bins,)``; empty bins have count 0 and NaN means.
    """

    count: npt.NDArray[np.int64]
    predicted: FloatArray
    observed: FloatArray


def reliability_table(
    posterior: npt.ArrayLike, truth: npt.ArrayLike, n_bins: int = 10
) -> ReliabilityTable:
    """Bin posteriors and compare with the truth.

    Shape:
        posterior, truth: ``(n,)``; truth in {0, 1}.
    """
    p = np.asarray(posterior, dtype=np.float64).reshape(-1)
    t = np.asarray(truth, dtype=np.float64).reshape(-1)
    if p.shape != t.shape:
        raise ValueError(f"posterior {p.shape} and truth {t.shape} must have the same shape")
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    b = np.clip((p * n_bins).astype(np.int64), 0, n_bins - 1)
    count = np.bincount(b, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        predicted = np.bincount(b, weights=p, minlength=n_bins) / count
        observed = np.bincount(b, weights=t, minlength=n_bins) / count
    return ReliabilityTable(count, predicted, observed)


def expected_calibration_error(
    posterior: npt.ArrayLike, truth: npt.ArrayLike, n_bins: int = 10
) -> float:
    """Expected calibration error of posteriors against ground truth.

    Args:
        posterior: predicted probability that each item is positive.
        truth: the true label of each item (0 or 1).
        n_bins: equal-width bins over [0, 1].

    Shape:
        posterior, truth: ``(n,)``.

    Returns:
        ECE in [0, 1]; 0.0 for no items.
    """
    table = reliability_table(posterior, truth, n_bins)
    n = int(table.count.sum())
    if n == 0:
        return 0.0
    used = table.count > 0
    gap = np.abs(table.predicted[used] - table.observed[used])
    return float(np.sum(gap * table.count[used]) / n)
