"""Training loops on tiny models: overfitting one batch, steps, losses, datasets, determinism."""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.hooks import RemovableHandle

from ml.coco import CocoSplit
from ml.data import Augment, SegmenterDataset, SegmenterItem
from ml.losses import AsymmetricLoss, get_loss, positive_weights
from ml.segmenter import weighted_bce_dice
from ml.train import (
    CachedSegmenterDataset,
    Progress,
    SegmenterTrainConfig,
    TaggerTrainConfig,
    resolve_device,
    train_segmenter,
    train_tagger,
)
from tests.ml.conftest import tiny_segmenter_config, tiny_tagger_config


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["bce", "asl"])
def test_tagger_overfits_one_batch(demo_split: CocoSplit, loss: str) -> None:
    batch = demo_split.tagger_items[:8]
    reports: list[Progress] = []
    config = TaggerTrainConfig(
        tiny_tagger_config(demo_split.tags, demo_split.parents),
        epochs=30,
        batch_size=8,
        lr=3e-3,
        loss=loss,
        augment=Augment.none(),
    )
    result = train_tagger(config, batch, batch, device="cpu", progress=reports.append)
    assert result.losses[-1] < 0.3 * result.losses[0]
    assert result.metrics.map > 0.9  # scored on the batch it memorised
    assert [r.step for r in reports] == list(range(1, 31)) and result.steps == 30
    assert reports[-1].steps == 30 and reports[-1].epoch == 30  # one batch per pass
    assert result.thresholds.shape == (len(demo_split.tags),)


@pytest.mark.slow
def test_segmenter_overfits_one_batch(demo_split: CocoSplit) -> None:
    batch = demo_split.segmenter_items[:4]
    config = SegmenterTrainConfig(
        tiny_segmenter_config(demo_split.tags),
        steps=30,
        batch_size=4,
        lr=1e-2,
        augment=Augment.none(),
    )
    result = train_segmenter(config, batch, batch, device="cpu")
    assert result.losses[-1] < 0.45 * result.losses[0], result.losses
    assert result.metrics.miou > 0.15
    assert 0.0 <= result.metrics.mean_boundary_f1 <= 1.0


def test_training_is_seeded(demo_split: CocoSplit) -> None:
    items = demo_split.tagger_items[:4]
    config = TaggerTrainConfig(
        tiny_tagger_config(demo_split.tags, demo_split.parents), epochs=2, batch_size=2
    )
    a = train_tagger(config, items, items, device="cpu")
    b = train_tagger(config, items, items, device="cpu")
    assert a.losses == b.losses


def _optimizer_steps() -> tuple[list[int], RemovableHandle]:
    """Count every optimizer step taken (torch's global post-step hook)."""
    taken: list[int] = []
    handle = register_optimizer_step_post_hook(lambda *_: taken.append(1))
    return taken, handle


@pytest.mark.parametrize("n_items", [1, 3, 9])
def test_the_segmenter_takes_exactly_its_steps_whatever_the_data(
    demo_split: CocoSplit, n_items: int
) -> None:
    items = demo_split.segmenter_items[:n_items]
    config = SegmenterTrainConfig(tiny_segmenter_config(demo_split.tags), steps=7, batch_size=4)
    reports: list[Progress] = []
    taken, handle = _optimizer_steps()
    try:
        result = train_segmenter(config, items, items[:1], device="cpu", progress=reports.append)
    finally:
        handle.remove()
    assert len(taken) == 7 and result.steps == 7
    assert [r.step for r in reports] == list(range(1, 8))
    passes = -(-7 // -(-n_items // 4))  # ceil(7 / batches per pass): the data is cycled
    assert reports[-1].epoch == passes and len(result.losses) == passes
    assert all(b.seconds >= a.seconds for a, b in itertools.pairwise(reports))
    assert result.seconds >= reports[-1].seconds > 0


def test_segmenter_training_is_seeded(demo_split: CocoSplit) -> None:
    items = demo_split.segmenter_items[:3]
    config = SegmenterTrainConfig(tiny_segmenter_config(demo_split.tags), steps=4, batch_size=2)
    a = train_segmenter(config, items, items, device="cpu")
    b = train_segmenter(config, items, items, device="cpu")
    other = train_segmenter(replace(config, seed=1), items, items, device="cpu")
    assert a.losses == b.losses and a.losses != other.losses
    theirs = b.model.state_dict()
    assert all(torch.equal(x, theirs[name]) for name, x in a.model.state_dict().items())


def test_weighted_loss_ignores_zero_weight_pixels() -> None:
    logits = torch.randn(2, 3, 8, 8)
    masks = (torch.rand(2, 3, 8, 8) > 0.5).float()
    weights = torch.ones(2, 3, 8, 8)
    weights[:, 2] = 0  # tag 2 not segmented: anything it predicts is free
    base = weighted_bce_dice(logits, masks, weights)
    changed = logits.clone()
    changed[:, 2] = 100.0
    assert torch.allclose(weighted_bce_dice(changed, masks, weights), base)
    assert not torch.allclose(weighted_bce_dice(changed, masks, torch.ones_like(weights)), base)


def test_losses_registry_and_positive_weights() -> None:
    labels = np.array([[1, 0], [0, 0], [0, 0], [0, 0]])
    np.testing.assert_allclose(positive_weights(labels).numpy(), [3.0, 1.0])
    assert isinstance(get_loss("asl"), AsymmetricLoss)
    with pytest.raises(KeyError, match="bce"):
        get_loss("focal_magic")
    logits, targets = torch.tensor([[4.0, -4.0]]), torch.tensor([[1.0, 0.0]])
    assert float(get_loss("asl")(logits, targets)) < float(get_loss("asl")(-logits, targets))


def test_segmenter_dataset_reads_pngs_and_weights_missing_tags_zero(tmp_path: Path) -> None:
    image = tmp_path / "image.png"
    Image.fromarray(np.full((20, 30, 3), 128, np.uint8)).save(image)
    soft = np.zeros((20, 30), np.uint8)
    soft[:, :15] = 255
    soft[:, 15:20] = 128  # uncertain band
    Image.fromarray(soft).save(tmp_path / "mask.png")
    item = SegmenterItem(image, [tmp_path / "mask.png", None])
    img, masks, weights = SegmenterDataset([item], n_tags=2, size=16)[0]
    assert img.shape == (3, 16, 16) and masks.shape == weights.shape == (2, 16, 16)
    assert float(weights[1].max()) == 0.0  # tag 1 not segmented here
    assert float(weights[0, 8, 0]) > 0.9 and float(weights[0, 8, 9]) < 0.2
    assert float(masks[0, 8, 0]) > 0.9 and float(masks[0, 8, 15]) < 0.1


def test_cached_segmenter_items_are_the_items_read_once(tmp_path: Path) -> None:
    image = tmp_path / "image.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(image)
    soft = np.zeros((40, 60), np.uint8)
    soft[5:30, 10:45] = 255
    Image.fromarray(soft).save(tmp_path / "mask.png")
    items = [SegmenterItem(image, [None, tmp_path / "mask.png", None])]
    plain = SegmenterDataset(items, n_tags=3, size=16, augment=Augment.none())[0]
    cached = CachedSegmenterDataset(items, n_tags=3, size=16, augment=Augment.none())
    for _ in range(2):  # read from disk, then from memory
        for a, b in zip(plain, cached[0], strict=True):
            assert a.shape == b.shape and torch.allclose(a, b, atol=2e-3)
    assert cached.kept_bytes > 0 and float(cached[0][2][0].max()) == 0.0  # tag 0: no weight
    augmented = CachedSegmenterDataset(items, n_tags=3, size=16, augment=Augment())
    assert augmented.side == 20  # the smallest crop (0.8) still spans 16 px
    assert [t.shape for t in augmented[0]] == [(3, 16, 16), (3, 16, 16), (3, 16, 16)]


def test_resolve_device() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in {"cpu", "cuda"}
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no GPU"):
            resolve_device("cuda")


def test_training_without_items_says_so() -> None:
    tagger = TaggerTrainConfig(tiny_tagger_config(("a",)))
    with pytest.raises(ValueError, match="tagger needs at least one training item"):
        train_tagger(tagger, [], [], device="cpu")
    segmenter = SegmenterTrainConfig(tiny_segmenter_config(("a",)))
    with pytest.raises(ValueError, match="segmenter needs at least one training item"):
        train_segmenter(segmenter, [], [], device="cpu")
