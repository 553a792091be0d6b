"""Per-pixel mask composition: decided cells set their pixels, the image decides the border.

Volunteers answer "is any of <tag> in this square". A *no* is strong: none of the cell's pixels
show the object. A *yes* is weak: some of them do. So a mask painted in whole cells claims every
pixel of every positive border cell, and its IoU is capped by the size of the finest cells
(0.62 on the demo with perfect volunteers). This module composes the mask per pixel instead:

1. The finest cells (any mix of levels; finer cells override their ancestors) give each pixel
   its cell's posterior ``q`` and its cell's side in pixels.
2. A trimap follows from the answers' meaning:

   * **sure background**: pixels of cells decided negative beyond doubt (``q <= SURE_NEGATIVE``:
     a gold or curator *no*, or credible votes that agree), and of cells that lean negative
     (``q <= NEGATIVE``) on votes that all say *no* (``no_only``): what people saw, however
     few of them, until somebody says *yes* there. One newcomer's *no* leaves a first square at
     about 0.02, and a *no* taken for doubted lets the method spread the object into it: the
     demo's first windows with every answer right but given at one vote's confidence composed
     at IoU 0.63 against 0.72 with the same answers sure;
   * **sure foreground** (the *core*): pixels of decided positive cells (``q >= POSITIVE``)
     farther than ``CORE_CELLS`` cell sides from any pixel not claimed positive (the image's
     edge counts as unclaimed, so an object cut by the edge is not assumed to fill its cells);
   * **probably foreground** (the *band*): the other pixels of positive cells, where the object's
     border runs somewhere inside the cells the crowd said yes to;
   * **probably background**: pixels of undecided cells that lean negative, and of cells decided
     negative over a credible *yes* (``SURE_NEGATIVE < q <= NEGATIVE``). A crowd's *no* is
     wrong most often where the object is: two careful people who miss half an object in a
     square outvote the one who saw it, and the posterior (0.02 on such a 2-1 split, 1e-4 when
     all three agree) is what tells that *no* from a sure one. Next to the claim (within a
     cell's side of it), those pixels are the method's to take (``Trimap.reach``); elsewhere
     they stay out of the mask, but still tell the background's colours (``Trimap.negative``):
     a doubted *no* is background far more often than not.
   * and the **margin** of a voted *no* beside the claim (``MARGIN`` of the cell's side) is
     probably background too, however sure the votes: people say no to a square that shows a
     sliver of the object (2% of a square is easy to miss, and reCAPTCHA's users learn to skip
     it), so the object's border may run a little way into it. A known *no* (gold, a
     curator's: a posterior of exactly 0) has no margin.

3. A method decides the probable pixels (``METHODS``, ``get_method``):

   * ``cells``: the band keeps its cell's answer: the old whole-cell painting, a baseline;
   * ``model``: the segmenter's per-pixel probability, where one is given (else ``cells``);
   * ``grabcut``: GrabCut (Rother, Kolmogorov and Blake, SIGGRAPH 2004, as OpenCV implements it)
     initialised with the trimap, its probable labels seeded by the band's pixels in colours far
     more common in the band than in the *no* cells, unlike the common colours of the *no* cells
     away from the claim (a wrong *no* on a sliver is next to the claim) and unlike the
     background's colour where they are (a plane fitted to the *no* cells: light falls off
     across a scene). Colour models are fitted to the sure and probable regions and a graph cut
     on the image's edges places the border. It runs once per connected region of claimed cells,
     on a crop around that region's band (downscaled when large), so its cost follows the
     border, not the image, and each object of a tag gets colour models from its own
     surroundings. GrabCut ends near where it starts, so it starts twice, from that seed and
     from the band of the surely positive cells, and a third time from the segmenter's decision
     where there is a prediction, and where a *no* beside the claim is doubted, once more from
     the colour seed taken against the sure *no* cells alone (a careful volunteer's wrong *no*
     on a square the object fills made the object's colour the background's: on 3 demo
     campaign seeds, masks at 80 s per object +0.008 to +0.015, large objects +0.018 to
     +0.032), and keeps the cut that agrees best with the crowd's answers
     (``answers_agreement``: a cut that empties a sure *yes* cell loses), or where they do not
     tell, the cut whose colours and border look more like an object's (``cut_score``). The
     model is a start, not the seed: an early model (frozen-set mIoU 0.37) that replaced the
     colour seed took a demo campaign's final masks from 0.650 to 0.566; as a third start, 0.655
     (a coarse model on photograph-like scenes: 0.77 -> 0.89, an inverted one 0.77).

   Assumptions: the object differs from its surroundings in colour or edges near its border
   (GrabCut); a sure *no* cell is right, but for its margin (the consensus made it so, and
   gold checks it).

The soft mask is a per-pixel probability: the cell's posterior outside the band; in the band the
cell's posterior times the pixel's confidence, which grows from 0.5 at the decided border to 1 at
``RAMP_PX`` pixels from it (or the model's probability where the method is ``model``); a
probably-background pixel the method takes is at even odds. The hard mask is the method's
decision inside cells claimed positive and the probable background beside them
(``Trimap.reach``).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from ml.aggregation import grid
from ml.aggregation.rules import leaf_cells

NEGATIVE = 0.2  # a cell at or under this posterior leans negative: not the object's
SURE_NEGATIVE = 0.01  # ... and at or under this one it is sure background (see ``trimap``)
MARGIN = 0.15  # of a cell's side: how far into a voted *no* beside the claim a sliver may hide
POSITIVE = 0.8  # a cell at or over this posterior may hold sure foreground (its core)
CORE_CELLS = 1.5  # sure foreground starts farther from the border than a cell's diagonal (1.41)
RAMP_PX = 4.0  # band confidence reaches 1 this far from the decided border
GRABCUT_ITERATIONS = 3
BG_COLOURS = 8  # k-means centres of the sure background's colours (``unlike_background``)
BG_SAMPLE = 4000  # sure-background pixels they are fitted on
SEED_KEPT = 0.25  # less of the ratio's seed left by ``unlike_background``: the ratio alone
NEARBY_SHARE = 0.1  # of the pixels around one: a background colour seen near it
NEARBY_KEPT = 0.05  # less of the seed left by ``unlike_nearby_background``: it stands
FAR_BG_MIN = 100  # fewer sure-background pixels away from the claim: use all of them
FAR_CELLS = 1.5  # a GrabCut crop reaches this many cell sides past the band (``_crop``)
COLOUR_BINS = 8  # per channel, for the colour frequencies of ``object_coloured``
OBJECT_RATIO = 2.0  # a colour this much more common in the band than the background: the object's
SMOOTH_BAR = 2.0  # x the median distance of the sure background from its plane: unlike it
CONTRAST_PX = 4  # ``border_contrast`` compares the mean colours this far either side
AGREEMENT_NATS = 1.0  # a cut this much likelier under the crowd's answers is kept (``_better_cut``)
GRABCUT_MAX_PIXELS = 120_000  # larger crops run downscaled (GrabCut's cost grows with area)
GRABCUT_KEPT = 512  # cuts kept by their exact inputs (``_run_grabcut``)
# A claimed cell's posterior for an object known to be in the image that no cell claims
# (``claim_known_object``): over even odds, under the sure core's ``POSITIVE``.
KNOWN_CLAIM = 0.6

FloatMask = npt.NDArray[np.float32]
BoolMask = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class Trimap:
    """What the cells decide of each pixel. Shape: every field ``(H, W)``."""

    posterior: FloatMask  # the pixel's finest cell's posterior
    sure_fg: BoolMask
    sure_bg: BoolMask
    band: BoolMask  # probably foreground: in a positive cell, near the decided border
    claimed: BoolMask  # in a cell whose posterior is over 0.5
    positive: tuple[grid.PixelRect, ...]  # the finest cells claimed positive
    side: FloatMask | None = None  # the pixel's finest cell's shorter side in pixels
    doubted: BoolMask | None = None  # not claimed nor sure background, next to the claim
    said_no: BoolMask | None = None  # in a cell leaning negative whose votes all say *no*

    @property
    def reach(self) -> BoolMask:
        """Pixels a method may put in the mask: the claimed ones, and the doubted ones."""
        return self.claimed if self.doubted is None else self.claimed | self.doubted

    @property
    def negative(self) -> BoolMask:
        """Pixels of cells that lean negative, doubted or not: the background's colour sample
        (a doubted *no* is background far more often than not; ``SURE_NEGATIVE``)."""
        return np.asarray(self.posterior <= NEGATIVE)

    @property
    def surely_negative(self) -> BoolMask:
        """``negative`` without the doubted *no*s: pixels of cells whose *no* the votes agree
        on, or that gold or a curator answered (``SURE_NEGATIVE``), or that nobody said *yes*
        to (``said_no``), margins included."""
        sure = np.asarray(self.posterior <= SURE_NEGATIVE)
        return sure if self.said_no is None else sure | self.said_no

    @property
    def probable_bg(self) -> BoolMask:
        return ~(self.sure_fg | self.sure_bg | self.band)


@dataclass(frozen=True)
class Composed:
    """A composed mask. Shape: ``(H, W)`` each."""

    soft: FloatMask
    hard: BoolMask


def trimap(
    cells: Sequence[grid.Cell],
    probs: npt.ArrayLike,
    height: int,
    width: int,
    *,
    square: bool = False,
    no_only: npt.ArrayLike | None = None,
) -> Trimap:
    """The trimap of the module docstring from the finest cells and their posteriors
    (``square``: the pyramid's frame, ``ml.aggregation.grid``); ``no_only``: per cell, whether
    it has votes and every one of them says *no* (None: nothing is known of the votes, only the
    posteriors decide).

    Shape:
        probs, no_only ``(n_cells,)``; every field of the result ``(height, width)``.
    """
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    posterior, _ = grid.compose(cells, p, height, width, fill=0.5, square=square)
    said_no = None
    if no_only is not None:
        flags = np.asarray(no_only, dtype=np.float64).reshape(-1)
        plane, _ = grid.compose(cells, flags, height, width, fill=0.0, square=square)
        said_no = (plane > 0.5) & (posterior <= NEGATIVE)
    # A cell's side: of its whole view (a square the image's edge cuts keeps its side).
    views = (grid.cell_view(c, height, width, square=square) for c in cells)
    sides = np.asarray([min(r.height, r.width) for r in views], dtype=np.float32)
    side, _ = grid.compose(cells, sides, height, width, fill=1.0, square=square)
    claimed = posterior > 0.5
    # Distance of each claimed pixel to the nearest unclaimed one, the image's edge unclaimed.
    padded = np.pad(claimed, 1).astype(np.uint8)
    inside = cv2.distanceTransform(padded, cv2.DIST_L2, 3)[1:-1, 1:-1]  # (H, W)
    sure_fg = claimed & (posterior >= POSITIVE) & (inside > CORE_CELLS * side)
    sure_bg = posterior <= SURE_NEGATIVE
    if said_no is not None:
        sure_bg |= said_no
    positive = tuple(
        grid.cell_rect(c, height, width, square=square)
        for c, q, leaf in zip(cells, p, leaf_cells(cells), strict=True)
        if leaf and q > 0.5
    )
    doubted = None
    if claimed.any():
        outside = _distance_to(claimed)
        # A voted *no* is a person's "I see none of it"; a known one (0: gold, a curator) is not.
        sure_bg &= ~((outside <= MARGIN * side) & (posterior > 0.0))
        doubted = ~claimed & ~sure_bg & (outside <= side)
    band = claimed & ~sure_fg
    return Trimap(posterior, sure_fg, sure_bg, band, claimed, positive, side, doubted, said_no)


def _distance_to(claimed: BoolMask) -> FloatMask:
    """Each pixel's distance in pixels to the nearest claimed one (0 on the claim)."""
    return np.asarray(
        cv2.distanceTransform((~claimed).astype(np.uint8), cv2.DIST_L2, 3), np.float32
    )


def _keep_every_yes(tm: Trimap, hard: BoolMask, fallback: BoolMask | None = None) -> BoolMask:
    """A cell the crowd said shows the object keeps some of it: where the image method emptied
    one, its ``fallback`` pixels (those unlike the background) are claimed, or the whole cell
    when there are none."""
    hard = hard.copy()
    for r in tm.positive:
        cell = hard[r.top : r.bottom, r.left : r.right]
        if cell.size and not cell.any():
            keep = None if fallback is None else fallback[r.top : r.bottom, r.left : r.right]
            cell[...] = keep if keep is not None and keep.any() else True
    return hard


def _distance_ramp(fg: BoolMask) -> FloatMask:
    """Confidence of each pixel's label from its distance to the fg/bg border: 0.5 .. 1."""
    d_in = cv2.distanceTransform(fg.astype(np.uint8), cv2.DIST_L2, 3)
    d_out = cv2.distanceTransform((~fg).astype(np.uint8), cv2.DIST_L2, 3)
    d = np.where(fg, d_in, d_out)
    return np.clip(0.5 + d / (2.0 * RAMP_PX), 0.5, 1.0).astype(np.float32)


def _finish(tm: Trimap, fg: BoolMask, fallback: BoolMask | None = None) -> Composed:
    """Soft and hard masks from a per-pixel decision ``fg`` of the probable pixels."""
    hard = _keep_every_yes(tm, tm.sure_fg | (fg & tm.reach & ~tm.sure_bg), fallback)
    confidence = _distance_ramp(hard)
    in_object = np.where(hard, confidence, 1.0 - confidence)
    soft = np.where(tm.band, tm.posterior * in_object, tm.posterior)
    if tm.doubted is not None:  # the method's call, at even odds with the cell's *no*
        soft = np.where(tm.doubted & hard, 0.5 * in_object, soft)
    soft = np.where(tm.sure_fg, tm.posterior, soft)
    return Composed(soft.astype(np.float32), hard)


def compose_by_cells(tm: Trimap, image: np.ndarray, model: FloatMask | None) -> Composed:
    """The band keeps its cell's answer (whole-cell painting)."""
    hard = tm.claimed
    return Composed(tm.posterior.astype(np.float32), hard)


def compose_by_model(tm: Trimap, image: np.ndarray, model: FloatMask | None) -> Composed:
    """The band takes the segmenter's per-pixel decision (``cells`` without a model)."""
    if model is None:
        return compose_by_cells(tm, image, model)
    open_to_model = tm.band | (tm.reach & ~tm.claimed)
    hard = _keep_every_yes(tm, tm.sure_fg | (open_to_model & (model >= 0.5)))
    soft = np.where(tm.band, tm.posterior * model, tm.posterior)
    return Composed(soft.astype(np.float32), hard)


def _crop(band: BoolMask, side: FloatMask | None = None) -> tuple[slice, slice] | None:
    """A rectangle around the band with room for some sure pixels of both kinds (a quarter of
    the band's extent each way), or None. With ``side``, at least ``FAR_CELLS`` of the band's
    cells' sides each way: room for background away from the claim (``_next_to_claim``)."""
    rows, cols = np.nonzero(band)
    if rows.size == 0:
        return None
    h, w = band.shape
    extent = max(rows.max() - rows.min(), cols.max() - cols.min())
    pad = max(8, int(0.25 * extent))
    if side is not None:
        pad = max(pad, int(np.ceil(FAR_CELLS * float(np.median(side[band])))))
    top, bottom = max(0, rows.min() - pad), min(h, rows.max() + 1 + pad)
    left, right = max(0, cols.min() - pad), min(w, cols.max() + 1 + pad)
    return slice(top, bottom), slice(left, right)


def object_coloured(pixels: np.ndarray, sure_bg: BoolMask, band: BoolMask) -> BoolMask:
    """The pixels whose colour is at least ``OBJECT_RATIO`` times more common in the band
    than in the sure background around it (colours in ``COLOUR_BINS`` bins per channel).

    A *no* cell is clean background, which a *yes* cell is not: this is what seeds GrabCut's
    probable labels in the band when there is no model (a band that is mostly background, as
    around a small object, would otherwise teach GrabCut's object model the background). The
    band is a mixture of the object and the background around it, so the background's colours
    are no more common in it than in the sure background, and the object's colours are far more
    common. A ratio of frequencies, not "some background pixel has this colour", because a *no*
    is sometimes wrong: a careless crowd says no to a square that holds a sliver of the object,
    which puts a few of the object's pixels into the sure background, and one of them must not
    make the object's colour background. ``_grabcut_labels`` also asks that the colour be
    unlike the background's (``unlike_background``): a ratio alone lets through background
    colours that merely happen to be a little more common in a small band.

    Shape: pixels ``(H, W, 3)``, sure_bg, band and the result ``(H, W)``.
    """
    if not sure_bg.any() or not band.any():
        return band.copy()
    code = _colour_codes(pixels)  # (H*W,)
    n_bins = COLOUR_BINS**3
    in_band = np.bincount(code[band.reshape(-1)], minlength=n_bins) / band.sum()
    # One pseudo-pixel per bin: a colour the background never showed counts as rare in it.
    in_bg = (np.bincount(code[sure_bg.reshape(-1)], minlength=n_bins) + 1.0) / (
        sure_bg.sum() + n_bins
    )
    ratio = (in_band / in_bg)[code].reshape(band.shape)
    return ratio >= OBJECT_RATIO


def _colour_codes(pixels: np.ndarray) -> np.ndarray:
    """Each pixel's colour bin (``COLOUR_BINS`` per channel). Shape: ``(H, W, 3)`` -> ``(H*W,)``."""
    q = (pixels[:, :, :3].astype(np.int32) // (256 // COLOUR_BINS)).reshape(-1, 3)
    return np.asarray(((q[:, 0] * COLOUR_BINS) + q[:, 1]) * COLOUR_BINS + q[:, 2])


def unlike_smooth_background(
    pixels: np.ndarray, sure_bg: BoolMask, candidates: BoolMask, rng_seed: int = 0
) -> BoolMask:
    """The ``candidates`` whose colour is unlike the background's colour *where they are*: a
    plane in (row, column) per channel, fitted to the sure background, predicts it, and a
    candidate farther from its prediction than ``SMOOTH_BAR`` times the sure background's median
    distance from it is unlike.

    Light falls off across a scene, so a background is a gradient more often than one set of
    colours: the *yes* cells' background is then lighter (or warmer) than the *no* cells' on
    average, its shades are "more common in the band" (``object_coloured``), and GrabCut took
    the lit side of the band for the object (demo_0003's circle at the first level: IoU 0.22
    with the crowd's answers). A plane carries the gradient across the band. The fit is made
    twice, the second time without the pixels far from the first (a wrong *no* on part of the
    object puts its colour in the sure background; the median is what it cannot move).

    Shape: pixels ``(H, W, 3)``, sure_bg, candidates and the result ``(H, W)``.
    """
    n_bg = int(sure_bg.sum())
    if n_bg < FAR_BG_MIN or not candidates.any():
        return candidates.copy()
    scale = float(max(sure_bg.shape))

    def plane(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:  # (n, 3)
        return np.stack([np.ones(len(rows)), rows / scale, cols / scale], axis=1)

    rows, cols = np.nonzero(sure_bg)
    pick = np.random.default_rng(rng_seed).permutation(n_bg)[:BG_SAMPLE]
    rows, cols = rows[pick], cols[pick]
    colours = pixels[rows, cols, :3].astype(np.float64)  # (n, 3)
    x = plane(rows, cols)
    kept = np.ones(len(x), dtype=bool)
    for _ in range(2):
        coef, *_ = np.linalg.lstsq(x[kept], colours[kept], rcond=None)  # (3, 3)
        distance = np.linalg.norm(colours - x @ coef, axis=1)
        bar = SMOOTH_BAR * float(np.median(distance))
        kept = distance <= bar
    cr, cc = np.nonzero(candidates)
    seen = pixels[cr, cc, :3].astype(np.float64)
    out = np.zeros_like(candidates)
    out[cr, cc] = np.linalg.norm(seen - plane(cr, cc) @ coef, axis=1) > bar
    return out


def _background_colours(
    pixels: np.ndarray, sure_bg: BoolMask, rng_seed: int, samples: np.ndarray | None = None
) -> tuple[np.ndarray, float] | None:
    """``BG_COLOURS`` k-means centres of the sure background's colours (or of ``samples`` of
    background colours, when given) and the distance within which 95% of its pixels lie from
    their nearest centre; None with too few pixels.

    Shape: pixels ``(H, W, 3)``, sure_bg ``(H, W)``, samples ``(N, 3)``; centres
    ``(BG_COLOURS, 3)``.
    """
    bg = (pixels[sure_bg] if samples is None else samples).astype(np.float32)  # (N, 3)
    if len(bg) < BG_COLOURS:
        return None
    sample = bg[np.random.default_rng(rng_seed).permutation(len(bg))[:BG_SAMPLE]]
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 10, 1.0)
    cv2.setRNGSeed(rng_seed)
    _, _, centres = cv2.kmeans(sample, BG_COLOURS, None, criteria, 1, cv2.KMEANS_PP_CENTERS)
    return centres, float(np.quantile(_distances(sample, centres).min(axis=1), 0.95))


def _distances(colours: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Euclidean colour distances. Shape: colours ``(N, 3)``, centres ``(K, 3)``, out ``(N, K)``."""
    d = colours.astype(np.float32)[:, None, :] - centres[None, :, :]
    return np.sqrt((d**2).sum(axis=2))


def unlike_background(
    pixels: np.ndarray, sure_bg: BoolMask, rng_seed: int = 0, samples: np.ndarray | None = None
) -> BoolMask:
    """Pixels whose colour no sure-background pixel has: farther from every one of
    ``BG_COLOURS`` k-means centres of the sure background (or of ``samples`` of background
    colours from elsewhere) than 95% of its own pixels are.

    A *no* cell is clean background, which a *yes* cell is not: this is what seeds GrabCut's
    probable labels in the band when there is no model (a band that is mostly background, as
    around a small object, would otherwise teach GrabCut's object model the background).

    Shape: pixels ``(H, W, 3)``, sure_bg and the result ``(H, W)``.
    """
    fitted = _background_colours(pixels, sure_bg, rng_seed, samples)
    if fitted is None:
        return np.ones(sure_bg.shape, dtype=bool)
    centres, bar = fitted
    return (_distances(pixels.reshape(-1, 3), centres).min(axis=1) > bar).reshape(sure_bg.shape)


def unlike_nearby_background(
    pixels: np.ndarray, sure_bg: BoolMask, candidates: BoolMask, radius: float, rng_seed: int = 0
) -> BoolMask:
    """The ``candidates`` whose colour is unlike every background colour seen near them: for
    each k-means colour of the sure background (``_background_colours``), a candidate within
    its distance of it is background-like if that colour's sure-background pixels fill at
    least ``NEARBY_SHARE`` of the box of ``radius`` pixels around it.

    A background is seldom one set of colours over a whole image: light falls off, a wall
    meets a floor, and a tint near the object can be rare far away, where a global test lets
    it seed the object. The share is of the whole box, not of its background pixels: a wrong
    *no* on a sliver of the object puts a few of the object's pixels into the sure background
    beside it, and they must not make its colour background (a colour must be common there).

    Shape: pixels ``(H, W, 3)``, sure_bg, candidates and the result ``(H, W)``.
    """
    fitted = _background_colours(pixels, sure_bg, rng_seed)
    if fitted is None or not candidates.any():
        return candidates.copy()
    centres, bar = fitted
    nearest = np.full(sure_bg.shape, -1, dtype=np.int32)  # (H, W): a bg pixel's colour
    nearest[sure_bg] = _distances(pixels[sure_bg], centres).argmin(axis=1)
    near_centre = _distances(pixels[candidates], centres) <= bar  # (n_candidates, K)
    box = (2 * int(radius) + 1, 2 * int(radius) + 1)
    like = np.zeros(int(candidates.sum()), dtype=bool)
    for k in range(len(centres)):
        share = cv2.blur((nearest == k).astype(np.float32), box)[candidates]
        like |= near_centre[:, k] & (share > NEARBY_SHARE)
    out = np.zeros_like(candidates)
    out[candidates] = ~like
    return out


def _grabcut_labels(
    tm: Trimap,
    pixels: np.ndarray,
    model: FloatMask | None,
    far: np.ndarray | None = None,
    negative: BoolMask | None = None,
) -> np.ndarray:
    """GrabCut's initial labels on a crop: the trimap, and in the band the model's decision,
    or else the object's colours (all of the band if none stand out): those far more common in
    the band than in the sure background (``object_coloured``) and unlike every common colour
    of the sure background away from the claimed cells (``unlike_background``), then of
    the background colours seen near them (``unlike_nearby_background``), then of the
    background's gradient (``unlike_smooth_background``).

    The second test's background leaves out the *no* cells next to the claimed ones, where a
    wrong *no* on a sliver of the object would put the object's colour among the background's
    common colours. Sure background is ``GC_BGD`` everywhere: a *no* cell in the object's colour
    is more often a neighbouring thing of that colour than a wrong *no*, and relabelling those
    pixels as probable object hid the neighbour's colour from the background model.

    ``far``: colours of the sure background away from the claim around the crop, for when the
    crop holds too little of it (a crop around a small claim may hold none): the fallback, all
    of the crop's sure background, holds the *no* cells next to the claim.

    ``negative``: the cells whose colours are the background's sample, ``tm.negative`` (the
    cells that lean negative, doubted or not) unless given."""
    labels = np.full(tm.band.shape, cv2.GC_PR_BGD, dtype=np.uint8)  # (h, w)
    if model is not None:
        probable_fg = tm.band & (model >= 0.5)
    else:
        negative = tm.negative if negative is None else negative
        far_bg = negative & ~_next_to_claim(tm)
        coloured = tm.band & object_coloured(pixels, negative, tm.band)
        if far_bg.sum() >= FAR_BG_MIN:
            unlike = unlike_background(pixels, far_bg)
        elif far is not None and len(far) >= FAR_BG_MIN:  # the crop holds too little of it
            unlike = unlike_background(pixels, far_bg, samples=far)
        else:
            unlike = unlike_background(pixels, negative)
        probable_fg = coloured & unlike
        if probable_fg.sum() < SEED_KEPT * coloured.sum():
            # Most of the band's own colours are common in the background too: the object is
            # coloured like its surroundings, and the second test would leave GrabCut's object
            # model a sample too small to learn it from; the frequency ratio alone decides.
            probable_fg = coloured
        if not probable_fg.any():
            probable_fg = tm.band
        # The same test against the background colours seen near each pixel; where it leaves
        # next to nothing, a neighbour of the object's colour sits in the *no* cells beside it
        # (a yellow circle by a yellow triangle) and the test above stands.
        radius = float(np.median(tm.side[tm.band])) if tm.side is not None else 16.0
        nearby = unlike_nearby_background(pixels, tm.sure_bg, probable_fg, max(8.0, radius))
        if nearby.sum() >= NEARBY_KEPT * probable_fg.sum():
            probable_fg = nearby
        # And against the background's gradient (``unlike_smooth_background``); where it leaves
        # next to nothing, the object's colours lie on it, and the seed stands. (A relative
        # floor like ``SEED_KEPT`` would undo it where it matters most: a seed that is mostly
        # the band's lit background keeps a fifth of itself, the object.)
        smooth = unlike_smooth_background(pixels, tm.sure_bg, probable_fg)
        if smooth.sum() >= NEARBY_KEPT * probable_fg.sum():
            probable_fg = smooth
    labels[probable_fg] = cv2.GC_PR_FGD
    labels[tm.sure_bg] = cv2.GC_BGD
    labels[tm.sure_fg] = cv2.GC_FGD
    return labels


def _next_to_claim(tm: Trimap) -> BoolMask:
    """Pixels within one of their cell's sides of a pixel claimed positive: the *no* cells where
    a careless crowd's wrong *no* on a sliver of the object would be."""
    d = _distance_to(tm.claimed)
    side = tm.side if tm.side is not None else np.ones(d.shape, dtype=np.float32)
    return np.asarray(d <= side)


class _KeptCuts:
    """The last ``GRABCUT_KEPT`` cuts by a digest of their inputs (the crop's pixels and its
    initial labels), so that composing a target again after answers that moved no cell across a
    threshold of the trimap (most of them) does not cut again: GrabCut is deterministic
    (``cv2.setRNGSeed``) and most of a composition's time."""

    def __init__(self, size: int) -> None:
        self.size, self.lock = size, threading.Lock()
        # A cut's bits, packed (a server keeps at most size x crop area / 8 bytes), and shape.
        self.cuts: OrderedDict[bytes, tuple[np.ndarray, tuple[int, int]] | None] = OrderedDict()
        self.hits = self.misses = 0

    @staticmethod
    def key(pixels: np.ndarray, labels: np.ndarray) -> bytes:
        digest = hashlib.blake2b(repr((pixels.shape, labels.shape)).encode(), digest_size=16)
        digest.update(np.ascontiguousarray(pixels).data)
        digest.update(np.ascontiguousarray(labels).data)
        return digest.digest()

    def get(self, key: bytes) -> tuple[bool, BoolMask | None]:
        with self.lock:
            if key not in self.cuts:
                self.misses += 1
                return False, None
            self.hits += 1
            self.cuts.move_to_end(key)
            kept = self.cuts[key]
        if kept is None:
            return True, None
        bits, (h, w) = kept
        return True, np.unpackbits(bits, count=h * w).reshape(h, w).astype(bool)

    def put(self, key: bytes, cut: BoolMask | None) -> None:
        kept = None if cut is None else (np.packbits(cut), (cut.shape[0], cut.shape[1]))
        with self.lock:
            self.cuts[key] = kept
            while len(self.cuts) > self.size:
                self.cuts.popitem(last=False)


KEPT_CUTS = _KeptCuts(GRABCUT_KEPT)


def _run_grabcut(pixels: np.ndarray, labels: np.ndarray) -> BoolMask | None:
    """GrabCut on one crop, downscaled past ``GRABCUT_MAX_PIXELS``. Returns foreground, or None
    where the (downscaled) labels hold no sample of the object or none of the background, which
    GrabCut cannot start from. The same inputs again are answered from ``KEPT_CUTS``."""
    key = KEPT_CUTS.key(pixels, labels)
    kept, cut = KEPT_CUTS.get(key)
    if not kept:
        cut = _grabcut(pixels, labels)
        KEPT_CUTS.put(key, cut)
    return cut


def _grabcut(pixels: np.ndarray, labels: np.ndarray) -> BoolMask | None:
    """``_run_grabcut`` without the kept cuts."""
    h, w = labels.shape
    scale = min(1.0, float(np.sqrt(GRABCUT_MAX_PIXELS / (h * w))))
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        pixels = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
        labels = cv2.resize(labels, size, interpolation=cv2.INTER_NEAREST)
    else:
        labels = labels.copy()  # GrabCut writes its cut into them: the caller's stay as given
    fg_like = (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)
    if fg_like.all() or not fg_like.any():
        return None
    fg_models, bg_models = np.zeros((1, 65)), np.zeros((1, 65))
    cv2.setRNGSeed(0)  # GrabCut's colour models start from k-means: the same mask every time
    cv2.grabCut(
        pixels,
        labels,
        (0, 0, 0, 0),
        bg_models,
        fg_models,
        GRABCUT_ITERATIONS,
        cv2.GC_INIT_WITH_MASK,
    )
    fg = ((labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)).astype(np.uint8)
    if scale < 1.0:
        fg = cv2.resize(fg, (w, h), interpolation=cv2.INTER_NEAREST)
    return fg.astype(bool)


def compose_by_grabcut(tm: Trimap, image: np.ndarray, model: FloatMask | None) -> Composed:
    """GrabCut decides the band (see the module docstring); ``cells`` where it cannot run."""
    if not tm.band.any():
        return _finish(tm, tm.claimed)
    # One GrabCut per connected region of claimed cells, on a crop around its band: a tag's
    # several objects (or pieces) each get colour models from their own surroundings.
    n, comp = cv2.connectedComponents(tm.claimed.astype(np.uint8), connectivity=8)
    parts = [comp == i for i in range(1, n)]
    doubted = tm.reach & ~tm.claimed
    rgb = _rgb(image)
    far_bg = tm.negative & ~_next_to_claim(tm)
    fg = np.zeros(tm.band.shape, dtype=bool)
    fallback = np.zeros(tm.band.shape, dtype=bool)
    for part in parts:
        window = _crop(part & tm.band)
        if window is None:
            fg |= part & tm.claimed
            continue
        pixels = np.ascontiguousarray(rgb[window])
        # Background away from the claim, from a wider window than the crop GrabCut runs on.
        outer = _crop(part & tm.band, tm.side)
        far = None if outer is None else rgb[outer][far_bg[outer]]
        cropped = _cropped(tm, window)
        labels = _grabcut_labels(cropped, pixels, None, far)
        fallback[window] |= (labels == cv2.GC_PR_FGD) & part[window]
        reach = (part | doubted)[window]
        seeds = [labels]
        if (cropped.negative & ~cropped.surely_negative).any():
            # A doubted *no* is background more often than not, so its colours are in the
            # background's sample; where it is the object's (a careful volunteer's slip on a
            # square the object fills), they make the object's colour background and the cut
            # takes something else: the sure *no*s' colours alone are another start.
            sure = cropped.surely_negative
            seeds.append(_grabcut_labels(cropped, pixels, None, far, negative=sure))
        if model is not None:
            seeds.append(_grabcut_labels(cropped, pixels, _crop_of(model, window), far))
        band = _band_labels(cropped)
        if not any(np.array_equal(band, seed) for seed in seeds):
            seeds.append(band)
        cuts = [_cut(pixels, seed, reach) for seed in seeds]
        cells = [(r, float(tm.posterior[r.top, r.left])) for r in tm.positive if _meets(r, window)]
        fg[window] |= _better_cut(cuts, pixels, cells, window)
    return _finish(tm, fg, fallback)


def _cut(pixels: np.ndarray, labels: np.ndarray, reach: BoolMask) -> BoolMask:
    """GrabCut's foreground from initial ``labels``, within ``reach``. Without samples of both
    kinds GrabCut cannot run: its initial labels stand (a tiny object in a large band, say,
    whose few pixels the downscaling lost)."""
    cut = _run_grabcut(pixels, labels)
    if cut is None:
        cut = (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)
    return (cut & reach) | (labels == cv2.GC_FGD)


def _meets(r: grid.PixelRect, window: tuple[slice, slice]) -> bool:
    """Whether the cell ``r`` has pixels in the crop ``window``."""
    rows, cols = window
    return max(r.top, rows.start) < min(r.bottom, rows.stop) and max(r.left, cols.start) < min(
        r.right, cols.stop
    )


def answers_agreement(
    cut: BoolMask, cells: Sequence[tuple[grid.PixelRect, float]], window: tuple[slice, slice]
) -> float:
    """How well a ``cut`` of the crop ``window`` agrees with the crowd's answers on the cells
    claimed positive: the log-likelihood of "it shows some of the object" for each cell the cut
    touches (``log q``) and "none of it" for each it leaves empty (``log(1 - q)``), ``q`` the
    cell's posterior. A cut that empties a sure *yes* loses much; one that fills or empties a
    doubtful cell (a posterior just over even odds, where a crowd's mistakes are) loses little.

    Shape: cut ``(h, w)`` of the crop; cells in the image's pixels.
    """
    rows, cols = window
    total = 0.0
    for r, q in cells:
        q = min(max(q, 1e-4), 1.0 - 1e-4)
        part = cut[
            max(r.top, rows.start) - rows.start : min(r.bottom, rows.stop) - rows.start,
            max(r.left, cols.start) - cols.start : min(r.right, cols.stop) - cols.start,
        ]
        total += float(np.log(q) if part.any() else np.log1p(-q))
    return total


def _better_cut(
    cuts: Sequence[BoolMask],
    pixels: np.ndarray,
    cells: Sequence[tuple[grid.PixelRect, float]],
    window: tuple[slice, slice],
) -> BoolMask:
    """Of GrabCut's cuts from its two starts, the one that agrees with the crowd's answers
    (``answers_agreement``) by more than ``AGREEMENT_NATS``; else the one whose colours and
    border look more like an object's (``cut_score``)."""
    if len(cuts) == 1:
        return cuts[0]
    agreement = [answers_agreement(cut, cells, window) for cut in cuts]
    best = int(np.argmax(agreement))
    if agreement[best] - min(agreement) > AGREEMENT_NATS:
        return cuts[best]
    return max(cuts, key=lambda cut: cut_score(cut, pixels))


def _band_labels(tm: Trimap) -> np.ndarray:
    """GrabCut's initial labels with the band of the surely positive cells (``POSITIVE``)
    probably the object: the second start of ``compose_by_grabcut``, for when the colour seed of
    ``_grabcut_labels`` took the wrong colours (a shaded object, a background coloured like it
    in places). Cells just over even odds stay out of it: that is where a crowd's mistakes are,
    and a wrong *yes* handed whole to GrabCut's object model teaches it the background."""
    labels = np.full(tm.band.shape, cv2.GC_PR_BGD, dtype=np.uint8)
    labels[tm.band & (tm.posterior >= POSITIVE)] = cv2.GC_PR_FGD
    labels[tm.sure_bg] = cv2.GC_BGD
    labels[tm.sure_fg] = cv2.GC_FGD
    return labels


def colour_separation(cut: BoolMask, pixels: np.ndarray) -> float:
    """How well colour tells the ``cut`` from the rest of the crop: the uncertainty coefficient
    of the label given the pixel's colour (``COLOUR_BINS`` bins per channel), 0 (colour says
    nothing) .. 1 (colour says all); -1 for a cut that is empty or everything.

    A cut that took background along with the object mixes the two colour populations, and one
    that took the lit half of the background splits one population in two: either way the
    colours predict the label less well than a cut along the object's own border.

    Shape: cut ``(h, w)``, pixels ``(h, w, 3)``.
    """
    n, k = cut.size, int(cut.sum())
    if k == 0 or k == n:
        return -1.0
    code = _colour_codes(pixels)
    n_bins = COLOUR_BINS**3
    inside = np.bincount(code[cut.reshape(-1)], minlength=n_bins).astype(np.float64)
    outside = np.bincount(code[~cut.reshape(-1)], minlength=n_bins).astype(np.float64)
    total = inside + outside
    p = k / n
    h_label = -(p * np.log(p) + (1.0 - p) * np.log(1.0 - p))
    h_given_colour = 0.0
    for counts in (inside, outside):
        seen = counts > 0
        h_given_colour -= float((counts[seen] / n * np.log(counts[seen] / total[seen])).sum())
    return (h_label - h_given_colour) / h_label


def border_contrast(cut: BoolMask, pixels: np.ndarray) -> float:
    """Mean colour difference across the ``cut``'s border: at each border pixel, the mean
    colour of the cut's pixels within ``CONTRAST_PX`` against that of the other pixels there;
    -1 without a border. Texture averages out on both sides; a border through a flat stretch
    (a cell's edge in the background) scores near 0.

    Shape: cut ``(h, w)``, pixels ``(h, w, 3)``.
    """
    eroded = cv2.erode(
        cut.astype(np.uint8), np.ones((3, 3), np.uint8), borderType=cv2.BORDER_REPLICATE
    )
    border = cut & ~eroded.astype(bool)
    if not border.any() or cut.all():
        return -1.0
    colours = pixels[:, :, :3].astype(np.float32)
    box = (2 * CONTRAST_PX + 1, 2 * CONTRAST_PX + 1)
    inside = cut.astype(np.float32)
    means = []
    for weight in (inside, 1.0 - inside):
        share = np.maximum(cv2.blur(weight, box), 1e-6)[..., None]
        means.append(cv2.blur(colours * weight[..., None], box) / share)
    return float(np.linalg.norm(means[0] - means[1], axis=2)[border].mean())


def cut_score(cut: BoolMask, pixels: np.ndarray) -> float:
    """Which of GrabCut's cuts to keep: colour separation times border contrast (each from the
    crop alone, no truth). GrabCut converges on whatever its start suggests, and no one start
    wins everywhere: the colour seed of ``_grabcut_labels`` (0.40 at the second level on
    photograph-like scenes with perfect answers) against the plain band (0.47), and per
    object each is sometimes right where the other fails (0.02 against 0.94). Keeping the
    cut whose colours and border look like an object's: 0.48; with the answers' agreement
    asked first (``_better_cut``), 0.58 (``bench/ceiling.py``). -1 for a cut that is empty
    or everything."""
    separation = colour_separation(cut, pixels)
    if separation < 0:  # empty, or everything: no border to judge
        return -1.0
    return separation * border_contrast(cut, pixels)


def _cropped(tm: Trimap, window: tuple[slice, slice]) -> Trimap:
    return Trimap(
        tm.posterior[window],
        tm.sure_fg[window],
        tm.sure_bg[window],
        tm.band[window],
        tm.claimed[window],
        (),
        None if tm.side is None else tm.side[window],
        None if tm.doubted is None else tm.doubted[window],
        None if tm.said_no is None else tm.said_no[window],
    )


def _crop_of(model: FloatMask | None, window: tuple[slice, slice]) -> FloatMask | None:
    return None if model is None else model[window]


def _rgb(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 from grey, RGB or RGBA."""
    pixels = np.asarray(image)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    return np.ascontiguousarray(pixels[:, :, :3].astype(np.uint8))


Method = Callable[[Trimap, np.ndarray, FloatMask | None], Composed]

METHODS: dict[str, Method] = {
    "cells": compose_by_cells,
    "model": compose_by_model,
    "grabcut": compose_by_grabcut,
}
DEFAULT_METHOD = "grabcut"


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(
            f"unknown composition method {name!r}; choose one of {', '.join(METHODS)}"
        ) from None


def claim_known_object(probs: npt.ArrayLike, evidence: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """The cells' probabilities with an object that is known to be in the image (a tag people
    gave) placed where the crowd's answers lean, when no cell claims it: the cells whose votes
    lean towards "yes" (``evidence``: the votes' log-likelihood ratio, the posterior's log-odds
    less the prior's, > 0), the likeliest of them, rise to ``KNOWN_CLAIM``; the image decides
    their pixels as in any claimed cell.

    A small object is searched for square by square from a prior of a few percent
    (``ml.aggregation.rules.SEARCH_PRIOR``), so the square where credible people saw it
    stays under even odds until several agree (two "yes" and one "no" from a sure prior leave
    it at 0.1-0.25), and a mask composed on even odds alone is empty while the search goes
    on, and after it ends on split answers. Unchanged when some cell is over even odds, or no
    vote leans "yes" (an object nobody saw has no place to put it).

    Shape: probs, evidence and the result ``(n_cells,)``.
    """
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    e = np.asarray(evidence, dtype=np.float64).reshape(-1)
    if p.shape != e.shape:
        raise ValueError(f"got {p.shape[0]} probabilities but {e.shape[0]} evidences")
    leaning = e > 0
    if not leaning.any() or (p > 0.5).any():
        return p
    likeliest = leaning & (p >= p[leaning].max())
    return np.where(likeliest, np.maximum(p, KNOWN_CLAIM), p)


def compose_mask(
    image: np.ndarray,
    cells: Sequence[grid.Cell],
    probs: npt.ArrayLike,
    *,
    model: npt.ArrayLike | None = None,
    method: str = DEFAULT_METHOD,
    square: bool = False,
    no_only: npt.ArrayLike | None = None,
) -> Composed:
    """A target's soft and hard mask from its finest cells and the image (module docstring).

    Args:
        image: the image's pixels, grey or RGB(A), uint8.
        cells: the target's finest cells, any levels (finer ones override their ancestors).
        probs: each cell's posterior that it shows the object (gold and curator answers 0/1).
        model: the segmenter's per-pixel probability, if there is one.
        method: a name of ``METHODS``.
        square: the pyramid's frame (``ml.aggregation.grid``): square cells, or the image's.
        no_only: each cell's votes all say *no* (``trimap``); None when not known.

    Shape:
        image ``(H, W)`` or ``(H, W, C)``; probs, no_only ``(n_cells,)``; model and the result
        ``(H, W)``.
    """
    h, w = int(image.shape[0]), int(image.shape[1])
    prob = None if model is None else np.asarray(model, dtype=np.float32)
    if prob is not None and prob.shape != (h, w):
        raise ValueError(f"model probability has shape {prob.shape}, the image ({h}, {w})")
    tm = trimap(cells, probs, h, w, square=square, no_only=no_only)
    return get_method(method)(tm, image, prob)
