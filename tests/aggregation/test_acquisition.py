"""What a window is worth: expected gain in mask quality per grid."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from ml.aggregation.acquisition import (
    MIN_OBJECT_AREA,
    Verdicts,
    guess_correction,
    object_area,
    presence,
    window_gain,
)
from ml.aggregation.votes import logit, sigmoid


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


def test_a_guess_keeps_its_probability_until_answers_move_it() -> None:
    prior = [-2.0, 1.5, 0.0, -1.0, 2.0, -3.0, 0.5, 0.0, -0.5]
    assert abs(presence(0.3, prior, prior) - 0.3) < 1e-12  # no answers yet
    assert presence(0.3, [], []) == 0.3
    no = [p - 3.0 for p in prior]
    assert presence(0.3, prior, no) < 0.03  # nine credible "no"s: very likely not there
    # One credible "yes" keeps it alive wherever it is, even where the prior was lowest.
    low = int(np.argmin(prior))
    one = list(no)
    one[low] = prior[low] + 3.0
    assert presence(0.3, prior, one) > 0.4
    assert presence(0.3, prior, [p + 3.0 for p in prior]) > 0.85


@given(
    st.floats(0.01, 0.99),
    st.lists(st.floats(-4, 4), min_size=9, max_size=9),
    st.lists(st.floats(-6, 6), min_size=9, max_size=9),
    st.integers(0, 8),
    st.floats(0.1, 5),
)
def test_more_evidence_for_a_cell_never_lowers_the_belief(
    guess: float, prior: list[float], evidence: list[float], cell: int, more: float
) -> None:
    logodds = [p + e for p, e in zip(prior, evidence, strict=True)]
    before = presence(guess, prior, logodds)
    logodds[cell] += more
    assert 0.0 <= before <= presence(guess, prior, logodds) <= 1.0


def test_a_window_with_few_open_squares_shifts_to_the_block_that_holds_more() -> None:
    from ml.aggregation.acquisition import best_block

    # A 9x9 lattice (level 2), nine windows; the window at (3, 3) has one open square, its
    # right-hand neighbour three, along the object's border.
    windows = np.arange(9).reshape(3, 3).repeat(3, axis=0).repeat(3, axis=1)
    gain = np.zeros((9, 9))
    gain[4, 5] = 1.0
    gain[3:6, 6] = [1.0, 0.5, 1.0]
    usable = np.ones((9, 9), dtype=bool)
    # Both windows' open squares in one grid.
    assert best_block(gain, usable, windows, (3, 3)) == (3, 4)
    # Never a block that leaves out an open square of the window, even one worth more.
    far = gain.copy()
    far[1:3, 1:4] = 1.0
    assert best_block(far, usable, windows, (3, 3)) == (3, 4)
    # Nor one that leaves out an open square of a window it touches: this volunteer could not
    # be shown that window again.
    beyond = gain.copy()
    beyond[4, 8] = 1.0
    assert best_block(beyond, usable, windows, (3, 3)) == (3, 3)
    # Only blocks whose every cell may be shown: none with a square this volunteer answered.
    usable[3, 6] = False
    assert best_block(gain, usable, windows, (3, 3)) == (3, 3)
    # Ties keep the window; at the lattice's edge blocks stay inside it.
    ones = np.ones((9, 9))
    assert best_block(ones, np.ones((9, 9), dtype=bool), windows, (0, 0)) == (0, 0)
    corner = np.zeros((9, 9))
    corner[0, 2], corner[0, 3:5] = 1.0, 1.0
    assert best_block(corner, np.ones((9, 9), dtype=bool), windows, (0, 0)) == (0, 2)


def _corrected(p: float, tag: Verdicts, project: Verdicts) -> float:
    return float(sigmoid(logit(p) + guess_correction(tag, project)))


def test_a_tagger_the_crowd_keeps_turning_down_stops_drawing_first_looks() -> None:
    nothing = Verdicts()
    assert guess_correction(nothing, nothing) == 0.0  # nothing judged: its own word
    ten_wrong = Verdicts(judged=10, confirmed=0, claimed=7.5)
    assert _corrected(0.75, ten_wrong, ten_wrong) < 0.1
    forty_wrong = Verdicts(judged=40, confirmed=0, claimed=30.0)
    assert _corrected(0.75, forty_wrong, forty_wrong) < 0.01
    # Surer than it says: right nine times in ten at 0.5.
    modest = Verdicts(judged=10, confirmed=9, claimed=5.0)
    assert 0.8 < _corrected(0.5, modest, modest) < 0.95
    # Right as often as it says: no correction to speak of.
    honest = Verdicts(judged=40, confirmed=30, claimed=30.0)
    assert abs(guess_correction(honest, honest)) < 0.05


def test_a_tag_with_few_verdicts_borrows_the_projects() -> None:
    project = Verdicts(judged=60, confirmed=3, claimed=42.0)  # a tagger mostly wrong
    unjudged = guess_correction(Verdicts(), project)
    assert unjudged < -2.0  # a tag nobody judged yet is not trusted more than the tagger is
    # One confirmed guess of a tag moves it up, but not to the tagger's own word.
    one_right = guess_correction(Verdicts(judged=1, confirmed=1, claimed=0.7), project)
    assert unjudged < one_right < 0.0
    # Many verdicts of a tag outweigh the project's: this tag's guesses are right.
    good_tag = guess_correction(Verdicts(judged=30, confirmed=27, claimed=21.0), project)
    assert good_tag > 0.5


@given(
    st.integers(0, 50),
    st.floats(0.05, 0.95),
    st.integers(0, 50),
)
def test_more_confirmed_guesses_never_lower_the_correction(
    judged: int, claim: float, extra: int
) -> None:
    project = Verdicts(judged=judged + extra + 20, confirmed=10, claimed=claim * (judged + 20))
    corrections = [
        guess_correction(Verdicts(judged, c, claim * judged), project) for c in range(judged + 1)
    ]
    assert all(a <= b + 1e-12 for a, b in pairwise(corrections))
