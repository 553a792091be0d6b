"""Multi-label losses for imbalanced tags, behind a registry (``get_loss(name, ...)``).

- ``bce``: binary cross-entropy on logits with a positive weight per tag, usually
  ``n_negative / n_positive`` from the training split (``positive_weights``), clipped so a tag
  seen once does not dominate.
- ``asl``: asymmetric loss (Ridnik et al. 2021, "Asymmetric Loss For Multi-Label
  Classification"): focusing ``gamma_neg > gamma_pos`` down-weights the many easy negatives, and
  the probability margin ``clip`` discards negatives the model already scores below it.

Each loss maps ``(logits, targets)`` of shape ``(B, T)`` to a scalar, the mean over B and T.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn
from torch.nn import functional as F


def positive_weights(labels: npt.ArrayLike, *, max_weight: float = 50.0) -> Tensor:
    """``n_negative / n_positive`` per tag, in ``[1, max_weight]`` (1 for an absent tag).

    Shape:
        labels ``(N, T)`` multi-hot; returns ``(T,)`` float32.
    """
    y = np.asarray(labels, dtype=np.float64) > 0.5
    pos = y.sum(axis=0)
    neg = y.shape[0] - pos
    w = np.where(pos > 0, neg / np.maximum(pos, 1), 1.0)
    return torch.as_tensor(np.clip(w, 1.0, max_weight), dtype=torch.float32)


class WeightedBCE(nn.Module):
    """BCE on logits with a positive weight per tag."""

    pos_weight: Tensor | None

    def __init__(self, pos_weight: Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("pos_weight", pos_weight, persistent=False)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=self.pos_weight)


class AsymmetricLoss(nn.Module):
    """Asymmetric loss (ASL), Ridnik et al. 2021, with the paper's defaults."""

    def __init__(
        self, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05, eps: float = 1e-8
    ) -> None:
        super().__init__()
        self.gamma_neg, self.gamma_pos, self.clip, self.eps = gamma_neg, gamma_pos, clip, eps

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        p = torch.sigmoid(logits)  # (B, T)
        p_neg = (p - self.clip).clamp(min=0) if self.clip > 0 else p  # shifted probability
        loss_pos = targets * (1 - p).pow(self.gamma_pos) * torch.log(p.clamp(min=self.eps))
        loss_neg = (1 - targets) * p_neg.pow(self.gamma_neg)
        loss_neg = loss_neg * torch.log((1 - p_neg).clamp(min=self.eps))
        return -(loss_pos + loss_neg).mean()


def _bce(*, pos_weight: Tensor | None = None, **_: Any) -> nn.Module:
    return WeightedBCE(pos_weight)


def _asl(*, pos_weight: Tensor | None = None, **kwargs: Any) -> nn.Module:
    return AsymmetricLoss(**kwargs)  # ASL handles imbalance by focusing, not by weights


LOSSES: dict[str, Callable[..., nn.Module]] = {"bce": _bce, "asl": _asl}


def get_loss(name: str, *, pos_weight: Tensor | None = None, **kwargs: Any) -> nn.Module:
    """Build the loss called ``name``; ``pos_weight`` is used by ``bce`` and ignored by ``asl``.

    Raises:
        KeyError: unknown name (the message lists the known ones).
    """
    try:
        factory = LOSSES[name]
    except KeyError:
        raise KeyError(f"unknown loss {name!r}; known: {', '.join(LOSSES)}") from None
    return factory(pos_weight=pos_weight, **kwargs)
