"""Tag hierarchy in prediction: a child tag implies its parent.

The hierarchy is a parent index array: ``parents[t]`` is the index of tag ``t``'s parent, or -1
for a root tag. ``close_hierarchy`` turns every predicted tag's ancestors on, so a prediction
never says ``red_circle`` without ``circle`` and ``shape``. ``close_probabilities`` does the same
for scores: a parent scores at least as high as its most probable descendant. Pure numpy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]


def parent_array(tags: Sequence[str], parent_of: dict[str, str | None]) -> IntArray:
    """Return the parent index array of ``tags`` given each tag's parent name (or None).

    A parent outside ``tags`` counts as no parent (the vocabulary may be a subset).
    """
    index = {name: i for i, name in enumerate(tags)}
    return np.array([index.get(parent_of.get(name) or "", -1) for name in tags], dtype=np.int64)


def check_parents(parents: npt.ArrayLike) -> IntArray:
    """Validate a parent index array (in range, no cycles); return it as int64."""
    p = np.asarray(parents, dtype=np.int64).reshape(-1)
    n = p.size
    if np.any((p < -1) | (p >= n)):
        raise ValueError(f"parent indices must lie in [-1, {n}), got {p.tolist()}")
    node = np.arange(n)
    for _ in range(n + 1):  # after n steps every chain has reached a root unless it cycles
        node = np.where(node >= 0, p[np.maximum(node, 0)], -1)
    if np.any(node >= 0):
        raise ValueError("the tag hierarchy has a cycle; every parent chain must end at a root")
    return p


def ancestor_matrix(parents: npt.ArrayLike) -> BoolArray:
    """``A[t, a]`` is True when ``a`` is ``t`` or one of its ancestors.

    Shape:
        parents ``(T,)``; returns ``(T, T)``.
    """
    p = check_parents(parents)
    n = p.size
    a = np.eye(n, dtype=bool)
    node = np.arange(n)
    for _ in range(n):
        node = np.where(node >= 0, p[np.maximum(node, 0)], -1)
        has = node >= 0
        a[np.arange(n)[has], node[has]] = True
    return a


def close_hierarchy(predicted: npt.ArrayLike, parents: npt.ArrayLike) -> BoolArray:
    """Turn on the ancestors of every predicted tag.

    Shape:
        predicted ``(..., T)`` bool; parents ``(T,)``; returns ``(..., T)``.
    """
    pred = np.asarray(predicted, dtype=bool)
    a = ancestor_matrix(parents)
    return (pred.astype(np.int64) @ a.astype(np.int64)) > 0


def close_probabilities(probabilities: npt.ArrayLike, parents: npt.ArrayLike) -> np.ndarray:
    """Raise each tag's probability to the maximum over itself and its descendants.

    Shape:
        probabilities ``(..., T)``; returns ``(..., T)``.
    """
    prob = np.asarray(probabilities, dtype=np.float64)
    a = ancestor_matrix(parents)  # (T, T): row t -> ancestors of t
    # out[..., a] = max over t with A[t, a] of prob[..., t]
    masked = np.where(a[None, :, :], prob.reshape(-1, prob.shape[-1])[:, :, None], -np.inf)
    return masked.max(axis=1).reshape(prob.shape)
