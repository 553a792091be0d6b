"""Training loops on tiny models: overfitting one batch, losses, datasets, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ml.coco import CocoSplit
from ml.data import Augment, SegmenterDataset, SegmenterItem
from ml.losses import AsymmetricLoss, get_loss, positive_weights
from ml.segmenter import weighted_bce_dice
from ml.train import (
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
    assert len([r for r in reports if not r.epoch_done]) == 30
    assert reports[-1].epoch_done and reports[-1].step == reports[-1].steps == 30
    assert result.thresholds.shape == (len(demo_split.tags),)


@pytest.mark.slow
def test_segmenter_overfits_one_batch(demo_split: CocoSplit) -> None:
    batch = demo_split.segmenter_items[:4]
    config = SegmenterTrainConfig(
        tiny_segmenter_config(demo_split.tags),
        epochs=30,
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
