"""The grid pyramid: cell addresses, pixel rectangles, mask composition and cell coverage.

Level ``k`` splits the pyramid's *frame* into ``3**k x 3**k`` cells. Level 0 is the frame. A
window is one cell of level ``k - 1`` shown as its nine children of level ``k``. Two frames:

* **square** (``square=True``, every new project): the square around the image, the image
  centred in it, so every cell is a square in image space (a 600 x 900 image lies in a 900 x
  900 frame; its level-1 cells are 300 x 300 squares, of which the top row holds the image's
  rows 0-150, the middle row 150-450 and the bottom row 450-600). Cells the image's edge cuts
  hold fewer pixels than their square; cells wholly outside the image hold none (*empty*).
* **image** (``square=False``, projects made before square cells): the image itself, so cells
  follow its aspect ratio (a 300 x 900 image has 100 x 300 cells at level 1).

Pixel boundaries are integers. Along an axis of ``size`` pixels in a frame of ``side >= size``
(the image centred), ``edge(i) = clip(floor((2 i side - n (side - size)) / 2n), 0, size)`` for
``i = 0 .. n = 3**k`` (``floor(i * size / n)`` when ``side == size``). They partition the image
exactly, and since ``edge_k(i) == edge_{k+1}(3 * i)`` the nine children of a cell tile their
parent exactly, at any image size. Empty cells (zero pixels: outside the image, or ``size <
3**k``) have coverage 0.

Every function takes the pixel size of the array it works on; an array of the image resized to
another size keeps the image's frame as long as it keeps its aspect ratio.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]


class Cell(NamedTuple):
    """Address of one cell of the grid pyramid: level k, row and column in ``[0, 3**k)``."""

    level: int
    row: int
    col: int


class PixelRect(NamedTuple):
    """Half-open pixel rectangle ``[top, bottom) x [left, right)``."""

    top: int
    left: int
    bottom: int
    right: int

    @property
    def height(self) -> int:
        return self.bottom - self.top

    @property
    def width(self) -> int:
        return self.right - self.left


ROOT = Cell(0, 0, 0)


def cells_per_side(level: int) -> int:
    """Number of cells along each side at ``level`` (``3**level``)."""
    if level < 0:
        raise ValueError(f"level must be >= 0, got {level}")
    return int(3**level)


def check_cell(cell: Cell) -> None:
    """Raise ValueError if ``cell`` is not a valid address."""
    n = cells_per_side(cell.level)
    if not (0 <= cell.row < n and 0 <= cell.col < n):
        raise ValueError(f"cell {cell} out of range: row and col must be in [0, {n})")


def frame_side(height: int, width: int, *, square: bool) -> tuple[int, int]:
    """The frame's (height, width) around an image of ``height x width`` pixels."""
    if not square:
        return height, width
    side = max(height, width)
    return side, side


def _axis_edges(
    index: IntArray, n: IntArray | int, size: int, side: int, *, clip: bool = True
) -> IntArray:
    """Pixel boundaries ``index / n`` of the way along a frame of ``side`` centred on ``size``
    pixels, clipped to the image unless ``clip`` is False (see the module's docstring)."""
    if side == size:  # the image frame: the exact old formula
        return (index * size) // n
    raw = (2 * index * side - n * (side - size)) // (2 * n)
    return np.clip(raw, 0, size) if clip else raw


def edges(level: int, size: int, *, side: int | None = None) -> IntArray:
    """Integer cell boundaries along one axis.

    Args:
        level: pyramid level k.
        size: image size along the axis in pixels.
        side: the frame's size along the axis (``frame_side``); None: the image's.

    Returns:
        ``(3**k + 1,)`` int64 array, non-decreasing; first 0, last ``size``.
    """
    n = cells_per_side(level)
    return _axis_edges(np.arange(n + 1, dtype=np.int64), n, size, size if side is None else side)


def cell_rect(cell: Cell, height: int, width: int, *, square: bool = False) -> PixelRect:
    """Pixel rectangle of ``cell`` in an image of ``height x width`` pixels (empty when the cell
    lies outside the image)."""
    check_cell(cell)
    top, left, bottom, right = _rects([cell], height, width, square=square)
    return PixelRect(int(top[0]), int(left[0]), int(bottom[0]), int(right[0]))


def holds_pixels(cell: Cell, height: int, width: int, *, square: bool = False) -> bool:
    """Whether any pixel of the image is in ``cell`` (not so for a cell of the square frame's
    margin, nor for a cell finer than a pixel)."""
    check_cell(cell)
    return bool(cells_hold_pixels([cell], height, width, square=square)[0])


def cells_hold_pixels(
    cells: Sequence[Cell], height: int, width: int, *, square: bool = False
) -> BoolArray:
    """``holds_pixels`` of each cell. Shape: ``(n_cells,)``."""
    if not len(cells):
        return np.zeros(0, dtype=bool)
    top, left, bottom, right = _rects(cells, height, width, square=square)
    return np.asarray((bottom > top) & (right > left))


def inside_children(
    parents: Sequence[Cell], height: int, width: int, *, square: bool = False
) -> list[Cell]:
    """The parents' children that hold pixels of the image (``holds_pixels``)."""
    return [
        child
        for cell in parents
        for child in children(cell)
        if holds_pixels(child, height, width, square=square)
    ]


def cell_view(cell: Cell, height: int, width: int, *, square: bool = False) -> PixelRect:
    """The whole of ``cell`` in image pixels, not clipped to the image: in the square frame a
    square that may reach past the image's edge (negative, or past ``height``/``width``), which
    a tile shows padded; in the image frame ``cell_rect``."""
    check_cell(cell)
    n = cells_per_side(cell.level)
    fh, fw = frame_side(height, width, square=square)
    rows = _axis_edges(np.array([cell.row, cell.row + 1]), n, height, fh, clip=False)
    cols = _axis_edges(np.array([cell.col, cell.col + 1]), n, width, fw, clip=False)
    return PixelRect(int(rows[0]), int(cols[0]), int(rows[1]), int(cols[1]))


def cell_side(level: int, height: int, width: int, *, square: bool = False) -> int:
    """The side in image pixels of a whole cell at ``level``: the frame's short side over
    ``3**level`` (a cell the image's edge cuts shows fewer pixels, and its tile the rest of its
    square around them)."""
    fh, fw = frame_side(height, width, square=square)
    return min(fh, fw) // cells_per_side(level)


def cells_rect(
    cells: Sequence[Cell], height: int, width: int, *, square: bool = False
) -> PixelRect:
    """The smallest pixel rectangle that holds all of ``cells`` (a window's nine children, or
    a block of nine shifted over neighbouring windows: the area a grid task shows)."""
    rects = [cell_rect(c, height, width, square=square) for c in cells]
    rects = [r for r in rects if r.height > 0 and r.width > 0] or rects
    return PixelRect(
        min(r.top for r in rects),
        min(r.left for r in rects),
        max(r.bottom for r in rects),
        max(r.right for r in rects),
    )


def children(cell: Cell) -> tuple[Cell, ...]:
    """The nine children of ``cell`` (its window), row-major."""
    check_cell(cell)
    level, r, c = cell.level + 1, 3 * cell.row, 3 * cell.col
    return tuple(Cell(level, r + dr, c + dc) for dr in range(3) for dc in range(3))


def parent(cell: Cell) -> Cell:
    """The cell one level up that contains ``cell``; the root has no parent."""
    check_cell(cell)
    if cell.level == 0:
        raise ValueError("the level-0 cell (the whole image) has no parent")
    return Cell(cell.level - 1, cell.row // 3, cell.col // 3)


def ancestor(cell: Cell, level: int) -> Cell:
    """The cell at ``level`` (<= cell.level) that contains ``cell``."""
    if not 0 <= level <= cell.level:
        raise ValueError(f"ancestor level {level} must be in [0, {cell.level}]")
    f = 3 ** (cell.level - level)
    return Cell(level, cell.row // f, cell.col // f)


def cell_arrays(cells: Sequence[Cell]) -> tuple[IntArray, IntArray, IntArray]:
    """Split a sequence of cells into (levels, rows, cols) int64 arrays, validating each."""
    arr = np.asarray(cells, dtype=np.int64).reshape(-1, 3)
    levels, rows, cols = arr[:, 0], arr[:, 1], arr[:, 2]
    if np.any(levels < 0):
        raise ValueError("cell levels must be >= 0")
    n = 3**levels
    if np.any((rows < 0) | (rows >= n) | (cols < 0) | (cols >= n)):
        raise ValueError("cell row/col out of range for its level")
    return levels, rows, cols


def _rects(
    cells: Sequence[Cell], height: int, width: int, *, square: bool = False
) -> tuple[IntArray, ...]:
    levels, rows, cols = cell_arrays(cells)
    n = 3**levels
    fh, fw = frame_side(height, width, square=square)
    top, bottom = _axis_edges(rows, n, height, fh), _axis_edges(rows + 1, n, height, fh)
    left, right = _axis_edges(cols, n, width, fw), _axis_edges(cols + 1, n, width, fw)
    return top, left, bottom, right


def compose(
    cells: Sequence[Cell],
    probs: npt.ArrayLike,
    height: int,
    width: int,
    *,
    fill: float = 0.0,
    threshold: float = 0.5,
    square: bool = False,
) -> tuple[npt.NDArray[np.float32], BoolArray]:
    """Compose retired cells of mixed levels into a soft and a hard mask.

    Finer cells are painted over coarser ones, so a refined cell's children override it.

    Args:
        cells: retired cells, any levels, any order.
        probs: posterior probability of each cell.
        height, width: output resolution (any, not necessarily the image's).
        fill: soft value of pixels that no cell covers.
        threshold: hard mask is ``soft >= threshold``.

    Shape:
        probs: ``(n_cells,)``; soft and hard: ``(height, width)``.

    Returns:
        ``(soft float32, hard bool)``.
    """
    p = np.asarray(probs, dtype=np.float32).reshape(-1)
    if p.shape[0] != len(cells):
        raise ValueError(f"got {len(cells)} cells but {p.shape[0]} probabilities")
    soft = np.full((height, width), fill, dtype=np.float32)
    if len(cells):
        top, left, bottom, right = _rects(cells, height, width, square=square)
        order = np.argsort(np.asarray(cells, dtype=np.int64).reshape(-1, 3)[:, 0], kind="stable")
        for i in order:  # one slice assignment per cell; cells are few (hundreds)
            soft[top[i] : bottom[i], left[i] : right[i]] = p[i]
    return soft, soft >= threshold


def _integral(mask: npt.ArrayLike) -> FloatArray:
    m = np.asarray(mask, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D (height, width), got shape {m.shape}")
    s = np.zeros((m.shape[0] + 1, m.shape[1] + 1), dtype=np.float64)
    np.cumsum(np.cumsum(m, axis=0), axis=1, out=s[1:, 1:])
    return s


FEW_CELLS = 81  # up to this many cells are measured on their own pixels (``cell_coverage``)


def cell_coverage(
    mask: npt.ArrayLike, cells: Sequence[Cell], *, square: bool = False
) -> FloatArray:
    """Mean of a dense mask over each cell (the fraction of the cell that shows the object).

    Args:
        mask: hard (bool) or soft (probability) mask of the whole image.
        cells: cells of any levels.

    Shape:
        mask: ``(H, W)``; returns ``(n_cells,)``.

    Returns:
        Coverage in [0, 1] per cell; 0 for empty cells.
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D (height, width), got shape {m.shape}")
    if not len(cells):
        return np.zeros(0, dtype=np.float64)
    top, left, bottom, right = _rects(cells, m.shape[0], m.shape[1], square=square)
    area = (bottom - top) * (right - left)
    if len(cells) <= FEW_CELLS or area.sum() < m.size // 4:
        # A few cells (a window's nine), or small ones: their own pixels, in one pass each,
        # not two running sums over the whole image.
        count = np.count_nonzero if m.dtype == np.bool_ else lambda a: a.sum(dtype=np.float64)
        total = np.array(
            [count(m[t:b, lf:r]) for t, lf, b, r in zip(top, left, bottom, right, strict=True)],
            dtype=np.float64,
        )
    else:
        s = _integral(m)
        total = s[bottom, right] - s[top, right] - s[bottom, left] + s[top, left]
    return np.where(area > 0, total / np.maximum(area, 1), 0.0)


def cell_contrast(
    pixels: npt.ArrayLike, cells: Sequence[Cell], *, square: bool = False
) -> FloatArray:
    """How much each cell's pixels vary: the standard deviation over the cell, the largest of
    the colour channels (a red edge on green of equal brightness still counts).

    Shape:
        pixels: ``(H, W)`` or ``(H, W, C)``, any scale; returns ``(n_cells,)`` on that scale.
    """
    values = np.asarray(pixels, dtype=np.float64)
    if values.ndim == 2:
        values = values[:, :, None]
    spread = np.zeros(len(cells), dtype=np.float64)
    for channel in np.moveaxis(values, 2, 0):
        mean = cell_coverage(channel, cells, square=square)
        mean_sq = cell_coverage(channel**2, cells, square=square)
        spread = np.maximum(spread, np.sqrt(np.maximum(mean_sq - mean**2, 0.0)))
    return spread


def level_coverage(mask: npt.ArrayLike, level: int, *, square: bool = False) -> FloatArray:
    """Coverage of every cell of one level, as a grid.

    Shape:
        mask: ``(H, W)``; returns ``(3**level, 3**level)``.
    """
    s = _integral(mask)
    h, w = s.shape[0] - 1, s.shape[1] - 1
    fh, fw = frame_side(h, w, square=square)
    ry, rx = edges(level, h, side=fh), edges(level, w, side=fw)
    t, b = ry[:-1, None], ry[1:, None]
    le, r = rx[None, :-1], rx[None, 1:]
    total = s[b, r] - s[t, r] - s[b, le] + s[t, le]
    area = (b - t) * (r - le)
    return np.where(area > 0, total / np.maximum(area, 1), 0.0)


def level_cells(level: int) -> list[Cell]:
    """All cells of one level, row-major."""
    n = cells_per_side(level)
    return [Cell(level, r, c) for r in range(n) for c in range(n)]


def min_cell_size(level: int, height: int, width: int, *, square: bool = False) -> int:
    """Smallest side in pixels of any cell at ``level`` (0 when some cells are empty); in the
    square frame the side of a whole cell (``cell_side``): a cell the image's edge cuts is a
    square like the others, partly outside the image."""
    if square:
        return cell_side(level, height, width, square=True)
    return int(min(np.diff(edges(level, height)).min(), np.diff(edges(level, width)).min()))
