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
@given(level=st.integers(0, 3), h=sizes, w=sizes, data=st.data())
def test_children_tile_their_parent(level: int, h: int, w: int, data: st.DataObject) -> None:
    n = 3**level
    cell = Cell(level, data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, n - 1)))
    rect = cell_rect(cell, h, w)
    covered = np.zeros((h, w), dtype=np.int64)
    for child in children(cell):
        r = cell_rect(child, h, w)
        covered[r.top : r.bottom, r.left : r.right] += 1
        assert parent(child) == cell
    inside = np.zeros((h, w), dtype=np.int64)
    inside[rect.top : rect.bottom, rect.left : rect.right] = 1
    assert np.array_equal(covered, inside)


def test_cells_follow_the_aspect_ratio() -> None:
    assert cell_rect(Cell(1, 0, 0), 300, 900) == (0, 0, 100, 300)
    assert cell_rect(Cell(0, 0, 0), 300, 900).height == 300
    with pytest.raises(ValueError):
        cell_rect(Cell(1, 3, 0), 300, 900)
    with pytest.raises(ValueError):
        parent(Cell(0, 0, 0))


@FAST
@given(level=st.integers(0, 3), h=sizes, w=sizes, seed=st.integers(0, 2**32 - 1))
def test_coverage_compose_round_trip(level: int, h: int, w: int, seed: int) -> None:
    mask = np.random.default_rng(seed).random((h, w)) < 0.4
    cov = level_coverage(mask, level)
    cells = level_cells(level)
    assert np.allclose(cell_coverage(mask, cells), cov.reshape(-1))
    soft, hard = compose(cells, cov.reshape(-1), h, w)
    assert np.allclose(level_coverage(soft, level), cov, atol=1e-6)
    assert np.array_equal(hard, soft >= 0.5)


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
