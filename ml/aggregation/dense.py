"""Dense consensus: fuse several annotators' full masks of one object.

Three methods (``fuse_masks(method=...)``):

* ``consensus`` (default): what real crowds get wrong is spatial, so it is modelled spatially.
  (1) Annotators whose masks overlap (IoU >= ``OUTLIER_IOU``) are linked; when the largest
  linked group is a strict majority, whoever is outside it drew another object (or nothing)
  and is set aside (``outliers``).
  (2) The remaining masks vote per pixel, and where they disagree the vote share is smoothed
  over about a pixel (``SMOOTH_PX``), so that one click's jitter does not leave a jagged border
  (pixels all agree on keep their vote: a thin part everyone drew is not smoothed away).
  (3) The share becomes a posterior through a one-coin model fitted by EM to the *disputed*
  pixels only (where annotators disagree): each annotator is right there with probability
  ``a``, so ``n`` of ``k`` votes give log-odds ``(2n - k) logit(a)``; pixels nobody disputes
  get ``AGREED_LOGODDS``. Pixels where everyone agrees say nothing about how often people err
  at a border, and counting them (as STAPLE does) makes the posterior overconfident and lets two
  "yes" votes outweigh three "no" votes. (4) Given the image, the border is redrawn from it:
  GrabCut (``cv2.grabCut``) decides only the band the crowd left open (disputed pixels and a
  few pixels either side of the consensus border); pixels the crowd agreed on stay fixed.
  Without an image the hard mask is the smoothed majority, never a model's guess.
* ``majority_vote``: a pixel is in when more than half of the annotators say so.
* ``staple``: binary STAPLE (Warfield, Zou & Wells 2004), the two-coin Dawid-Skene model with
  pixels as items (:func:`ml.aggregation.dawid_skene.dawid_skene`), one sensitivity and
  specificity per annotator over the whole mask. Kept for comparison: on real crowds it does not
  beat a majority vote (it cannot tell a sloppy border from a wrong object).

``calibration_on_disputed`` measures what a curator relies on: the expected calibration error
of the posterior on the pixels where annotators disagree (``tessera aggregate --truth`` prints
it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ml.aggregation.calibration import expected_calibration_error
from ml.aggregation.dawid_skene import DEFAULT_CONFIG, DawidSkeneConfig, dawid_skene
from ml.aggregation.votes import FloatArray, Votes, logit

DENSE_METHODS = ("consensus", "majority_vote", "staple")
OUTLIER_IOU = 0.3  # masks that overlap less than this (IoU) are not of the same object
SMOOTH_PX = 1.0  # Gaussian sigma of the vote share's smoothing, in pixels
BAND_PX = 6  # GrabCut may move the border this far (and over every disputed pixel)
SURE = 0.97  # posterior beyond which (and outside the band) a pixel is fixed for GrabCut
IMAGE_CONFIDENCE = (
    0.9  # posterior of a pixel in the band: GrabCut's accuracy there on simulated photographs
)
GRABCUT_ITERATIONS = 1  # fit colours to what the crowd decided, cut once (2, 4: same IoU, slower)
DEFAULT_ACCURACY = 0.8  # an annotator's accuracy on disputed pixels, when it cannot be fitted
AGREED_LOGODDS = 9.0  # a pixel no annotator disputes, nor any within a few pixels (p ~ 1e-4)


@dataclass(frozen=True)
class DenseConsensus:
    """Fused mask and annotator performance.

    Shape:
        soft: ``(H, W)`` float32 posterior; hard: ``(H, W)`` bool;
        sensitivity, specificity, used: ``(n_annotators,)`` (``used`` False for an annotator set
        aside as having drawn another object).
    """

    soft: npt.NDArray[np.float32]
    hard: npt.NDArray[np.bool_]
    sensitivity: FloatArray
    specificity: FloatArray
    iterations: int
    converged: bool
    used: npt.NDArray[np.bool_]
    method: str = "consensus"
    image_used: bool = False


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
    image: npt.ArrayLike | None = None,
    method: str = "consensus",
    config: DawidSkeneConfig = DEFAULT_CONFIG,
) -> DenseConsensus:
    """Fuse annotators' binary masks of one object.

    Args:
        masks: each annotator's mask of the same object.
        prior: optional per-pixel prior probability (e.g. a model's soft mask); it enters as
            log-odds added to the crowd's.
        image: optional ``(H, W, 3)`` uint8 RGB image (``consensus`` only) to redraw the border
            the crowd left open from.
        method: one of ``DENSE_METHODS``.
        config: EM priors and stopping rule (``staple``).

    Shape:
        masks: ``(n_annotators, H, W)``; prior: ``(H, W)``; image: ``(H, W, 3)``.
    """
    m = np.asarray(masks)
    if m.ndim != 3 or m.shape[0] < 1:
        raise ValueError(f"masks must be 3-D (annotators, height, width), got shape {m.shape}")
    m = m.astype(bool, copy=False)
    h, w = m.shape[1:]
    prior_lo = None
    if prior is not None:
        p = np.asarray(prior, dtype=np.float64)
        if p.shape != (h, w):
            raise ValueError(f"prior must have shape ({h}, {w}), got {p.shape}")
        prior_lo = logit(p)
    img = None
    if image is not None:
        img = np.asarray(image)
        if img.shape != (h, w, 3) or img.dtype != np.uint8:
            raise ValueError(
                f"image must be ({h}, {w}, 3) uint8 like the masks, got {img.shape} {img.dtype}"
            )
    if method == "staple":
        return _staple(m, prior_lo, config)
    if method == "majority_vote":
        if prior_lo is not None or img is not None:
            raise ValueError("majority_vote takes neither a prior nor an image")
        share = m.mean(axis=0)  # the vote share is its soft mask, as crowd-kit's
        return _finish(m, share, np.ones(len(m), bool), 0, True, "majority_vote", share > 0.5)
    if method != "consensus":
        raise ValueError(f"method {method!r} is unknown; use one of {', '.join(DENSE_METHODS)}")
    return _consensus(m, prior_lo, img)


def _staple(m: np.ndarray, prior_lo: FloatArray | None, config: DawidSkeneConfig) -> DenseConsensus:
    h, w = m.shape[1:]
    votes = masks_to_votes(m)
    result = dawid_skene(
        votes, prior_logodds=None if prior_lo is None else prior_lo.reshape(-1), config=config
    )
    soft = result.posterior.reshape(h, w).astype(np.float32)
    return DenseConsensus(
        soft=soft,
        hard=soft >= 0.5,
        sensitivity=result.sensitivity,
        specificity=result.specificity,
        iterations=result.iterations,
        converged=result.converged,
        used=np.ones(len(m), bool),
        method="staple",
    )


def _finish(
    m: np.ndarray,
    soft: npt.ArrayLike,
    used: npt.NDArray[np.bool_],
    iterations: int,
    converged: bool,
    method: str,
    hard: npt.NDArray[np.bool_] | None = None,
    image_used: bool = False,
) -> DenseConsensus:
    s = np.asarray(soft, dtype=np.float32)
    if hard is None:
        hard = s > 0.5  # more than half: a tie is not enough
    pos, neg = max(1, int(hard.sum())), max(1, int((~hard).sum()))
    flat = m.reshape(len(m), -1)
    hf = hard.reshape(-1)
    sens = (flat & hf).sum(axis=1) / pos
    spec = (~flat & ~hf).sum(axis=1) / neg
    return DenseConsensus(
        s,
        hard,
        sens.astype(np.float64),
        spec.astype(np.float64),
        iterations,
        converged,
        used,
        method,
        image_used,
    )


def outliers(masks: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """Annotators who drew another object (or nothing).

    Annotators are linked when their masks overlap by at least ``OUTLIER_IOU`` (IoU); when the
    largest group of linked annotators holds a strict majority of the crowd, everyone outside it
    is set aside. Otherwise (two camps, or nobody agreeing) nobody is: the crowd is left to vote.

    Shape:
        masks: ``(k, H, W)`` bool; returns ``(k,)`` bool, True = set aside.
    """
    k = len(masks)
    flat = masks.reshape(k, -1)
    area = flat.sum(axis=1).astype(np.float64)
    inter = (flat.astype(np.float32) @ flat.T.astype(np.float32)).astype(np.float64)
    union = area[:, None] + area[None, :] - inter
    linked = np.where(union > 0, inter / np.maximum(union, 1.0), 0.0) >= OUTLIER_IOU
    linked |= np.eye(k, dtype=bool)  # an empty mask is its own group
    group = np.arange(k)  # connected components by repeated relabelling (k is small)
    for _ in range(k):
        group = np.array([group[linked[j]].min() for j in range(k)])
    sizes = np.bincount(group, minlength=k)
    main = int(np.argmax(sizes))
    if sizes[main] * 2 <= k:
        return np.zeros(k, bool)
    return group != main


def one_coin_accuracy(
    counts: npt.NDArray[np.float64], k: int, iterations: int = 100
) -> tuple[float, int, bool]:
    """EM for the accuracy ``a`` of a symmetric one-coin crowd from how many pixels got ``n``
    yes votes of ``k`` (disputed pixels only: ``counts[0]`` and ``counts[k]`` are ignored).

    Returns ``(a, iterations, converged)``; ``a`` lies in [0.51, 0.999]. With fewer than four
    annotators the disputed counts cannot tell ``a`` (with three, one and two yes votes are
    equally likely for any ``a``): ``DEFAULT_ACCURACY`` is returned.
    """
    if k < 4:
        return DEFAULT_ACCURACY, 0, True
    n = np.arange(k + 1, dtype=np.float64)
    hist = counts.astype(np.float64).copy()
    hist[0] = hist[k] = 0.0
    total = hist.sum()
    if total <= 0:
        return 0.999, 0, True
    a, pi = 0.8, 0.5
    for it in range(1, iterations + 1):
        l1 = np.log(pi) + n * np.log(a) + (k - n) * np.log1p(-a)
        l0 = np.log1p(-pi) + n * np.log1p(-a) + (k - n) * np.log(a)
        r = 1.0 / (1.0 + np.exp(l0 - l1))
        agree = float((hist * (r * n + (1 - r) * (k - n))).sum())
        a_new = float(np.clip(agree / (total * k), 0.51, 0.999))
        pi = float(np.clip((hist * r).sum() / total, 0.05, 0.95))
        if abs(a_new - a) < 1e-7:
            return a_new, it, True
        a = a_new
    return a, iterations, False


def _consensus(
    m: npt.NDArray[np.bool_], prior_lo: FloatArray | None, image: npt.NDArray[Any] | None
) -> DenseConsensus:
    set_aside = outliers(m)
    used = ~set_aside
    kept = m[used]
    k = len(kept)
    share = kept.mean(axis=0, dtype=np.float32)
    if SMOOTH_PX > 0:  # only where they disagree: a corner or a thin part all drew stays whole
        agreed = (share <= 0.0) | (share >= 1.0)
        share = np.where(agreed, share, gaussian_blur(share, SMOOTH_PX))
    # The accuracy is fitted on every annotator's votes (one set aside too), so that it
    # describes the crowd as it drew; the share counts the others only.
    counts = np.bincount(m.sum(axis=0).reshape(-1), minlength=len(m) + 1).astype(np.float64)
    a, iterations, converged = one_coin_accuracy(counts, len(m))
    lo = (2.0 * share.astype(np.float64) - 1.0) * k * float(np.log(a / (1.0 - a)))
    # Where nobody disagrees the crowd is sure: the one-coin accuracy describes disputed
    # pixels, not the background everyone left out.
    lo[share <= 0.0] = -AGREED_LOGODDS
    lo[share >= 1.0] = AGREED_LOGODDS
    if prior_lo is not None:
        lo = lo + prior_lo
    soft = 1.0 / (1.0 + np.exp(-lo))
    image_used = False
    if image is not None:
        soft, image_used = _redraw_from_image(image, soft, kept)
    return _finish(m, soft, used, iterations, converged, "consensus", image_used=image_used)


def gaussian_blur(a: npt.NDArray[np.float32], sigma: float) -> npt.NDArray[np.float32]:
    """Separable Gaussian blur (radius 4 sigma, edges mirrored as OpenCV's default), in numpy
    so that fusing masks without an image never loads OpenCV (about 40 ms of a CLI call)."""
    r = max(1, int(np.ceil(4 * sigma)))
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k /= k.sum()
    out = np.asarray(a, dtype=np.float32)
    for axis in (0, 1):
        if out.shape[axis] < 2:
            continue
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r, r)
        p = np.pad(out, pad, mode="reflect")
        acc = np.zeros(out.shape, dtype=np.float64)
        n = out.shape[axis]
        for i, w in enumerate(k):
            acc += w * (p[i : i + n] if axis == 0 else p[:, i : i + n])
        out = acc.astype(np.float32)
    return out


def _signed_distance(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.float32]:
    import cv2

    u = mask.astype(np.uint8)
    inside = cv2.distanceTransform(u, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    outside = cv2.distanceTransform(1 - u, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return np.asarray(inside - outside, dtype=np.float32)


def _redraw_from_image(
    image: npt.NDArray[Any], soft: FloatArray, kept: npt.NDArray[np.bool_]
) -> tuple[FloatArray, bool]:
    """GrabCut on the band the crowd left open; the crowd's sure pixels stay fixed."""
    import cv2  # loaded only with an image

    hard = soft > 0.5
    if not hard.any() or hard.all():
        return soft, False
    h, w = hard.shape
    sd = _signed_distance(hard)
    depth = float(sd.max())
    disputed = kept.any(axis=0) & ~kept.all(axis=0)
    free = disputed | ((soft > 1 - SURE) & (soft < SURE)) | (np.abs(sd) <= BAND_PX)
    fixed_in = hard & ~free & (sd > min(BAND_PX, 0.5 * depth))
    ys, xs = np.nonzero(free | fixed_in)
    size = float(np.sqrt(hard.sum()))
    margin = int(max(16, 0.25 * size))
    y0, y1 = max(0, ys.min() - margin), min(h, ys.max() + margin + 1)
    x0, x1 = max(0, xs.min() - margin), min(w, xs.max() + margin + 1)
    crop = (slice(y0, y1), slice(x0, x1))
    gc = np.full((y1 - y0, x1 - x0), cv2.GC_BGD, np.uint8)
    f, hc = free[crop], hard[crop]
    gc[f & hc] = cv2.GC_PR_FGD
    gc[f & ~hc] = cv2.GC_PR_BGD
    gc[~f & hc] = cv2.GC_FGD
    if not (gc & 1).any() or (gc & 1).all() or not f.any():
        return soft, False
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    bgr = np.ascontiguousarray(image[crop][..., ::-1])
    cv2.setRNGSeed(0)  # GrabCut's colour models start from k-means: the same mask every time
    try:
        cv2.grabCut(bgr, gc, (0, 0, 0, 0), bgd, fgd, GRABCUT_ITERATIONS, cv2.GC_INIT_WITH_MASK)
    except cv2.error:  # too few pixels of one side to fit a colour model
        return soft, False
    fg = (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)
    # In the band, the image decides; its pixels are as sure as GrabCut is there (measured on
    # simulated photographs), or as the crowd where the crowd is surer and agrees.
    out = np.array(soft, dtype=np.float64, copy=True)
    sub = out[crop]
    sub[f & fg] = np.maximum(sub[f & fg], IMAGE_CONFIDENCE)
    sub[f & ~fg] = np.minimum(sub[f & ~fg], 1.0 - IMAGE_CONFIDENCE)
    return out, True


def calibration_on_disputed(
    soft: npt.ArrayLike, masks: npt.ArrayLike, truth: npt.ArrayLike, n_bins: int = 10
) -> tuple[float, int]:
    """ECE of ``soft`` on the pixels where the annotators disagree, and how many there are.

    Shape:
        soft, truth: ``(H, W)``; masks: ``(k, H, W)``.
    """
    m = np.asarray(masks, dtype=bool)
    disputed = m.any(axis=0) & ~m.all(axis=0)
    n = int(disputed.sum())
    if n == 0:
        return 0.0, 0
    p = np.asarray(soft, dtype=np.float64)[disputed]
    t = np.asarray(truth, dtype=bool)[disputed]
    return float(expected_calibration_error(p, t, n_bins=n_bins)), n


def mask_iou(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """Intersection over union of two masks; two empty masks agree fully (1.0)."""
    x, y = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    union = int(np.logical_or(x, y).sum())
    return 1.0 if union == 0 else int(np.logical_and(x, y).sum()) / union
