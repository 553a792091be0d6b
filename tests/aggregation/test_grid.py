"""Grid pyramid geometry, composition and coverage."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ml.aggregation import grid
from ml.aggregation.grid import (
    Cell,
    cell_coverage,
    cell_rect,
    children,
    compose,
    edges,
    level_cells,
    level_coverage,
    parent,
)

sizes = st.integers(min_value=1, max_value=200)
FAST = settings(max_examples=40, deadline=None)


@FAST
@given(level=st.integers(0, 4), size=sizes)
def test_edges_partition_the_axis(level: int, size: int) -> None:
    e = edges(level, size)
    assert e[0] == 0 and e[-1] == size
    assert np.all(np.diff(e) >= 0)


@FAST
@given(level=st.integers(0, 3), h=sizes, w=sizes, data=st.data(), square=st.booleans())
def test_children_tile_their_parent(
    level: int, h: int, w: int, data: st.DataObject, square: bool
) -> None:
    n = 3**level
    cell = Cell(level, data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, n - 1)))
    rect = cell_rect(cell, h, w, square=square)
    covered = np.zeros((h, w), dtype=np.int64)
    for child in children(cell):
        r = cell_rect(child, h, w, square=square)
        covered[r.top : r.bottom, r.left : r.right] += 1
        assert parent(child) == cell
    inside = np.zeros((h, w), dtype=np.int64)
    inside[rect.top : rect.bottom, rect.left : rect.right] = 1
    assert np.array_equal(covered, inside)


@FAST
@given(level=st.integers(0, 4), h=sizes, w=sizes)
def test_square_cells_are_squares_centred_on_the_image(level: int, h: int, w: int) -> None:
    side = max(h, w)
    whole = np.zeros((h, w), dtype=np.int64)
    for cell in level_cells(level):
        view = grid.cell_view(cell, h, w, square=True)
        # A square of the frame around the image (integer edges: one pixel either way).
        assert abs(view.height - side / 3**level) <= 1 and abs(view.width - side / 3**level) <= 1
        rect = cell_rect(cell, h, w, square=True)  # ... as much of it as is in the image
        assert rect.top == min(max(view.top, 0), h) and rect.bottom == min(max(view.bottom, 0), h)
        assert rect.left == min(max(view.left, 0), w) and rect.right == min(max(view.right, 0), w)
        whole[rect.top : rect.bottom, rect.left : rect.right] += 1
    assert (whole == 1).all()  # the cells partition the image
    # The image sits in the middle: the frame's margin is the same on both sides (within 1).
    frame = grid.cell_view(grid.ROOT, h, w, square=True)
    assert abs(-frame.top - (frame.bottom - h)) <= 1 and abs(-frame.left - (frame.right - w)) <= 1
    assert grid.min_cell_size(level, h, w, square=True) == side // 3**level


def test_a_wide_image_in_its_square_frame() -> None:
    # 600 x 900: a 900 px frame; level-1 rows hold image rows 0-150, 150-450 and 450-600.
    assert [cell_rect(Cell(1, r, 0), 600, 900, square=True).top for r in range(3)] == [0, 150, 450]
    assert cell_rect(Cell(1, 2, 2), 600, 900, square=True) == (450, 600, 600, 900)
    # Level 2: the top and bottom rows of squares lie wholly in the margin (empty).
    assert cell_rect(Cell(2, 0, 4), 600, 900, square=True).height == 0
    assert cell_rect(Cell(2, 8, 4), 600, 900, square=True).height == 0
    assert cell_rect(Cell(2, 1, 4), 600, 900, square=True) == (0, 400, 50, 500)
    assert grid.cell_view(Cell(2, 0, 4), 600, 900, square=True) == (-150, 400, -50, 500)
    # An image resized to the same aspect keeps its cells (the frame scales with it).
    mask = np.zeros((600, 900), dtype=bool)
    mask[100:200, 300:700] = True
    small = mask[::3, ::3]
    cells = level_cells(2)
    np.testing.assert_allclose(  # to the pixel the smaller edges round to
        cell_coverage(mask, cells, square=True), cell_coverage(small, cells, square=True), atol=0.05
    )


def test_cells_follow_the_aspect_ratio() -> None:
    assert cell_rect(Cell(1, 0, 0), 300, 900) == (0, 0, 100, 300)
    assert cell_rect(Cell(0, 0, 0), 300, 900).height == 300
    with pytest.raises(ValueError):
        cell_rect(Cell(1, 3, 0), 300, 900)
    with pytest.raises(ValueError):
        parent(Cell(0, 0, 0))


@FAST
@given(
    level=st.integers(0, 3),
    h=sizes,
    w=sizes,
    seed=st.integers(0, 2**32 - 1),
    square=st.booleans(),
)
def test_coverage_compose_round_trip(level: int, h: int, w: int, seed: int, square: bool) -> None:
    mask = np.random.default_rng(seed).random((h, w)) < 0.4
    cov = level_coverage(mask, level, square=square)
    cells = level_cells(level)
    assert np.allclose(cell_coverage(mask, cells, square=square), cov.reshape(-1))
    soft, hard = compose(cells, cov.reshape(-1), h, w, square=square)
    assert np.allclose(level_coverage(soft, level, square=square), cov, atol=1e-6)
    assert np.array_equal(hard, soft >= 0.5)


@FAST
@given(
    level=st.integers(1, 3),
    h=sizes,
    w=sizes,
    seed=st.integers(0, 2**32 - 1),
    square=st.booleans(),
)
def test_coverage_of_a_few_cells_equals_the_whole_levels(
    level: int, h: int, w: int, seed: int, square: bool
) -> None:
    """A window's nine cells are measured on their own pixels: the same as on the whole level."""
    rng = np.random.default_rng(seed)
    mask = rng.random((h, w)) < 0.4
    cells = level_cells(level)
    whole = cell_coverage(mask, cells, square=square)
    first = int(rng.integers(len(cells) // 9)) * 9
    few = [c for c in cells if parent(c) == parent(cells[first])]
    assert np.allclose(
        cell_coverage(mask, few, square=square), [whole[cells.index(c)] for c in few]
    )


@FAST
@given(h=sizes, w=sizes, seed=st.integers(0, 2**32 - 1), out=st.tuples(sizes, sizes))
def test_mixed_levels_compose_and_recover(h: int, w: int, seed: int, out: tuple[int, int]) -> None:
    rng = np.random.default_rng(seed)
    cells = level_cells(1)
    refined = cells[int(rng.integers(9))]
    cells = cells + list(children(refined))
    values = rng.integers(0, 2, len(cells)).astype(np.float64)
    _soft, hard = compose(cells, values, h, w)
    leaves = [c for c in cells if c != refined]
    leaf_values = values[[k for k, c in enumerate(cells) if c != refined]]
    cov = cell_coverage(hard, leaves)
    nonempty = np.array([cell_rect(c, h, w).height * cell_rect(c, h, w).width > 0 for c in leaves])
    assert np.array_equal(cov[nonempty], leaf_values[nonempty])
    # any output resolution: the hard mask at another size still matches per cell
    _soft2, hard2 = compose(cells, values, *out)
    cov2 = cell_coverage(hard2, leaves)
    ok2 = np.array([cell_rect(c, *out).height * cell_rect(c, *out).width > 0 for c in leaves])
    assert np.array_equal(cov2[ok2], leaf_values[ok2])


def test_compose_fill_and_validation() -> None:
    soft, hard = compose([Cell(1, 1, 1)], [0.9], 9, 9, fill=0.25)
    assert soft[4, 4] == pytest.approx(0.9) and soft[0, 0] == 0.25
    assert hard.sum() == 9
    with pytest.raises(ValueError):
        compose([Cell(1, 1, 1)], [0.9, 0.1], 9, 9)


def test_cell_contrast_is_the_largest_channels_spread() -> None:
    pixels = np.zeros((9, 9, 3))
    pixels[:3, :3, 0] = np.tile([0.0, 10.0, 0.0], (3, 1))  # red stripes: spread in one channel
    pixels[3:6, 3:6] = 7.0  # flat grey
    cells = [grid.Cell(1, 0, 0), grid.Cell(1, 1, 1), grid.Cell(0, 0, 0)]
    spread = grid.cell_contrast(pixels, cells)
    assert spread[0] == pytest.approx(np.std([0.0, 10.0, 0.0]))
    assert spread[1] == pytest.approx(0.0)
    assert spread[2] > 0
    assert grid.cell_contrast(pixels[:, :, 0], cells)[0] == pytest.approx(spread[0])  # (H, W)
