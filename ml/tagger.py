"""The multi-label tagger: a timm backbone, its pooled embedding and a linear head per tag.

``build_tagger(config)`` never downloads weights (``pretrained=False``); fine-tuning from
ImageNet weights means loading a local checkpoint. Inputs are RGB floats in ``[0, 1]`` of shape
``(B, 3, S, S)``; the model normalises them itself (ImageNet mean and std), so the app, the ONNX
export and the tests all feed the same tensors. Outputs are logits; ``sigmoid`` gives one
independent probability per tag.

``Tagger.features`` is the module whose output is the last feature map (what Grad-CAM weighs);
``config.output_stride`` (8, 16 or 32, where the backbone supports dilation) trades compute for a
finer CAM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import timm
import torch
from torch import Tensor, nn

from ml.hierarchy import close_hierarchy, close_probabilities

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TaggerConfig:
    """What rebuilds a tagger: its tags, their hierarchy and the backbone.

    Attributes:
        tags: tag names, in output order.
        parents: parent index per tag (-1 for a root), or empty for a flat vocabulary.
        backbone: any timm model name (``resnet18``, ``convnext_tiny``, ``mobilenetv3_small_050``).
        input_size: side of the square input in pixels.
        output_stride: dilate the last stages to this stride (None keeps the backbone's own).
        drop_rate: dropout before the head.
    """

    tags: tuple[str, ...]
    parents: tuple[int, ...] = ()
    backbone: str = "resnet18"
    input_size: int = 256
    output_stride: int | None = None
    drop_rate: float = 0.0

    @property
    def n_tags(self) -> int:
        return len(self.tags)

    def parent_array(self) -> npt.NDArray[np.int64]:
        if not self.parents:
            return np.full(self.n_tags, -1, dtype=np.int64)
        return np.asarray(self.parents, dtype=np.int64)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, with constants that stay out of the state_dict."""

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class _Features(nn.Module):
    """The backbone up to its last feature map, as one module Grad-CAM can hook."""

    def __init__(self, backbone: Any) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.backbone.forward_features(x)
        return out


class Tagger(nn.Module):
    """timm backbone + pooled embedding + linear multi-label head."""

    def __init__(self, config: TaggerConfig) -> None:
        super().__init__()
        kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 0}
        if config.output_stride is not None:
            kwargs["output_stride"] = config.output_stride
        backbone: Any = timm.create_model(config.backbone, **kwargs)
        self.config = config
        self.normalize = Normalize()
        self.features = _Features(backbone)
        self.dropout = nn.Dropout(config.drop_rate)
        # models with a pre-logits layer (MobileNetV3) embed wider than their feature map
        dim = getattr(backbone, "head_hidden_size", None) or backbone.num_features
        self.head = nn.Linear(int(dim), config.n_tags)

    @property
    def embedding_dim(self) -> int:
        return int(self.head.in_features)

    def _pool(self, fmap: Tensor) -> Tensor:
        # timm heads with num_classes=0 return the pre-logits embedding
        out: Tensor = self.features.backbone.forward_head(fmap)
        return out

    def embed(self, images: Tensor) -> Tensor:
        """Pooled image embedding. Shape: images ``(B, 3, S, S)``; returns ``(B, D)``."""
        return self._pool(self.features(self.normalize(images)))

    def forward(self, images: Tensor) -> Tensor:
        """Tag logits. Shape: images ``(B, 3, S, S)``; returns ``(B, T)``."""
        return self.head(self.dropout(self.embed(images)))


def build_tagger(config: TaggerConfig) -> Tagger:
    """Build an untrained tagger (random weights, nothing downloaded)."""
    return Tagger(config)


@dataclass(frozen=True)
class TagPrediction:
    """Tag probabilities and decisions for a batch of images.

    Shape:
        probabilities ``(N, T)`` (hierarchy-closed: a parent scores at least its best child),
        predicted ``(N, T)`` bool (hierarchy-closed), embeddings ``(N, D)``.
    """

    probabilities: npt.NDArray[np.float64]
    predicted: npt.NDArray[np.bool_]
    embeddings: npt.NDArray[np.float32]


def predict_tags(
    model: Tagger,
    images: Tensor,
    *,
    thresholds: npt.ArrayLike | None = None,
    batch_size: int = 32,
) -> TagPrediction:
    """Predict tags of preprocessed images, batched, under ``torch.inference_mode()``.

    Args:
        model: the tagger (its device is used).
        images: ``(N, 3, S, S)`` floats in [0, 1] (see ``ml.data.load_image``).
        thresholds: per-tag thresholds ``(T,)`` (tuned on validation); 0.5 when None.
        batch_size: images per forward pass.
    """
    device = next(model.parameters()).device
    model.eval()
    probs, embs = [], []
    with torch.inference_mode():
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size].to(device)
            emb = model.embed(x)  # (b, D)
            probs.append(torch.sigmoid(model.head(emb)).float().cpu())
            embs.append(emb.float().cpu())
    p = torch.cat(probs).numpy().astype(np.float64) if probs else np.zeros((0, model.config.n_tags))
    e = torch.cat(embs).numpy() if embs else np.zeros((0, model.embedding_dim), np.float32)
    t = np.full(p.shape[1], 0.5) if thresholds is None else np.asarray(thresholds, np.float64)
    parents = model.config.parent_array()
    return TagPrediction(
        probabilities=close_probabilities(p, parents),
        predicted=close_hierarchy(p >= t, parents),
        embeddings=e.astype(np.float32),
    )
