"""The segmenter: a segmentation-models-pytorch network with one output channel per tag.

``SegmenterConfig`` (frozen) chooses the architecture (any ``smp.create_model`` name: Unet,
FPN, DeepLabV3Plus, ...) and the encoder; ``build_segmenter`` never downloads weights
(``encoder_weights=None``). Inputs are RGB floats in ``[0, 1]``, normalised inside the model;
outputs are per-tag logits at the input resolution.

The loss is BCE + Dice, both weighted per pixel by a weight map (mask confidence): uncertain
pixels carry little or no weight, a tag not segmented in an image carries none.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import numpy.typing as npt
import segmentation_models_pytorch as smp
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ml.metrics import boundary_f1, intersection_union, iou_per_tag, mean_iou
from ml.tagger import Normalize


@dataclass(frozen=True)
class SegmenterConfig:
    """What rebuilds a segmenter.

    Attributes:
        tags: tag names, one output channel each, in order.
        arch: smp architecture name (``Unet``, ``FPN``, ``DeepLabV3Plus``, ...).
        encoder: smp encoder name (``resnet18``, ``resnet34``, ``mobilenet_v2``, timm ``tu-*``).
        encoder_depth: encoder stages (3 to 5); Unet needs as many ``decoder_channels``.
        decoder_channels: Unet/Unet++ decoder widths, one per stage (ignored by other archs).
        input_size: side of the square input in pixels (a multiple of ``2**encoder_depth``).
    """

    tags: tuple[str, ...]
    arch: str = "Unet"
    encoder: str = "resnet18"
    encoder_depth: int = 5
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)
    input_size: int = 512

    @property
    def n_tags(self) -> int:
        return len(self.tags)

    def differences(self, other: SegmenterConfig) -> list[str]:
        """The names of the fields in which ``other`` differs; empty when a model of one config
        takes the other's weights as they are."""
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]


class Segmenter(nn.Module):
    """Normalisation + smp network. Shape: ``(B, 3, S, S)`` -> logits ``(B, T, S, S)``."""

    def __init__(self, config: SegmenterConfig) -> None:
        super().__init__()
        kwargs: dict[str, object] = {
            "encoder_name": config.encoder,
            "encoder_weights": None,
            "encoder_depth": config.encoder_depth,
            "in_channels": 3,
            "classes": config.n_tags,
        }
        if config.arch.lower() in {"unet", "unetplusplus"}:
            kwargs["decoder_channels"] = tuple(config.decoder_channels[: config.encoder_depth])
        self.config = config
        self.normalize = Normalize()
        self.net = smp.create_model(config.arch, **kwargs)

    def forward(self, images: Tensor) -> Tensor:
        return self.net(self.normalize(images))


def build_segmenter(config: SegmenterConfig) -> Segmenter:
    """Build an untrained segmenter (random weights, nothing downloaded)."""
    if config.input_size % (2**config.encoder_depth):
        raise ValueError(
            f"input_size {config.input_size} must be a multiple of 2**encoder_depth "
            f"({2**config.encoder_depth}); pick e.g. {2**config.encoder_depth * 8}"
        )
    return Segmenter(config)


def weighted_bce_dice(
    logits: Tensor, masks: Tensor, weights: Tensor, *, dice_weight: float = 1.0
) -> Tensor:
    """BCE + Dice, each pixel weighted by ``weights``.

    Shape:
        logits, masks, weights ``(B, T, H, W)``; masks and weights in [0, 1].

    Returns:
        BCE averaged over the total weight, plus ``dice_weight`` times the soft Dice loss
        averaged over the (image, tag) planes whose weighted truth is not empty (Dice of an
        empty plane only says "predict nothing", which BCE already says, and it is unstable).
    """
    logits, masks, weights = logits.float(), masks.float(), weights.float()
    bce = F.binary_cross_entropy_with_logits(logits, masks, reduction="none")  # (B, T, H, W)
    bce = (bce * weights).sum() / weights.sum().clamp(min=1.0)
    p = torch.sigmoid(logits)
    inter = (weights * p * masks).sum(dim=(2, 3))  # (B, T)
    total = (weights * (p + masks)).sum(dim=(2, 3))
    dice = 1 - (2 * inter + 1.0) / (total + 1.0)
    planes = (weights * masks).sum(dim=(2, 3)) > 0  # (B, T); as smp: Dice skips empty truths
    dice_loss = (dice * planes).sum() / planes.sum().clamp(min=1)
    return bce + dice_weight * dice_loss


def predict_masks(model: Segmenter, images: Tensor, *, batch_size: int = 8) -> Tensor:
    """Per-tag probabilities, batched, under ``torch.inference_mode()``.

    Shape:
        images ``(N, 3, S, S)`` in [0, 1]; returns ``(N, T, S, S)`` float32 on the CPU.
    """
    device = next(model.parameters()).device
    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size].to(device)
            out.append(torch.sigmoid(model(x)).float().cpu())
    if not out:
        return torch.zeros(0, model.config.n_tags, *images.shape[-2:])
    return torch.cat(out)


@dataclass(frozen=True)
class SegmentationScores:
    """IoU per tag (NaN where neither prediction nor truth has the tag), mIoU, boundary F1."""

    iou: npt.NDArray[np.float64]  # (T,)
    miou: float
    boundary_f1: npt.NDArray[np.float64]  # (T,) mean over planes where the truth has the tag
    mean_boundary_f1: float


class SegmentationMeter:
    """Accumulates IoU counts and boundary F1 over batches of a split.

    Only pixels with weight > 0 count for IoU; boundary F1 is taken on the (image, tag) planes
    whose truth is non-empty and fully weighted (a partial mask has no reliable boundary).
    """

    def __init__(self, n_tags: int, *, tolerance: int = 2) -> None:
        self.inter = np.zeros(n_tags)
        self.union = np.zeros(n_tags)
        self.bf: list[list[float]] = [[] for _ in range(n_tags)]
        self.tolerance = tolerance

    def update(self, probabilities: Tensor, masks: Tensor, weights: Tensor) -> None:
        """Shape: each ``(B, T, H, W)``."""
        pred = (probabilities > 0.5).cpu().numpy()
        truth = (masks > 0.5).cpu().numpy()
        valid = (weights > 0).cpu().numpy()
        inter, union = intersection_union(pred, truth, valid)
        self.inter += inter
        self.union += union
        for i, t in zip(*np.nonzero(truth.any(axis=(2, 3)) & valid.all(axis=(2, 3))), strict=True):
            self.bf[t].append(boundary_f1(pred[i, t], truth[i, t], tolerance=self.tolerance))

    def scores(self) -> SegmentationScores:
        iou = iou_per_tag(self.inter, self.union)
        bf = np.array([np.mean(v) if v else np.nan for v in self.bf], dtype=np.float64)
        mean_bf = float(np.nanmean(bf)) if np.any(~np.isnan(bf)) else float("nan")
        return SegmentationScores(iou, mean_iou(iou), bf, mean_bf)
