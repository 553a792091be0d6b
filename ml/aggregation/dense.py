"""Dense consensus: fuse several annotators' full masks of one object (STAPLE-like).

Reference: Warfield, Zou & Wells (2004), "Simultaneous truth and performance level estimation
(STAPLE)". Binary STAPLE is the two-coin Dawid-Skene model with pixels as items and annotators
as workers, so this module reuses :func:`ml.aggregation.dawid_skene.dawid_skene` on the masks in
COO layout. Assumptions: pixels are independent given the truth (no spatial smoothing, unlike
some STAPLE variants); each annotator has one sensitivity and specificity over the whole mask;
an optional per-pixel prior probability enters as log-odds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ml.aggregation.dawid_skene import DEFAULT_CONFIG, DawidSkeneConfig, dawid_skene
from ml.aggregation.votes import FloatArray, Votes, logit


@dataclass(frozen=True)
class DenseConsensus:
    """Fused mask and annotator performance.

    Shape:
        soft: ``(H, W)`` float32 posterior; hard: ``(H, W)`` bool;
        sensitivity, specificity: ``(n_annotators,)``.
    """

    soft: npt.NDArray[np.float32]
    hard: npt.NDArray[np.bool_]
    sensitivity: FloatArray
    specificity: FloatArray
    iterations: int
    converged: bool


def masks_to_votes(masks: npt.ArrayLike) -> Votes:
    """One vote per annotator and pixel.

    Shape:
        masks: ``(n_annotators, H, W)`` bool; votes ``n_annotators * H * W``.
    """
    m = np.asarray(masks)
    if m.ndim != 3:
        raise ValueError(f"masks must be 3-D (annotators, height, width), got shape {m.shape}")
    r, n = m.shape[0], m.shape[1] * m.shape[2]
    worker = np.repeat(np.arange(r, dtype=np.int32), n)
    item = np.tile(np.arange(n, dtype=np.int32), r)
    label = m.reshape(-1).astype(np.int8)
    return Votes(worker=worker, item=item, label=label, n_workers=r, n_items=n)


def fuse_masks(
    masks: npt.ArrayLike,
    *,
    prior: npt.ArrayLike | None = None,
    config: DawidSkeneConfig = DEFAULT_CONFIG,
) -> DenseConsensus:
    """STAPLE-like fusion of annotators' binary masks.

    Args:
        masks: each annotator's mask of the same object.
        prior: optional per-pixel prior probability (e.g. a model's soft mask).
        config: EM priors and stopping rule.

    Shape:
        masks: ``(n_annotators, H, W)``; prior: ``(H, W)``.
    """
    m = np.asarray(masks)
    votes = masks_to_votes(m)
    h, w = m.shape[1], m.shape[2]
    prior_lo = None
    if prior is not None:
        p = np.asarray(prior, dtype=np.float64)
        if p.shape != (h, w):
            raise ValueError(f"prior must have shape ({h}, {w}), got {p.shape}")
        prior_lo = logit(p).reshape(-1)
    result = dawid_skene(votes, prior_logodds=prior_lo, config=config)
    soft = result.posterior.reshape(h, w).astype(np.float32)
    return DenseConsensus(
        soft=soft,
        hard=soft >= 0.5,
        sensitivity=result.sensitivity,
        specificity=result.specificity,
        iterations=result.iterations,
        converged=result.converged,
    )
