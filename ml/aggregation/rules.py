"""Retirement and refinement rules.

Retire: stop asking about a cell once its posterior is confident enough
(``max(q, 1 - q) >= confidence`` after at least ``min_votes`` votes, or at once for gold), or
once its vote budget is spent, in which case it is flagged *uncertain* (the target may go to
triage), or once it is *split*: unsure after ``min_votes`` votes, but ``split_votes`` credible
volunteers said yes. Volunteers are asked whether any of the object is in a square, and miss a
part that covers too little of it for them to notice, so a square where credible people
disagree mostly holds a sliver of the object (two credible false yeses on an empty square are
rare: at a 5% false-yes rate, about 2% of empty squares after five votes). More votes do not
settle such a square, since everyone who looks sees the same sliver; it retires as holding the
object, and the refinement below opens its finer window, where the sliver is nine times the
share of a square and the crowd agrees on it.

Refine: among the leaf retired cells of a target (cells without retired descendants), open a
window one level deeper on

* positive cells on the object's border: next (8-neighbourhood, at any level) to a retired
  negative cell,
* cells where the prior disagrees with the consensus
  (``|sigmoid(prior) - label| >= disagreement``), and
* *disputed* negative cells next to a retired positive one: some credible volunteer said yes.
  People miss a part of the object that covers too little of a square for them to notice (and
  careless people a good deal more), so a square on the border that the crowd split on often
  holds a part of the object; one level down that part is a larger share of its squares;

as long as the children would be at least ``min_cell_px`` pixels on their shorter side and no
deeper than ``max_level``. Adjacency across levels is decided on the grid of the finest level
present, where every coarser cell paints its block.

A target whose tag people gave the image (not the tagger) and whose nine first cells all came
back negative holds an object too small to be seen in a ninth of the image: ``search_small``
opens each of the nine cells as its own window, once. Their squares start at ``SEARCH_PRIOR``:
the object is in few of them, so one credible "no" is enough for each of the others.

Children inherit a prior from their parent (``inherited_prior``): the probability that the
parent shows the object times the share of a border cell's children that show some of it (the
*child rate*, ``CHILD_RATE`` or the project's control truth per level: 0.35-0.61 measured on
the demo's and on photograph-like scenes), clipped to +-2. A border cell's children are mixed,
and as many are empty as not: a prior that calls them likely (the parent's own odds, halved,
as before) made two credible "no"s leave an empty child at 0.9 on the live mask, and made
refinement windows look settled to the picker before anyone had seen them. Children nobody has
answered stay out of the composed mask (their parent's answer stands there).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ml.aggregation.grid import (
    Cell,
    ancestor,
    cell_arrays,
    children,
    inside_children,
    min_cell_size,
)
from ml.aggregation.votes import BoolArray, logit, sigmoid


@dataclass(frozen=True)
class RetirementConfig:
    """When a cell stops being asked."""

    confidence: float = 0.95
    min_votes: int = 3
    max_votes: int = 12
    split_votes: float = 2.0  # credible votes for the object that retire an unsure cell split


@dataclass(frozen=True)
class Retirement:
    """Per-cell decision. Shape: each ``(n_cells,)``."""

    retired: BoolArray
    uncertain: BoolArray
    label: npt.NDArray[np.int8]
    split: BoolArray


def retire(
    posterior: npt.ArrayLike,
    n_votes: npt.ArrayLike,
    *,
    gold: npt.ArrayLike | None = None,
    config: RetirementConfig = RetirementConfig(),
    min_votes: npt.ArrayLike | None = None,
    supported: npt.ArrayLike | None = None,
) -> Retirement:
    """Decide which cells retire.

    Args:
        posterior: consensus probability per cell.
        n_votes: votes each cell has received; may be fractional, as the credible votes of
            ``ml.aggregation.credibility.budget_shares``.
        gold: -1 unknown, else the known answer (gold cells retire at once).
        config: thresholds.
        min_votes: per-cell votes needed before a confident cell retires, instead of
            ``config.min_votes`` (a cell whose model prior is already sure needs only a small
            confirmation sample: see ``confirmation_votes``).
        supported: per cell, the credible votes that speak for the object (a credible yes, or a
            confirmed adversary's no); with at least ``config.split_votes`` of them a cell that
            is not confident after its ``min_votes`` retires *split*: label 1, not uncertain.

    Shape:
        all inputs ``(n_cells,)``.
    """
    q = np.asarray(posterior, dtype=np.float64)
    n = np.asarray(n_votes, dtype=np.float64)
    g = np.full(q.shape, -1) if gold is None else np.asarray(gold)
    needed = config.min_votes if min_votes is None else np.asarray(min_votes, dtype=np.float64)
    confident = (np.maximum(q, 1.0 - q) >= config.confidence) & (n >= needed)
    spent = n >= config.max_votes
    known = g >= 0
    split = np.zeros(q.shape, dtype=bool)
    if supported is not None and config.split_votes > 0:
        backed = np.asarray(supported, dtype=np.float64) >= config.split_votes
        split = backed & ~confident & ~known & (n >= needed)
    retired = confident | spent | known | split
    uncertain = spent & ~confident & ~known & ~split
    label = np.where(known, g, (q >= 0.5) | split).astype(np.int8)
    return Retirement(retired=retired, uncertain=uncertain, label=label, split=split)


# The votes' own log-likelihood ratio, in the direction of a sure prior, that confirms it on
# fewer than ``min_votes`` votes: one answer from a volunteer proven on gold brings 1.8-2.4, a
# sloppy one's (who misses what covers little of a square) about 1, a newcomer's less.
CONFIRM_EVIDENCE = 1.5


def confirmation_votes(
    prior_logodds: npt.ArrayLike,
    config: RetirementConfig,
    *,
    confirm_votes: int,
    posterior: npt.ArrayLike | None = None,
) -> npt.NDArray[np.int64]:
    """Votes each cell needs before it may retire on confidence.

    A cell whose prior alone reaches the retirement confidence (a model that is sure, a square
    of a small-object search) needs ``confirm_votes`` agreeing votes, if those votes bring at
    least ``CONFIRM_EVIDENCE`` of log-likelihood ratio its way (the posterior's log-odds less the
    prior's): a sure prior is confirmed by a credible answer, not by any. A disagreeing vote
    pulls the posterior back under the bar, so the cell stays open for more; every other cell
    needs ``config.min_votes``. Without ``posterior`` the votes are not weighed.

    Shape:
        prior_logodds, posterior ``(n_cells,)``; returns ``(n_cells,)``.
    """
    prior = np.asarray(prior_logodds, dtype=np.float64)
    bar = np.log(config.confidence) - np.log1p(-config.confidence)
    sure = np.abs(prior) >= bar
    if posterior is not None:
        evidence = logit(posterior) - prior
        sure &= np.sign(prior) * evidence >= CONFIRM_EVIDENCE
    return np.where(sure, min(confirm_votes, config.min_votes), config.min_votes).astype(np.int64)


@dataclass(frozen=True)
class RefinementConfig:
    """Which retired cells open a deeper window."""

    min_cell_px: int = 16
    max_level: int = 6
    disagreement: float = 0.6
    refine_uncertain: bool = True
    square: bool = False  # the pyramid's frame (``ml.aggregation.grid``): square cells or not


# Under the retirement bar (logit 0.95 = 2.94): an inherited prior is a guess about mixed
# children, never sure enough for a single vote to confirm (``confirmation_votes``).
INHERIT_CLIP = 2.0
# The share of a positive border cell's children that show some of the object, where the
# project's control truth does not say (``app.services.crowd.consensus.base_rates`` measures it per
# level: 0.35/0.49 at levels 2/3 of the demo, 0.41/0.61 of photograph-like scenes).
CHILD_RATE = 0.5


# The prior of the squares a small-object search opens (``search_small``): nine first squares
# came back empty, so the object covers a sliver of the image and few of the 81 squares below
# hold any of it (1.4% in a crowd campaign). Just past the retirement bar, so that one credible
# answer that agrees retires an empty square (``confirmation_votes``); a yes reopens the
# question at once.
SEARCH_PRIOR = -3.0


def inherited_prior(
    parent_logodds: npt.ArrayLike, child_rate: npt.ArrayLike = CHILD_RATE
) -> npt.NDArray[np.float64]:
    """The prior log-odds of a refined cell's children: the probability that the parent shows
    the object (from its posterior log-odds) times ``child_rate``, the share of a border cell's
    children that show some of it, clipped to +-``INHERIT_CLIP``.

    Shape:
        parent_logodds, child_rate ``(n,)`` (or a scalar rate); returns ``(n,)`` (one value for
        all nine children of each).
    """
    q = sigmoid(parent_logodds) * np.asarray(child_rate, dtype=np.float64)
    return np.clip(logit(q), -INHERIT_CLIP, INHERIT_CLIP)


def leaf_cells(cells: Sequence[Cell]) -> list[bool]:
    """For each cell, whether no other cell in ``cells`` lies strictly inside it."""
    present = set(cells)
    covered: set[Cell] = set()
    for c in present:
        for level in range(c.level):
            covered.add(ancestor(c, level))
    return [c not in covered for c in cells]


def _label_grid(cells: Sequence[Cell], labels: npt.NDArray[np.int8], level: int) -> npt.NDArray:
    """Paint leaf labels on the grid of ``level``: -1 unknown, 0 negative, 1 positive."""
    n = 3**level
    grid = np.full((n, n), -1, dtype=np.int8)
    levels, rows, cols = cell_arrays(cells)
    f = 3 ** (level - levels)
    top, left = rows * f, cols * f
    for i in np.argsort(levels, kind="stable"):  # finer cells paint last
        grid[top[i] : top[i] + f[i], left[i] : left[i] + f[i]] = labels[i]
    return grid


def _touches(cells: Sequence[Cell], grid: npt.NDArray, level: int, label: int) -> BoolArray:
    """For each cell, whether it touches (8-neighbourhood, or overlaps) a leaf of ``label``."""
    neg = np.pad(grid == label, 1)
    near = np.zeros_like(neg)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            near |= np.roll(np.roll(neg, dr, axis=0), dc, axis=1)
    near = near[1:-1, 1:-1]
    s = np.zeros((near.shape[0] + 1, near.shape[1] + 1), dtype=np.int64)
    s[1:, 1:] = near.cumsum(0).cumsum(1)
    levels, rows, cols = cell_arrays(cells)
    f = 3 ** (level - levels)
    t, b, le, r = rows * f, (rows + 1) * f, cols * f, (cols + 1) * f
    return np.asarray((s[b, r] - s[t, r] - s[b, le] + s[t, le]) > 0)


def choose_refinements(
    cells: Sequence[Cell],
    labels: npt.ArrayLike,
    height: int,
    width: int,
    *,
    prior_logodds: npt.ArrayLike | None = None,
    uncertain: npt.ArrayLike | None = None,
    disputed: npt.ArrayLike | None = None,
    opened: Collection[Cell] = (),
    config: RefinementConfig = RefinementConfig(),
) -> list[Cell]:
    """Retired cells that should open a window one level deeper.

    Args:
        cells: the target's retired cells, any levels.
        labels: their consensus labels (0/1).
        height, width: the image size in pixels.
        prior_logodds: the prior of each cell (CAM or model), optional.
        uncertain: cells retired for budget; skipped unless ``config.refine_uncertain``.
        disputed: negative cells that a credible volunteer said yes to; those next to a
            positive cell open too.
        opened: cells whose window is already open (skipped).
        config: size limits and the disagreement threshold.

    Shape:
        labels, prior_logodds, uncertain: ``(n_cells,)``.

    Returns:
        Cells to open, in input order.
    """
    if not len(cells):
        return []
    y = np.asarray(labels, dtype=np.int8)
    leaf = np.asarray(leaf_cells(cells))
    finest = max(c.level for c in cells)
    painted = _label_grid([c for c, k in zip(cells, leaf, strict=True) if k], y[leaf], finest)
    want = (y == 1) & _touches(cells, painted, finest, 0)
    if disputed is not None:
        want |= (y == 0) & np.asarray(disputed, dtype=bool) & _touches(cells, painted, finest, 1)
    if prior_logodds is not None:
        p = sigmoid(prior_logodds)
        want |= np.abs(p - y) >= config.disagreement
    if uncertain is not None and not config.refine_uncertain:
        want &= ~np.asarray(uncertain, dtype=bool)
    skip = set(opened)
    return [
        c
        for c, w, k in zip(cells, want, leaf, strict=True)
        if w and k and c not in skip and _deep_enough(c, height, width, config)
    ]


def search_small(
    cells: Sequence[Cell],
    labels: npt.ArrayLike,
    height: int,
    width: int,
    *,
    opened: Collection[Cell] = (),
    config: RefinementConfig = RefinementConfig(),
) -> list[Cell]:
    """Windows to open when every first-level cell of a target the image *is* tagged with came
    back negative: the object is too small to be seen in a ninth of the image (a sliver of each
    square it touches), so each of the nine cells is shown as its own 3x3 grid, once.

    Args:
        cells: the target's retired cells; labels: their answers (1 = yes).

    Returns:
        The level-1 cells whose windows open: those of the nine not open yet, or none (some
        answer was yes, or the cells would be too small).
    """
    y = np.asarray(labels).reshape(-1)
    first = [c for c in cells if c.level == 1]
    if len(first) != 9:
        return []
    # No finest answer is yes (checked first: it is cheap). A first cell that opened on a yes
    # whose own squares all came back no (a bad actor's yes, or one the evidence overturned)
    # must not stop the search ...
    leaf = leaf_cells(cells)
    if any(y[i] for i, is_leaf in enumerate(leaf) if is_leaf):
        return []
    # ... and every window opened under them decided (each square of the image in it retired).
    present = set(cells)
    for cell, is_leaf in zip(cells, leaf, strict=True):
        if is_leaf:
            continue
        inside = inside_children([cell], height, width, square=config.square)
        if any(child not in present for child in inside):
            return []
    return [c for c in sorted(first) if c not in opened and _deep_enough(c, height, width, config)]


def _deep_enough(cell: Cell, height: int, width: int, config: RefinementConfig) -> bool:
    child = cell.level + 1
    return (
        child <= config.max_level
        and min_cell_size(child, height, width, square=config.square) >= config.min_cell_px
    )


def windows(cells: Sequence[Cell]) -> list[tuple[Cell, tuple[Cell, ...]]]:
    """Each cell with the nine children its window shows."""
    return [(c, children(c)) for c in cells]
