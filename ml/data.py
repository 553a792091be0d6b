"""Datasets over the plain inputs the app hands over, and simple augmentations.

- Tagger: a list of ``TaggerItem(image, labels)``: an image path and a multi-hot vector ``(T,)``.
- Segmenter: a list of ``SegmenterItem(image, masks, weights)``: an image path, the per-tag
  masks (an array ``(T, H, W)`` of probabilities, or one mask PNG path per tag, 8-bit
  probability, ``None`` for a tag not segmented in that image) and optional weight maps (same
  forms). Without weights, a soft mask's pixel weighs its confidence ``|2p - 1|`` (a pixel at
  0.5 carries nothing) and an unsegmented tag weighs 0 everywhere.

Images are squashed to a square ``size`` (not letterboxed), so predictions map back to the
image by a plain resize. Augmentations (flips, a small scaled crop, colour jitter) draw from
torch's global generator, which ``ml.train.seed_everything`` seeds (DataLoader workers get
derived seeds).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import Dataset

MaskSource = npt.NDArray[Any] | Sequence[Path | str | None]


@dataclass(frozen=True)
class TaggerItem:
    image: Path
    labels: npt.NDArray[Any]  # (T,) multi-hot


@dataclass(frozen=True)
class SegmenterItem:
    image: Path
    masks: MaskSource  # (T, H, W) in [0, 1], or T PNG paths (None: tag not segmented)
    weights: MaskSource | None = None  # same forms; None: confidence of the soft mask


def read_rgb(path: Path | str) -> Tensor:
    """Read an image as RGB floats in [0, 1]. Shape: returns ``(3, H, W)``."""
    with Image.open(path) as img:
        array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0


def resize(x: Tensor, size: int, *, smooth: bool = True) -> Tensor:
    """Resize ``(C, H, W)`` to ``(C, size, size)``: antialiased bilinear, or nearest."""
    if x.shape[-2:] == (size, size):
        return x
    if smooth:
        return F.interpolate(
            x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )[0]
    return F.interpolate(x[None], size=(size, size), mode="nearest")[0]


def load_image(path: Path | str, size: int) -> Tensor:
    """Read and resize one image for a model. Shape: returns ``(3, size, size)``."""
    return resize(read_rgb(path), size)


def load_images(paths: Sequence[Path | str], size: int) -> Tensor:
    """Stack of ``load_image``. Shape: returns ``(N, 3, size, size)``."""
    if not paths:
        return torch.zeros(0, 3, size, size)
    return torch.stack([load_image(p, size) for p in paths])


def _read_planes(source: MaskSource, n_tags: int, height: int, width: int) -> Tensor:
    """Per-tag planes ``(T, H, W)`` in [0, 1]; NaN marks a tag without a plane."""
    if isinstance(source, np.ndarray):
        planes = torch.from_numpy(np.asarray(source, dtype=np.float32).copy())
        if planes.shape != (n_tags, height, width):
            raise ValueError(f"masks must be ({n_tags}, {height}, {width}), got {planes.shape}")
        return planes
    if len(source) != n_tags:
        raise ValueError(f"need one mask path (or None) per tag: {n_tags}, got {len(source)}")
    out = torch.full((n_tags, height, width), float("nan"))
    for t, path in enumerate(source):
        if path is not None:
            with Image.open(path) as img:
                out[t] = torch.from_numpy(np.asarray(img.convert("L"), dtype=np.float32) / 255.0)
    return out


def confidence(soft_mask: Tensor) -> Tensor:
    """Weight of a soft mask's pixels: ``|2p - 1|`` (0 at p = 0.5, 1 at 0 or 1)."""
    return (2 * soft_mask - 1).abs()


def read_targets(item: SegmenterItem, n_tags: int, height: int, width: int) -> Tensor:
    """Masks and weights of one item, stacked. Shape: returns ``(2, T, H, W)``."""
    masks = _read_planes(item.masks, n_tags, height, width)
    missing = torch.isnan(masks)
    masks = torch.nan_to_num(masks, nan=0.0)
    if item.weights is None:
        weights = confidence(masks)
    else:
        weights = torch.nan_to_num(_read_planes(item.weights, n_tags, height, width), nan=0.0)
    weights = torch.where(missing, torch.zeros_like(weights), weights)
    return torch.stack([masks, weights])


@dataclass(frozen=True)
class Augment:
    """Augmentation strengths; ``Augment.none()`` disables everything."""

    flip: bool = True
    vflip: bool = False
    min_scale: float = 0.8  # side of the random crop, as a fraction of the image side
    jitter: float = 0.1  # brightness, contrast and saturation change, +-

    @staticmethod
    def none() -> Augment:
        return Augment(flip=False, vflip=False, min_scale=1.0, jitter=0.0)


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


def random_crop_box(height: int, width: int, min_scale: float) -> tuple[int, int, int, int]:
    """A random (top, left, h, w) box whose sides are ``min_scale``..1 of the image's."""
    scale = _uniform(min_scale, 1.0)
    h, w = max(1, round(height * scale)), max(1, round(width * scale))
    top = int(torch.randint(0, height - h + 1, ()))
    left = int(torch.randint(0, width - w + 1, ()))
    return top, left, h, w


def colour_jitter(image: Tensor, strength: float) -> Tensor:
    """Random brightness, contrast and saturation change. Shape: ``(3, H, W)``."""
    if strength <= 0:
        return image
    image = image * _uniform(1 - strength, 1 + strength)
    mean = image.mean()
    image = (image - mean) * _uniform(1 - strength, 1 + strength) + mean
    grey = image.mean(dim=0, keepdim=True)
    image = (image - grey) * _uniform(1 - strength, 1 + strength) + grey
    return image.clamp(0, 1)


def augment_pair(
    image: Tensor, targets: Tensor | None, aug: Augment
) -> tuple[Tensor, Tensor | None]:
    """Apply the same flips and crop to an image ``(3, H, W)`` and its targets ``(..., H, W)``."""
    if aug.min_scale < 1.0:
        top, left, h, w = random_crop_box(image.shape[-2], image.shape[-1], aug.min_scale)
        image = image[..., top : top + h, left : left + w]
        targets = None if targets is None else targets[..., top : top + h, left : left + w]
    for enabled, dim in ((aug.flip, -1), (aug.vflip, -2)):
        if enabled and bool(torch.rand(()) < 0.5):
            image = image.flip(dim)
            targets = None if targets is None else targets.flip(dim)
    return colour_jitter(image, aug.jitter), targets


class TaggerDataset(Dataset[tuple[Tensor, Tensor]]):
    """Images and multi-hot labels: ``(3, S, S)`` floats in [0, 1], ``(T,)`` floats."""

    def __init__(self, items: Sequence[TaggerItem], size: int, augment: Augment | None = None):
        self.items, self.size, self.augment = list(items), size, augment or Augment.none()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        item = self.items[index]
        image, _ = augment_pair(read_rgb(item.image), None, self.augment)
        return resize(image, self.size), torch.as_tensor(item.labels, dtype=torch.float32)


class SegmenterDataset(Dataset[tuple[Tensor, Tensor, Tensor]]):
    """Images, masks and weights: ``(3, S, S)``, ``(T, S, S)``, ``(T, S, S)``.

    Masks are resized bilinearly (a soft target on the resized boundary), weights likewise.
    """

    def __init__(
        self,
        items: Sequence[SegmenterItem],
        n_tags: int,
        size: int,
        augment: Augment | None = None,
    ):
        self.items, self.n_tags, self.size = list(items), n_tags, size
        self.augment = augment or Augment.none()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        item = self.items[index]
        image = read_rgb(item.image)
        targets = read_targets(item, self.n_tags, image.shape[-2], image.shape[-1])
        image, moved = augment_pair(image, targets, self.augment)
        planes = targets if moved is None else moved  # (2, T, h, w)
        t = resize(planes.flatten(0, 1), self.size).view(2, self.n_tags, self.size, self.size)
        return resize(image, self.size), t[0], t[1]
