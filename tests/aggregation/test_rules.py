"""Retirement and refinement rules."""

from __future__ import annotations

import numpy as np
import pytest

from ml.aggregation.grid import Cell, children, level_cells
from ml.aggregation.rules import (
    RefinementConfig,
    RetirementConfig,
    choose_refinements,
    confirmation_votes,
    retire,
)


def test_retire_confident_budget_and_gold() -> None:
    r = retire(
        [0.99, 0.6, 0.6, 0.5, 0.01],
        [3, 3, 12, 1, 1],
        gold=[-1, -1, -1, 1, -1],
        config=RetirementConfig(0.95, 3, 12),
    )
    assert r.retired.tolist() == [True, False, True, True, False]
    assert r.uncertain.tolist() == [False, False, True, False, False]
    assert r.label.tolist() == [1, 1, 1, 1, 0]


def test_retire_counts_fractional_credible_votes() -> None:
    # 6.5 credible votes (a random clicker's counted a little) leave the budget of 7 unspent.
    config = RetirementConfig(max_votes=7)
    r = retire([0.6, 0.6, 0.99, 0.99], [6.5, 7.0, 2.9, 3.0], config=config)
    assert r.retired.tolist() == [False, True, False, True]
    assert r.uncertain.tolist() == [False, True, False, False]


def test_a_cell_credible_volunteers_split_on_retires_as_holding_the_object() -> None:
    # Unsure after enough votes: two credible yeses split it (even with the posterior under a
    # half: the noes are people who missed a sliver), one does not (a false yes is common
    # enough), nor do two before min_votes; a confident cell stays confident, and a spent
    # budget with two yeses is split, not uncertain; split_votes=0 turns the rule off.
    q = [0.6, 0.3, 0.6, 0.6, 0.99, 0.5]
    n = [4, 5, 4, 2, 3, 7]
    yes = [2, 2, 1, 2, 3, 2]
    config = RetirementConfig(0.95, 3, 7)
    r = retire(q, n, config=config, supported=yes)
    assert r.retired.tolist() == [True, True, False, False, True, True]
    assert r.split.tolist() == [True, True, False, False, False, True]
    assert r.label.tolist() == [1, 1, 1, 1, 1, 1]
    assert not r.uncertain.any()
    off = retire(q, n, config=RetirementConfig(0.95, 3, 7, split_votes=0), supported=yes)
    assert not off.split.any()
    assert off.uncertain.tolist() == [False] * 5 + [True]
    assert off.label.tolist() == [1, 0, 1, 1, 1, 1]


def test_border_positive_cells_open_windows() -> None:
    cells = level_cells(1)
    labels = np.zeros(9, dtype=np.int8)
    labels[[0, 1, 3, 4]] = 1  # object in the top-left 2x2 cells
    chosen = choose_refinements(cells, labels, 900, 900)
    # (1, 0, 0) has only positive neighbours (the image edge is not a border)
    assert set(chosen) == {Cell(1, 0, 1), Cell(1, 1, 0), Cell(1, 1, 1)}
    all_pos = choose_refinements(cells, np.ones(9, dtype=np.int8), 900, 900)
    assert all_pos == []  # no negative neighbour, no border


def test_mixed_levels_leaves_min_size_and_opened() -> None:
    cells = level_cells(1)
    labels = [1, 0, 0, 0, 0, 0, 0, 0, 0]
    kids = list(children(Cell(1, 0, 0)))
    kid_labels = [1, 1, 0, 1, 1, 0, 0, 0, 0]
    chosen = choose_refinements(cells + kids, labels + kid_labels, 900, 900)
    assert Cell(1, 0, 0) not in chosen  # refined already: not a leaf
    assert chosen == [Cell(2, 0, 1), Cell(2, 1, 0), Cell(2, 1, 1)]
    tiny = choose_refinements(
        cells + kids, labels + kid_labels, 900, 900, config=RefinementConfig(min_cell_px=40)
    )
    assert tiny == []  # level-3 cells would be 33 px
    assert Cell(2, 1, 1) not in choose_refinements(
        cells + kids, labels + kid_labels, 900, 900, opened=[Cell(2, 1, 1)]
    )


def test_prior_disagreement_opens_a_window() -> None:
    cells = level_cells(1)
    labels = np.zeros(9, dtype=np.int8)
    prior = np.full(9, -4.0)
    prior[8] = 4.0  # the model is sure, the crowd says no
    assert choose_refinements(cells, labels, 900, 900, prior_logodds=prior) == [Cell(1, 2, 2)]


def test_a_disputed_no_square_on_the_border_opens_a_window() -> None:
    cells = level_cells(1)
    labels = np.array([1, 0, 0, 0, 0, 0, 0, 0, 0], dtype=np.int8)  # the object in the corner
    disputed = np.zeros(9, dtype=bool)
    disputed[[1, 8]] = True  # someone credible saw it next door, and far away
    config = RefinementConfig(min_cell_px=8)
    plain = choose_refinements(cells, labels, 900, 900, config=config)
    assert plain == [Cell(1, 0, 0)]
    # Only the disputed square next to the object gets a closer look.
    opened = choose_refinements(cells, labels, 900, 900, disputed=disputed, config=config)
    assert opened == [Cell(1, 0, 0), Cell(1, 0, 1)]


def test_children_inherit_their_parents_odds_times_the_share_of_children_that_show_it() -> None:
    from ml.aggregation.rules import CHILD_RATE, inherited_prior
    from ml.aggregation.votes import logit, sigmoid

    parent = np.array([4.0, -1.0, 0.0, 40.0, -40.0])
    out = inherited_prior(parent)
    expected = np.clip(logit(sigmoid(parent) * CHILD_RATE), -2.0, 2.0)
    assert np.allclose(out, expected)
    # A sure parent's children are as likely empty as not (half of a border cell's children
    # show the object); a doubtful parent's, less likely; none is likelier than its parent, and
    # none is sure (a sure "no" parent's children start at -2).
    assert abs(out[3]) < 1e-3 and out[2] < out[3] and out[1] < out[2] and out[4] == -2.0
    assert np.all(sigmoid(out[:4]) <= sigmoid(parent[:4]))
    # The project's own share, per parent (from its control truth), moves them.
    rated = inherited_prior(parent[:4], [0.35, 0.35, 0.61, 0.61])
    assert rated[3] == pytest.approx(logit(0.61), abs=1e-3) and rated[0] < out[0]
    # Never sure enough that one vote would retire a child (the bar is logit 0.95).
    needed = confirmation_votes(out, RetirementConfig(), confirm_votes=1)
    assert np.all(needed == RetirementConfig().min_votes)


def test_a_sure_prior_is_confirmed_early_only_by_votes_that_weigh_enough() -> None:
    from ml.aggregation.rules import CONFIRM_EVIDENCE, SEARCH_PRIOR
    from ml.aggregation.votes import sigmoid

    config = RetirementConfig()
    bar = np.log(config.confidence / (1 - config.confidence))
    assert abs(SEARCH_PRIOR) >= bar  # a search square is sure enough to be confirmed by one answer
    prior = np.full(4, SEARCH_PRIOR)
    # The votes' log-LR: a proven volunteer's no, a sloppy one's, a yes, none at all.
    evidence = np.array([-2.0, -0.95, 1.9, 0.0])
    posterior = sigmoid(prior + evidence)
    needed = confirmation_votes(prior, config, confirm_votes=1, posterior=posterior)
    assert needed.tolist() == [1, config.min_votes, config.min_votes, config.min_votes]
    # A cell retires on the credible answer; the sloppy "no" alone does not retire it, although
    # its posterior is past the bar.
    decision = retire(posterior, np.ones(4), config=config, min_votes=needed)
    assert decision.retired.tolist() == [True, False, False, False]
    assert sigmoid(SEARCH_PRIOR - 0.95) < 1 - config.confidence
    # The same for a sure positive prior (a model that is sure), in its direction.
    up = confirmation_votes(
        [4.0, 4.0], config, confirm_votes=1, posterior=sigmoid([4.0 + CONFIRM_EVIDENCE, 4.5])
    )
    assert up.tolist() == [1, config.min_votes]
    # Without the posterior only the prior counts.
    assert confirmation_votes(prior, config, confirm_votes=1).tolist() == [1] * 4


def test_a_tagged_object_no_first_square_showed_is_searched_for_one_level_down() -> None:
    from ml.aggregation.grid import ROOT, children
    from ml.aggregation.rules import RefinementConfig, search_small

    first = list(children(ROOT))
    config = RefinementConfig(min_cell_px=8, max_level=4)
    assert search_small(first, [0] * 9, 600, 900, config=config) == sorted(first)
    assert search_small(first, [0] * 8 + [1], 600, 900, config=config) == []  # it was seen
    # One first cell was opened on a yes that the evidence overturned since: the others open.
    deeper = [*first, *children(first[0])]
    opened = search_small(deeper, [0] * 18, 600, 900, opened={first[0]}, config=config)
    assert opened == sorted(first)[1:]
    # A first cell still says yes (a bad actor's) but every square of its window said no.
    still = search_small(deeper, [1] + [0] * 17, 600, 900, opened={first[0]}, config=config)
    assert still == sorted(first)[1:]
    # ... not while its window is still deciding (one of its squares not retired yet).
    waiting = [*first, *children(first[0])[:8]]
    assert search_small(waiting, [1] + [0] * 16, 600, 900, opened={first[0]}, config=config) == []
    # A yes among the finest answers: it was seen.
    assert search_small(deeper, [1] + [0] * 16 + [1], 600, 900, config=config) == []
    assert search_small(first, [0] * 9, 600, 900, opened=first, config=config) == []
    assert search_small(first, [0] * 9, 30, 30, config=config) == []  # too small to split
