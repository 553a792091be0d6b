"""Metrics of the tagger (AP, mAP, per-tag precision/recall/F1, tuned thresholds) and of the
segmenter (IoU per tag, mIoU, boundary F1). Pure numpy.

- Average precision is the non-interpolated AP (mean precision at the rank of each positive,
  as scikit-learn's ``average_precision_score``); a tag without positives has AP NaN and is left
  out of the mAP.
- Per-tag thresholds maximise F1 on a validation split: a single 0.5 threshold fails on rare
  tags, whose probabilities rarely reach it.
- Boundary F1 (Csurka et al. 2013, "What is a good evaluation measure for semantic
  segmentation?"): a boundary pixel counts as matched when the other boundary lies within
  ``tolerance`` pixels (Chebyshev distance).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


def _as_2d(scores: npt.ArrayLike, labels: npt.ArrayLike) -> tuple[FloatArray, BoolArray]:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels) > 0.5
    if s.shape != y.shape or s.ndim != 2:
        raise ValueError(f"scores and labels must both be (N, T), got {s.shape} and {y.shape}")
    return s, y


def average_precision(scores: npt.ArrayLike, labels: npt.ArrayLike) -> FloatArray:
    """Average precision per tag.

    Shape:
        scores, labels ``(N, T)``; returns ``(T,)`` (NaN for a tag without positives).
    """
    s, y = _as_2d(scores, labels)
    order = np.argsort(-s, axis=0, kind="stable")
    hits = np.take_along_axis(y, order, axis=0).astype(np.float64)  # (N, T) by rank
    tp = np.cumsum(hits, axis=0)
    precision = tp / np.arange(1, s.shape[0] + 1)[:, None]
    n_pos = hits.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_pos > 0, (precision * hits).sum(axis=0) / n_pos, np.nan)


def mean_average_precision(scores: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """mAP over tags that have at least one positive (NaN when none has)."""
    ap = average_precision(scores, labels)
    return float(np.nanmean(ap)) if np.any(~np.isnan(ap)) else float("nan")


@dataclass(frozen=True)
class TagScores:
    """Per-tag precision, recall and F1 at given thresholds, with their macro means.

    Shape:
        each array ``(T,)``. Precision is 0 for a tag never predicted; F1 is 0 when P + R is 0.
    """

    precision: FloatArray
    recall: FloatArray
    f1: FloatArray
    support: npt.NDArray[np.int64]

    @property
    def macro_f1(self) -> float:
        return float(self.f1.mean()) if self.f1.size else float("nan")


def _prf(tp: FloatArray, fp: FloatArray, fn: FloatArray) -> tuple[FloatArray, ...]:
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        recall = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return precision, recall, f1


def tag_scores(predicted: npt.ArrayLike, labels: npt.ArrayLike) -> TagScores:
    """Precision, recall and F1 per tag of hard predictions.

    Shape:
        predicted, labels ``(N, T)``.
    """
    p, y = _as_2d(predicted, labels)
    pred = p > 0.5
    tp = (pred & y).sum(axis=0).astype(np.float64)
    fp = (pred & ~y).sum(axis=0).astype(np.float64)
    fn = (~pred & y).sum(axis=0).astype(np.float64)
    precision, recall, f1 = _prf(tp, fp, fn)
    return TagScores(precision, recall, f1, y.sum(axis=0).astype(np.int64))


def apply_thresholds(scores: npt.ArrayLike, thresholds: npt.ArrayLike) -> BoolArray:
    """``scores >= thresholds`` per tag. Shape: scores ``(N, T)``, thresholds ``(T,)``."""
    return np.asarray(scores, dtype=np.float64) >= np.asarray(thresholds, dtype=np.float64)


def tune_thresholds(
    scores: npt.ArrayLike, labels: npt.ArrayLike, *, default: float = 0.5
) -> FloatArray:
    """Per-tag threshold that maximises F1 on a validation split.

    Every distinct score of a tag is a candidate cut (predict positive when score >= cut); ties
    between cuts go to the highest one. A tag without positives keeps ``default``.

    Shape:
        scores, labels ``(N, T)``; returns ``(T,)``.
    """
    s, y = _as_2d(scores, labels)
    if s.shape[0] == 0:
        return np.full(s.shape[1], default)
    order = np.argsort(-s, axis=0, kind="stable")
    ranked = np.take_along_axis(s, order, axis=0)  # (N, T) descending
    hits = np.take_along_axis(y, order, axis=0).astype(np.float64)
    tp = np.cumsum(hits, axis=0)  # cut after rank k: predict the top k + 1
    fp = np.arange(1, s.shape[0] + 1)[:, None] - tp
    fn = hits.sum(axis=0)[None, :] - tp
    _, _, f1 = _prf(tp, fp, fn)
    # A cut between equal scores is not realisable: only keep the last rank of each tie run.
    last_of_run = np.ones_like(ranked, dtype=bool)
    last_of_run[:-1] = ranked[:-1] != ranked[1:]
    f1 = np.where(last_of_run, f1, -1.0)
    best = np.argmax(f1, axis=0)  # first maximum = highest cut
    thresholds = ranked[best, np.arange(s.shape[1])]
    return np.where(y.any(axis=0), thresholds, default)


def intersection_union(
    predicted: npt.ArrayLike, truth: npt.ArrayLike, valid: npt.ArrayLike | None = None
) -> tuple[FloatArray, FloatArray]:
    """Per-tag intersection and union pixel counts, summed over a batch.

    Shape:
        predicted, truth, valid ``(N, T, H, W)`` (valid: pixels that count); returns two ``(T,)``.
    """
    p = np.asarray(predicted) > 0.5
    t = np.asarray(truth) > 0.5
    v = np.ones_like(p) if valid is None else np.asarray(valid) > 0
    inter = (p & t & v).sum(axis=(0, 2, 3)).astype(np.float64)
    union = ((p | t) & v).sum(axis=(0, 2, 3)).astype(np.float64)
    return inter, union


def iou_per_tag(intersection: npt.ArrayLike, union: npt.ArrayLike) -> FloatArray:
    """IoU per tag from accumulated counts; NaN where the union is empty."""
    i = np.asarray(intersection, dtype=np.float64)
    u = np.asarray(union, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(u > 0, i / u, np.nan)


def mean_iou(iou: npt.ArrayLike) -> float:
    """Mean of the per-tag IoUs that are defined (NaN when none is)."""
    values = np.asarray(iou, dtype=np.float64)
    return float(np.nanmean(values)) if np.any(~np.isnan(values)) else float("nan")


def boundary(mask: npt.ArrayLike) -> BoolArray:
    """Pixels of the mask with a 4-neighbour outside it (the image border counts as outside).

    Shape:
        mask ``(H, W)``; returns ``(H, W)``.
    """
    m = np.asarray(mask) > 0.5
    padded = np.pad(m, 1, constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return m & ~inner


def dilate(mask: BoolArray, radius: int) -> BoolArray:
    """Square (Chebyshev) dilation by ``radius`` pixels, separable: rows then columns."""
    out = mask.copy()
    for axis in (0, 1):
        src = out.copy()
        for shift in range(1, radius + 1):
            fwd = np.roll(src, shift, axis=axis)
            bwd = np.roll(src, -shift, axis=axis)
            if axis == 0:
                fwd[:shift], bwd[-shift:] = False, False
            else:
                fwd[:, :shift], bwd[:, -shift:] = False, False
            out |= fwd | bwd
    return out


def boundary_f1(predicted: npt.ArrayLike, truth: npt.ArrayLike, *, tolerance: int = 2) -> float:
    """Boundary F1 of one mask pair; 1.0 when both are empty, 0.0 when only one is.

    Shape:
        predicted, truth ``(H, W)``.
    """
    bp, bt = boundary(predicted), boundary(truth)
    if not bp.any() and not bt.any():
        return 1.0
    if not bp.any() or not bt.any():
        return 0.0
    precision = float((bp & dilate(bt, tolerance)).sum() / bp.sum())
    recall = float((bt & dilate(bp, tolerance)).sum() / bt.sum())
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
