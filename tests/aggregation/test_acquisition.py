"""What a window is worth: expected gain in mask quality per grid."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from ml.aggregation.acquisition import MIN_OBJECT_AREA, object_area, window_gain


def test_a_first_look_is_worth_more_than_a_fine_border() -> None:
    first = window_gain(0, [0.5] * 9, object_area([1] * 9, [0.5] * 9))
    # A large object (four first-level cells) refined at its border, children at the inherited
    # prior: each answer decides pixels worth a ninth of what a first look's decide.
    large = object_area([1] * 4 + [2] * 9, [0.98] * 4 + [0.82] * 9)
    border = window_gain(1, [0.82] * 9, large)
    assert first > 5 * border


def test_the_same_squares_are_worth_more_for_a_smaller_object() -> None:
    small = object_area([2] * 9 + [1] * 8, [0.82] * 9 + [0.02] * 8)
    large = object_area([2] * 9 + [1] * 8, [0.82] * 9 + [0.98] * 8)
    assert window_gain(1, [0.82] * 9, small) > 2 * window_gain(1, [0.82] * 9, large)


def test_settled_cells_are_worth_nothing_and_a_tiny_guess_does_not_blow_up() -> None:
    assert window_gain(2, [0.0, 1.0, 1.0], 0.1) == 0.0
    assert window_gain(2, [], 0.1) == 0.0
    assert object_area([3], [0.0]) == MIN_OBJECT_AREA
    assert object_area([], []) == 1.0


@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=9), st.integers(0, 4))
def test_a_window_gains_more_the_less_its_cells_are_known(qs: list[float], level: int) -> None:
    area = 0.05
    sharper = [q if abs(q - 0.5) > 0.49 else q + np.sign(q - 0.5 or 1) * 0.1 for q in qs]
    assert window_gain(level, sharper, area) <= window_gain(level, qs, area) + 1e-12
