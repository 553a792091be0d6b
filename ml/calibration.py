"""Calibration of CAM heat (or any score in [0, 1]) into a probability, from labelled examples.

Two methods, behind a registry (``get_calibrator_method(name)``):

- ``isotonic``: pool-adjacent-violators (Barlow et al. 1972; Zadrozny & Elkan 2002) fits the
  best non-decreasing step function; prediction interpolates linearly between the fitted steps.
  Needs a few hundred examples to be smooth; assumes only that more heat never means less object.
- ``platt``: logistic regression on the score, ``p = sigmoid(a * s + b)`` (Platt 1999), fitted
  by Newton's method with Platt's smoothed targets; needs few examples, assumes a sigmoid shape.

``fit_calibrator(scores, labels, method)`` returns a ``Calibrator`` whose ``apply(scores)`` gives
probabilities clipped to ``[eps, 1 - eps]`` (so their log-odds are finite) and which round-trips
through ``to_dict``/``from_dict`` (JSON) for the checkpoint. Pure numpy.

A model's calibrated log-odds act as a pseudo-voter in the consensus; ``model_weight`` caps the
Platt slope (the weight of that voter) by the model's score on held-out truth, and
``with_slope`` rescales a Platt calibrator to the capped weight (see ``model_weight`` for why).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
EPS = 1e-4


@dataclass(frozen=True)
class Calibrator:
    """A monotone map from score to probability.

    ``kind == "isotonic"``: ``x`` knots (increasing) and ``y`` values, interpolated linearly.
    ``kind == "platt"``: ``x = (a,)``, ``y = (b,)``; ``p = sigmoid(a * s + b)``.
    """

    kind: str
    x: tuple[float, ...]
    y: tuple[float, ...]

    def apply(self, scores: npt.ArrayLike) -> FloatArray:
        """Probability per score, in ``[EPS, 1 - EPS]``; any shape in, same shape out."""
        s = np.asarray(scores, dtype=np.float64)
        if self.kind == "platt":
            p = 1.0 / (1.0 + np.exp(-(self.x[0] * s + self.y[0])))
        else:
            p = np.interp(s, np.asarray(self.x), np.asarray(self.y))
        return np.clip(p, EPS, 1 - EPS)

    def log_odds(self, scores: npt.ArrayLike) -> FloatArray:
        """``logit(apply(scores))``: the form the consensus prior takes."""
        p = self.apply(scores)
        return np.log(p) - np.log1p(-p)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "x": list(self.x), "y": list(self.y)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibrator:
        return cls(str(data["kind"]), tuple(map(float, data["x"])), tuple(map(float, data["y"])))


def _check(scores: npt.ArrayLike, labels: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = (np.asarray(labels).reshape(-1) > 0.5).astype(np.float64)
    if s.size != y.size or s.size == 0:
        raise ValueError(f"need as many labels as scores, and some: got {s.size} and {y.size}")
    return s, y


def pool_adjacent_violators(values: npt.ArrayLike, weights: npt.ArrayLike) -> FloatArray:
    """Weighted least-squares non-decreasing fit of ``values`` (already in score order).

    Shape:
        values, weights ``(n,)``; returns ``(n,)``.
    """
    means: list[float] = []
    sizes: list[float] = []
    counts: list[int] = []
    for v, w in zip(np.asarray(values, float), np.asarray(weights, float), strict=True):
        means.append(float(v))
        sizes.append(float(w))
        counts.append(1)
        while len(means) > 1 and means[-2] > means[-1]:  # merge the violating pair
            w2 = sizes[-2] + sizes[-1]
            m2 = (means[-2] * sizes[-2] + means[-1] * sizes[-1]) / w2
            c2 = counts[-2] + counts[-1]
            del means[-1], sizes[-1], counts[-1]
            means[-1], sizes[-1], counts[-1] = m2, w2, c2
    return np.repeat(np.asarray(means), counts)


def fit_isotonic(scores: npt.ArrayLike, labels: npt.ArrayLike) -> Calibrator:
    """Isotonic regression of the labels on the scores (ties pooled first)."""
    s, y = _check(scores, labels)
    knots, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    rate = np.bincount(inverse, weights=y) / counts  # positive rate per distinct score
    fitted = pool_adjacent_violators(rate, counts)
    return Calibrator("isotonic", tuple(knots.tolist()), tuple(fitted.tolist()))


def fit_platt(
    scores: npt.ArrayLike,
    labels: npt.ArrayLike,
    *,
    offset: npt.ArrayLike | None = None,
    steps: int = 100,
) -> Calibrator:
    """Platt scaling with smoothed targets, by Newton's method on (a, b).

    With ``offset`` (log-odds per score, e.g. each cell's rate before the model speaks) the fit
    is ``P(y) = sigmoid(offset + a * s + b)``: ``a * s + b`` is then the model's evidence, the
    log-likelihood ratio it adds to what was known without it, not a probability that already
    holds the population's rate.

    Shape:
        scores, labels, offset ``(n,)``.
    """
    s, y = _check(scores, labels)
    base = np.zeros_like(s) if offset is None else np.asarray(offset, dtype=np.float64).reshape(-1)
    if base.shape != s.shape:
        raise ValueError(f"need an offset per score: got {base.size} for {s.size}")
    n_pos, n_neg = y.sum(), y.size - y.sum()
    t = np.where(y > 0, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    x = np.stack([s, np.ones_like(s)], axis=1)  # (n, 2)
    theta = np.array([1.0, float(np.log((n_pos + 1) / (n_neg + 1)) - base.mean())])
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(x @ theta + base)))
        grad = x.T @ (p - t)
        hess = (x * (p * (1 - p))[:, None]).T @ x + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-10:
            break
    return Calibrator("platt", (float(theta[0]),), (float(theta[1]),))


# The most weight a model's prior may carry, whatever its scores: log-odds of a slope-6 Platt
# prior reach about +-3 at the ends of the score range (95%), one very reliable volunteer's vote,
# so the crowd can always overrule the model.
MAX_MODEL_WEIGHT = 6.0
# The cap of a model that has no held-out score (no frozen evaluation set): as one of mIoU 0.25.
UNSCORED_MODEL_WEIGHT = 1.0


def weight_cap(score: float | None) -> float:
    """The most pseudo-voter weight (Platt slope) a model with held-out ``score`` may carry.

    ``score`` is the model's mIoU on the frozen evaluation set, which it was never trained or
    calibrated on: the only honest measure of how well it generalises. The calibration itself
    is fitted on cells of control and complete targets, whose masks the model was trained on,
    so its slope says how well the model *fits*, not how well it predicts: measured on the
    demo, a segmenter trained for 4 steps reached mIoU 0.05-0.08 yet earned a slope of 8-14,
    i.e. a prior as sure as several volunteers agreeing. The cap reads the held-out mIoU as a
    voter that is right with probability ``q = (1 + mIoU) / 2`` (chance at mIoU 0, never wrong
    at 1) and allows twice that voter's log-odds weight, since a slope-``w`` prior spans about
    ``+-w / 2`` log-odds over the score range::

        cap = min(2 * log((1 + mIoU) / (1 - mIoU)), MAX_MODEL_WEIGHT)

    mIoU 0.1 gives 0.40, 0.3 gives 1.24, 0.5 gives 2.20, 0.6 gives 2.77, 0.8 gives 4.39, and
    never more than ``MAX_MODEL_WEIGHT`` (6); a model without a score gets
    ``UNSCORED_MODEL_WEIGHT`` (1).
    """
    if score is None or not np.isfinite(score):
        return UNSCORED_MODEL_WEIGHT
    m = float(np.clip(score, 0.0, 1.0))
    if m >= 1.0:
        return MAX_MODEL_WEIGHT
    return float(min(2.0 * np.log((1.0 + m) / (1.0 - m)), MAX_MODEL_WEIGHT))


def model_weight(calibrator: Calibrator, score: float | None) -> float:
    """The weight a model earns: its Platt slope, at most ``weight_cap(score)``, and 0 when the
    slope is not positive (a model whose score does not rise with the truth tells nothing)."""
    if calibrator.kind != "platt":
        raise ValueError(f"a model weight needs a Platt calibrator, got {calibrator.kind!r}")
    return float(np.clip(calibrator.x[0], 0.0, weight_cap(score)))


def with_slope(calibrator: Calibrator, weight: float) -> Calibrator:
    """A Platt calibrator scaled to slope ``weight``: log-odds ``(weight / a) * (a * s + b)``.

    Scaling slope and intercept together keeps the score at which the probability is 1/2
    (``-b / a``) and shrinks every log-odds toward 0 by the same factor; weight 0 is the
    uninformative prior (log-odds 0 everywhere).
    """
    if calibrator.kind != "platt":
        raise ValueError(f"only a Platt calibrator has a slope, got {calibrator.kind!r}")
    a, b = calibrator.x[0], calibrator.y[0]
    factor = weight / a if a > 0 else 0.0
    return Calibrator("platt", (a * factor,), (b * factor,))


CALIBRATORS: dict[str, Callable[[npt.ArrayLike, npt.ArrayLike], Calibrator]] = {
    "isotonic": fit_isotonic,
    "platt": fit_platt,
}


def get_calibrator_method(name: str) -> Callable[[npt.ArrayLike, npt.ArrayLike], Calibrator]:
    """Return the fitting function called ``name``; raise a helpful ``KeyError``."""
    try:
        return CALIBRATORS[name]
    except KeyError:
        raise KeyError(f"unknown calibrator {name!r}; known: {', '.join(CALIBRATORS)}") from None


def fit_calibrator(
    scores: npt.ArrayLike, labels: npt.ArrayLike, method: str = "isotonic"
) -> Calibrator:
    """Fit a calibrator from scores (e.g. mean CAM heat per cell) and 0/1 labels (cell shows
    the tag according to a complete mask).

    Shape:
        scores, labels ``(n,)`` (any shape, flattened).
    """
    return get_calibrator_method(method)(scores, labels)
