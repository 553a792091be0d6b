"""Class-activation maps of the tagger, per (image, tag), and their reduction to cell priors.

Grad-CAM (Selvaraju et al. 2017) comes from the maintained ``grad-cam`` package
(``pytorch_grad_cam``), whose ``BaseCAM`` is the template method this project follows: each
variant overrides only how the feature channels are weighted. ``CAM_METHODS`` names the variants
we expose (``gradcam``, ``gradcam++``, ``hirescam``); the target layer is the tagger's last
feature map (``Tagger.features``).

Heatmaps are in ``[0, 1]``, min-max normalised per (image, tag) by ``pytorch_grad_cam``, so a
heatmap says *where* relative to the image, not *how sure*: ``cell_heat`` reduces it to the
level-1 3x3 grid (``mean`` of the heat over each cell, via ``ml.aggregation.grid.level_coverage``,
the default; or ``max``), and a ``Calibrator`` fitted on complete masks (``fit_cam_calibrator``)
turns that cell heat into a probability whose log-odds is the cell's prior (``cell_prior``):
Platt scaling while there are few cells, isotonic regression once there are many.
Without a calibrator the heat is clipped to ``[0.05, 0.95]`` and read as a probability.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import Tensor
from torch.nn import functional as F

from ml.aggregation.grid import cells_per_side, edges, frame_side, level_coverage
from ml.calibration import Calibrator, fit_calibrator
from ml.tagger import Tagger

FloatArray = npt.NDArray[np.float64]
CAM_METHODS: dict[str, type[BaseCAM]] = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "hirescam": HiResCAM,
}
UNCALIBRATED_CLIP = 0.05
ISOTONIC_MIN_CELLS = 2000


def get_cam_method(name: str) -> type[BaseCAM]:
    """Return the CAM class called ``name``; raise a helpful ``KeyError``."""
    try:
        return CAM_METHODS[name]
    except KeyError:
        raise KeyError(f"unknown CAM method {name!r}; known: {', '.join(CAM_METHODS)}") from None


def tag_cams(
    model: Tagger,
    images: Tensor,
    tag_indices: Sequence[Sequence[int]],
    *,
    method: str = "gradcam",
    batch_size: int = 16,
) -> list[npt.NDArray[np.float32]]:
    """Heatmaps per (image, tag) at the model's input resolution.

    The (image, tag) pairs are flattened and run ``batch_size`` pairs per forward/backward.

    Args:
        model: the tagger.
        images: ``(N, 3, S, S)`` floats in [0, 1].
        tag_indices: for each image, the tag columns to explain (e.g. its predicted tags).
        method: a key of ``CAM_METHODS``.

    Returns:
        For each image, ``(K_i, S, S)`` float32 in [0, 1] (``K_i = len(tag_indices[i])``).
    """
    if len(tag_indices) != images.shape[0]:
        raise ValueError(f"need tag indices for each of the {images.shape[0]} images")
    pairs = [(i, t) for i, tags in enumerate(tag_indices) for t in tags]
    size = images.shape[-2:]
    heat = np.zeros((len(pairs), *size), dtype=np.float32)
    device = next(model.parameters()).device
    was_training = model.training
    with get_cam_method(method)(model=model, target_layers=[model.features]) as cam:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            x = images[[i for i, _ in chunk]].to(device)
            targets = [ClassifierOutputTarget(t) for _, t in chunk]
            heat[start : start + len(chunk)] = cam(input_tensor=x, targets=targets)
    model.train(was_training)
    splits = np.cumsum([len(tags) for tags in tag_indices])[:-1]
    return [np.clip(h, 0.0, 1.0) for h in np.split(heat, splits)]


def to_image_size(heatmaps: npt.ArrayLike, height: int, width: int) -> npt.NDArray[np.float32]:
    """Resize heatmaps from the model's square input back to the image (bilinear).

    Shape:
        heatmaps ``(K, S, S)``; returns ``(K, height, width)`` in [0, 1].
    """
    h = torch.as_tensor(np.asarray(heatmaps, dtype=np.float32))[None]  # (1, K, S, S)
    out = F.interpolate(h, size=(height, width), mode="bilinear", align_corners=False)[0]
    return out.clamp(0, 1).numpy()


def cell_heat(
    heatmap: npt.ArrayLike, *, level: int = 1, reduce: str = "mean", square: bool = False
) -> FloatArray:
    """Reduce one heatmap to its grid cells: ``mean`` (default) or ``max`` over each cell
    (``square``: the pyramid's frame, ``ml.aggregation.grid``; an empty cell is 0).

    Shape:
        heatmap ``(H, W)``; returns ``(3**level, 3**level)``.
    """
    if reduce == "mean":
        return level_coverage(heatmap, level, square=square)
    if reduce != "max":
        raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")
    h = np.asarray(heatmap, dtype=np.float64)
    fh, fw = frame_side(h.shape[0], h.shape[1], square=square)
    ry, rx = edges(level, h.shape[0], side=fh), edges(level, h.shape[1], side=fw)
    n = cells_per_side(level)
    out = np.zeros((n, n))
    for r in range(n):
        for c in range(n):
            block = h[ry[r] : ry[r + 1], rx[c] : rx[c + 1]]
            out[r, c] = block.max() if block.size else 0.0
    return out


def cell_prior(
    heatmap: npt.ArrayLike,
    calibrator: Calibrator | None = None,
    *,
    level: int = 1,
    reduce: str = "mean",
    square: bool = False,
) -> FloatArray:
    """Prior log-odds per cell that the cell shows the tag.

    Shape:
        heatmap ``(H, W)`` at the image resolution; returns ``(3**level, 3**level)``.
    """
    heat = cell_heat(heatmap, level=level, reduce=reduce, square=square)
    return heat_log_odds(heat, calibrator)


def heat_log_odds(heat: npt.ArrayLike, calibrator: Calibrator | None = None) -> FloatArray:
    """Log-odds of cell heat: calibrated, or the heat clipped and read as a probability."""
    if calibrator is not None:
        return calibrator.log_odds(heat)
    p = np.clip(np.asarray(heat, dtype=np.float64), UNCALIBRATED_CLIP, 1 - UNCALIBRATED_CLIP)
    return np.log(p) - np.log1p(-p)


def calibration_method(n_cells: int) -> str:
    """Isotonic regression once there are enough cells to support its steps, Platt before.

    With a few hundred cells isotonic regression pools most of them into one or two steps, which
    flattens the prior of every cell of a target to the same value; Platt's two parameters keep
    the heatmap's ranking and still say how far to trust it (a slope near zero: not much).
    """
    return "isotonic" if n_cells >= ISOTONIC_MIN_CELLS else "platt"


def fit_cam_calibrator(
    heatmaps: Sequence[npt.ArrayLike],
    masks: Sequence[npt.ArrayLike],
    *,
    level: int = 1,
    reduce: str = "mean",
    min_coverage: float = 0.0,
    method: str | None = None,
    square: bool = False,
) -> Calibrator:
    """Fit the cell-heat -> probability map on complete masks.

    A cell is positive when the mask covers more than ``min_coverage`` of it. ``method`` is a
    key of ``ml.calibration.CALIBRATORS``; None picks one by the number of cells
    (``calibration_method``).

    Args:
        heatmaps, masks: pairs of ``(H, W)`` arrays at the image resolution (one per target).
    """
    heat = [cell_heat(h, level=level, reduce=reduce, square=square).ravel() for h in heatmaps]
    label = [(level_coverage(m, level, square=square) > min_coverage).ravel() for m in masks]
    scores = np.concatenate(heat)
    return fit_calibrator(scores, np.concatenate(label), method or calibration_method(scores.size))
