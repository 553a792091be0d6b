"""The registry of aggregation methods: ``METHODS`` and ``get_method(name)``.

Every method takes COO :class:`~ml.aggregation.votes.Votes` and keyword-only ``gold`` and
``prior_logodds`` and returns an :class:`~ml.aggregation.votes.AggregationResult`.
"""

from __future__ import annotations

from typing import Protocol

import numpy.typing as npt

from ml.aggregation.dawid_skene import dawid_skene
from ml.aggregation.majority import majority_vote, weighted_majority
from ml.aggregation.votes import AggregationResult, Votes


class AggregationMethod(Protocol):
    """Signature shared by every registered method."""

    def __call__(
        self,
        votes: Votes,
        *,
        gold: npt.ArrayLike | None = ...,
        prior_logodds: npt.ArrayLike | None = ...,
    ) -> AggregationResult: ...


METHODS: dict[str, AggregationMethod] = {
    "majority_vote": majority_vote,
    "weighted_majority": weighted_majority,
    "dawid_skene": dawid_skene,
}


def get_method(name: str) -> AggregationMethod:
    """The method registered as ``name``; KeyError lists the known names."""
    try:
        return METHODS[name]
    except KeyError:
        known = ", ".join(sorted(METHODS))
        raise KeyError(f"unknown aggregation method {name!r}; known methods: {known}") from None
