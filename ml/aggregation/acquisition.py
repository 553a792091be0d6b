"""What one more answer to a window is worth: the expected gain in mask quality per grid.

A grid costs a volunteer the same time wherever it points (about ten seconds), so the picker
should serve the window whose answer is expected to change the mask's quality most. A cell's
answer can change the mask by at most the cell's area, and is expected to change it in
proportion to how unsure the cell is (``uncertainty``: 1 at a posterior of 0.5, 0 when
settled). Mask quality is IoU, a ratio of areas, so a change of area counts relative to the
object's area: a first-level cell of a small object (a ninth of the image) is worth far more
than a fourth-level cell on the border of a large one, and a large object's fine border is worth
less per grid than every other object's first look.

    gain(window) = sum over its open cells of uncertainty(q) * area(cell) / area(object)

where areas are fractions of the image's frame (a cell of level k covers 9**-k of it) and the
object's area is its expected area from the finest cells' posteriors, never taken below
``MIN_OBJECT_AREA`` (a ninth of a first-level cell): one tile's uncertainty must not outweigh
every other target because an object was guessed tiny.

This is the greedy rule of active annotation at a fixed cost per question (expected error
reduction per unit cost; Settles, *Active Learning*, 2012, ch. 6): no look-ahead, so a
target's fine windows wait until other targets' coarse ones are asked, which is what a budget
in human-seconds per object rewards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from ml.aggregation.votes import logit

MIN_OBJECT_AREA = 1.0 / 81.0


def cell_area(level: int | npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    """Fraction of the image's frame that a cell of ``level`` covers."""
    return np.power(9.0, -np.asarray(level, dtype=np.float64))


def uncertainty(posteriors: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Closeness of each posterior to 0.5: 1 = unknown, 0 = settled. Shape as ``posteriors``."""
    q = np.asarray(posteriors, dtype=np.float64)
    return 1.0 - np.abs(2.0 * q - 1.0)


def object_area(levels: Sequence[int], posteriors: Sequence[float]) -> float:
    """The object's expected area (fraction of the frame) from the finest cells, at least
    ``MIN_OBJECT_AREA``.

    Shape:
        levels, posteriors ``(n_leaf_cells,)``.
    """
    if not len(levels):
        return 1.0  # nothing opened yet: a first look decides everything
    area = float(np.sum(cell_area(np.asarray(levels)) * np.asarray(posteriors, dtype=np.float64)))
    return max(area, MIN_OBJECT_AREA)


def window_gain(level: int, posteriors: Sequence[float], area: float) -> float:
    """Expected gain in mask quality of one answer to a window whose parent cell is at
    ``level``, from its open cells' ``posteriors`` and the object's expected ``area``."""
    if not len(posteriors):
        return 0.0
    return float(np.sum(uncertainty(posteriors)) * cell_area(level + 1) / max(area, 1e-12))


def presence(guess: float, prior_logodds: Sequence[float], logodds: Sequence[float]) -> float:
    """How likely a tag the tagger guessed (with probability ``guess``) is on the image at all,
    given what the crowd has said of the first-level cells that tile the whole frame.

    The crowd's answers weigh "this cell holds some of it" against "it does not" by the
    likelihood ratio ``LR_i = exp(logodds_i - prior_i)`` (the votes' share of the consensus
    log-odds). Under "absent" every cell is empty; under "present" the object is somewhere, and
    we take the place the answers are judged by to be any one of the cells alike:

        odds(present | answers) = odds(guess) * mean_i LR_i

    With no answers this is the guess; nine credible "no"s drive it towards 0, and one credible
    "yes" anywhere keeps it alive. Where the object is does not come from the prior: a Grad-CAM
    or model prior that points at the wrong cells must not turn the crowd's "yes" elsewhere
    into evidence against the tag (were the prior's cells taken as independent, one credible
    "yes" beside three credible "no"s where the prior was 0.7 would cut a 0.3 guess to 0.03).

    A guessed tag's windows are worth their gain *if* the tag is there, so the picker weighs
    them by this: the budget leaves a wrong guess as soon as the crowd says so, instead of when
    its cells reach the area floor one by one.

    Shape:
        prior_logodds, logodds ``(n_cells,)``, the first-level cells.
    """
    p = float(np.clip(guess, 1e-9, 1.0 - 1e-9))
    if not len(prior_logodds):
        return p
    evidence = np.asarray(logodds, dtype=np.float64) - np.asarray(prior_logodds, dtype=np.float64)
    odds = p / (1.0 - p) * float(np.mean(np.exp(np.clip(evidence, -50.0, 50.0))))
    return float(odds / (1.0 + odds))


# How many judged guesses the prior of a precision counts as (``guess_correction``).
GUESS_PRIOR_GUESSES = 4.0


class Verdicts(NamedTuple):
    """The crowd's verdicts on some of the tagger's guesses: how many it judged, how many of
    those it confirmed, and the sum of the tagger's probabilities for them."""

    judged: int = 0
    confirmed: int = 0
    claimed: float = 0.0


def guess_correction(tag: Verdicts, project: Verdicts) -> float:
    """The log-odds to add to the tagger's probability for its guesses of one tag, from the
    crowd's verdicts on the guesses of that tag (``tag``) and of every tag (``project``).

    The tagger's probability is what it claims; the share of its guesses that the crowd
    confirmed is what it delivers. Both are shrunk by ``GUESS_PRIOR_GUESSES`` guesses towards
    the project's (whose precision is itself shrunk towards its claim), so a tag with few
    verdicts borrows the project's, and the correction is the difference of their log-odds: 0
    until anything is judged; -3.8 once the crowd has turned down the tagger's first ten
    guesses, made at 0.75 (a new guess of 0.75 then weighs 0.06; after forty, 0.006), and +1.9
    for one whose guesses at 0.5 were right nine times in ten (0.87). A guess costs a first
    window before anyone knows whether the tag is there (a tagger trained on a handful of images
    added 66 tags to 24 demo images, all wrong, and the crowd spent 2.9 grids on each): with this
    a wrong tagger's guesses are asked after the tags people gave.
    """
    w = GUESS_PRIOR_GUESSES
    base_claim = project.claimed / project.judged if project.judged else 0.5
    base_precision = (project.confirmed + w * base_claim) / (project.judged + w)
    precision = (tag.confirmed + w * base_precision) / (tag.judged + w)
    claim = (tag.claimed + w * base_claim) / (tag.judged + w)
    return float(logit(precision) - logit(claim))


def best_block(
    gain: npt.ArrayLike, usable: npt.ArrayLike, window: npt.ArrayLike, anchor: tuple[int, int]
) -> tuple[int, int]:
    """The 3x3 block of same-level cells worth most to ask about in place of the window whose
    top-left cell is ``anchor``.

    A window is the nine children of one cell; once most of them are settled (a border cell
    split between volunteers stays open after its neighbours retire), one more answer to it
    costs a whole grid for one or two squares. The object's border runs across windows, so
    the block of nine squares shifted over the neighbouring windows often holds the open
    squares of two windows: the same grid of one contiguous area, worth more.

    A block answers every open square of each window it touches, the window's own included: a
    volunteer is never shown a square twice, so a window they saw a part of is not theirs to
    see again, and a block that left one of its open squares out would take that square away
    from them for nothing (with few volunteers, from everyone).

    Args:
        gain: per cell of the level's lattice (a window's level + 1), what an answer to it is
            worth: above 0 for the open cells, 0 for the settled ones.
        usable: per cell, whether it may be shown (it exists, and this volunteer has not
            answered it).
        window: per cell, the window it belongs to (any integer label; cells that do not
            exist are not usable).
        anchor: (row, col) of the window's top-left cell on the lattice.

    Shape:
        gain, usable, window ``(n, n)``, n >= 3.

    Returns:
        (row, col) of the chosen block's top-left cell: ``anchor`` unless a block worth more
        exists (ties keep the window).
    """
    g = np.asarray(gain, dtype=np.float64)
    ok = np.asarray(usable, dtype=bool)
    label = np.asarray(window)
    n = g.shape[0]
    r0, c0 = anchor
    best, best_value = (r0, c0), float(g[r0 : r0 + 3, c0 : c0 + 3].sum())
    open_of = {int(w): int(((label == w) & (g > 0)).sum()) for w in np.unique(label[g > 0])}
    for top in range(max(0, r0 - 2), min(n - 3, r0 + 2) + 1):
        for left in range(max(0, c0 - 2), min(n - 3, c0 + 2) + 1):
            block = (slice(top, top + 3), slice(left, left + 3))
            if not ok[block].all():
                continue
            inside = label[block][g[block] > 0]
            touched = np.unique(label[block])
            if label[r0, c0] not in touched or any(
                int((inside == w).sum()) != open_of.get(int(w), 0) for w in touched
            ):
                continue
            value = float(g[block].sum())
            if value > best_value + 1e-12:
                best, best_value = (top, left), value
    return best
