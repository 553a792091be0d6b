"""``bench.composer``: the campaign's masks composed in worker processes are the product's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from app.services.masks.composition import MaskInputs
from bench.composer import Composer, Hard, composer
from ml.aggregation import grid
from ml.composition import compose_mask


def _disc_image(path: Path, size: int = 120) -> np.ndarray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    truth = (yy - 50) ** 2 + (xx - 70) ** 2 <= 30**2
    pixels = rng.normal(110, 15, (size, size, 3))
    pixels[truth] = rng.normal((200, 60, 50), 15, (int(truth.sum()), 3))
    image = np.clip(pixels, 0, 255).astype(np.uint8)
    PILImage.fromarray(image).save(path)
    return image


def test_a_mask_composed_in_a_worker_process_is_the_one_composed_here(tmp_path: Path) -> None:
    image = _disc_image(tmp_path / "disc.png")
    cells = grid.level_cells(1)
    probs = [0.0, 0.97, 0.9, 0.05, 0.99, 0.6, 0.0, 0.02, 0.01]
    inputs = MaskInputs(cells, probs, None, "grabcut", False)
    expected = compose_mask(image, cells, probs, method="grabcut").hard
    assert expected.any() and not expected.all()
    with composer(2) as masks:
        assert len(masks.pools) == 2
        composed = [masks.submit(i, tmp_path / "disc.png", inputs) for i in range(3)]
        assert all(np.array_equal(c(), expected) and c.ready() for c in composed)
    here = Composer().submit(0, tmp_path / "disc.png", inputs)
    assert here.ready() and np.array_equal(here(), expected)


def test_a_union_of_masks_is_ready_when_its_parts_are() -> None:
    a, b = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    a[0, 0], b[3, 3] = True, True
    waiting = Hard(lambda: b, lambda: False)
    union = Hard.union([Hard.of(a), waiting], (4, 4))
    assert not union.ready()
    assert union().sum() == 2 and union()[0, 0] and union()[3, 3]
    empty = Hard.union([], (2, 3))
    assert empty.ready() and empty().shape == (2, 3) and not empty().any()
