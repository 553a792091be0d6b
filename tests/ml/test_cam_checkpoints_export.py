"""Grad-CAM heatmaps and cell priors, checkpoint round trips and the ONNX export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ml.aggregation.grid import level_coverage
from ml.cam import cell_heat, cell_prior, fit_cam_calibrator, tag_cams, to_image_size
from ml.checkpoints import load_checkpoint, load_pretrained, save_checkpoint
from ml.coco import CocoSplit
from ml.data import load_images, read_rgb
from ml.segmenter import SegmenterConfig, build_segmenter, predict_masks
from ml.tagger import TaggerConfig, build_tagger, predict_tags
from ml.train import TaggerTrainConfig, train_tagger
from tests.ml.conftest import tiny_segmenter_config, tiny_tagger_config

TAGS = ("shape", "circle", "red_circle")
PARENTS = (-1, 0, 1)


def test_cam_shape_range_and_cell_prior() -> None:
    torch.manual_seed(0)
    model = build_tagger(tiny_tagger_config(TAGS, PARENTS))
    images = torch.rand(2, 3, 64, 64)
    heat = tag_cams(model, images, [[0, 2], [1]], batch_size=2)
    assert [h.shape for h in heat] == [(2, 64, 64), (1, 64, 64)]
    assert all(h.min() >= 0.0 and h.max() <= 1.0 for h in heat)
    big = to_image_size(heat[0], 90, 120)
    assert big.shape == (2, 90, 120) and big.min() >= 0 and big.max() <= 1
    ramp = np.tile(np.linspace(0, 1, 120), (90, 1))
    np.testing.assert_allclose(cell_heat(ramp), level_coverage(ramp, 1))
    assert cell_heat(ramp, reduce="max")[0, 2] == 1.0
    prior = cell_prior(ramp)
    assert prior.shape == (3, 3) and np.all(np.isfinite(prior))
    assert np.all(np.diff(prior, axis=1) > 0)  # more heat, higher prior


@pytest.mark.slow
def test_cam_peak_falls_inside_the_object_more_often_than_chance(demo_split: CocoSplit) -> None:
    # resnet10t: MobileNetV3's Grad-CAM peaks missed the objects at this budget (3% of the peaks
    # inside, against 5% by chance), while a plain residual net localises (33%).
    size = 96
    train, val = demo_split.tagger_items[:32], demo_split.tagger_items[32:]
    model_config = TaggerConfig(
        demo_split.tags, demo_split.parents, backbone="resnet10t", input_size=size
    )
    config = TaggerTrainConfig(
        model_config,
        epochs=10,
        batch_size=8,
        lr=3e-3,
        loss="bce",
    )
    model = train_tagger(config, train, val, device="cpu").model
    images = load_images([item.image for item in val], size)
    present = [list(np.flatnonzero(item.labels)) for item in val]
    cams = tag_cams(model, images, present)
    hits, area, heats, masks = [], [], [], []
    for item, seg, tags, heat in zip(
        val, demo_split.segmenter_items[32:], present, cams, strict=True
    ):
        h, w = read_rgb(item.image).shape[-2:]
        for tag, plane in zip(tags, to_image_size(heat, h, w), strict=True):
            mask = np.asarray(seg.masks)[tag] > 0
            peak = np.unravel_index(np.argmax(plane), plane.shape)
            hits.append(bool(mask[peak]))
            area.append(mask.mean())
            heats.append(plane)
            masks.append(mask)
    # Objects are small against the image (a median of 0.5%, as in COCO): the peak must land
    # inside them several times as often as chance does.
    assert np.mean(hits) > 3 * np.mean(area) + 0.03, (np.mean(hits), np.mean(area))
    calibrator = fit_cam_calibrator(heats, masks)
    assert calibrator.apply(0.9) >= calibrator.apply(0.1)


def test_tagger_checkpoint_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = tiny_tagger_config(TAGS, PARENTS)
    model = build_tagger(config).eval()
    images = torch.rand(3, 3, 64, 64)
    path = save_checkpoint(
        tmp_path / "m" / "tagger.pt", model, config, extra={"thresholds": [0.3, 0.4, 0.2]}
    )
    assert [p.name for p in path.parent.iterdir()] == ["tagger.pt"]  # no temporary left
    loaded = load_checkpoint(path, kind="tagger")
    assert loaded.config == config and loaded.extra == {"thresholds": [0.3, 0.4, 0.2]}
    with torch.inference_mode():
        assert torch.equal(loaded.model(images), model(images))
    a = predict_tags(model, images, thresholds=[0.3, 0.4, 0.2])
    b = predict_tags(loaded.model, images, thresholds=loaded.extra["thresholds"])  # type: ignore[arg-type]
    np.testing.assert_array_equal(a.probabilities, b.probabilities)
    assert a.embeddings.shape == (3, model.embedding_dim)
    assert np.all(b.predicted[:, 0] >= b.predicted[:, 2])  # hierarchy closed
    with pytest.raises(ValueError, match="expected a segmenter"):
        load_checkpoint(path, kind="segmenter")


def test_segmenter_checkpoint_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = tiny_segmenter_config(TAGS)
    model = build_segmenter(config).eval()
    images = torch.rand(2, 3, 64, 64)
    path = save_checkpoint(tmp_path / "segmenter.pt", model, config)
    loaded = load_checkpoint(path)
    assert loaded.kind == "segmenter" and loaded.config == config
    assert torch.equal(predict_masks(loaded.model, images), predict_masks(model, images))  # type: ignore[arg-type]


def test_load_refuses_a_foreign_file(tmp_path: Path) -> None:
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a Tessera checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_backbone_starts_from_a_local_imagenet_style_file(tmp_path: Path) -> None:
    import timm
    import torchvision

    # What a machine with internet would save once: timm's resnet10t with its 1000-class head.
    torch.manual_seed(1)
    torch.save(timm.create_model("resnet10t", pretrained=False).state_dict(), tmp_path / "t.pth")
    tagger = build_tagger(TaggerConfig(TAGS, PARENTS, backbone="resnet10t", input_size=64))
    report = load_pretrained(tagger, tmp_path / "t.pth")
    assert report.loaded == report.expected and set(report.skipped) == {"fc.weight", "fc.bias"}
    source = torch.load(tmp_path / "t.pth", weights_only=True)
    assert torch.equal(tagger.features.backbone.conv1[0].weight, source["conv1.0.weight"])

    # torchvision's resnet18 file into the segmenter's smp encoder.
    torchvision_state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(torchvision_state, tmp_path / "resnet18.pth")
    segmenter = build_segmenter(SegmenterConfig(TAGS, encoder="resnet18", input_size=64))
    report = load_pretrained(segmenter, tmp_path / "resnet18.pth")
    assert report.loaded == report.expected
    assert torch.equal(
        segmenter.net.encoder.layer1[0].conv1.weight, torchvision_state["layer1.0.conv1.weight"]
    )

    # A Tessera checkpoint with other tags: the backbone comes over, the head does not.
    other = build_tagger(TaggerConfig(("a", "b"), backbone="resnet10t", input_size=64))
    save_checkpoint(tmp_path / "other.pt", other, other.config)
    report = load_pretrained(tagger, tmp_path / "other.pt")
    assert report.loaded == report.expected and set(report.skipped) == {"head.weight", "head.bias"}

    # The wrong architecture is refused, not silently half-loaded.
    with pytest.raises(ValueError, match="wrong architecture"):
        load_pretrained(build_tagger(tiny_tagger_config(TAGS, PARENTS)), tmp_path / "t.pth")


@pytest.mark.slow
def test_onnx_export_matches_pytorch(tmp_path: Path) -> None:
    from ml.export import export_onnx, run_onnx

    torch.manual_seed(0)
    tagger = build_tagger(tiny_tagger_config(TAGS, PARENTS))
    check = export_onnx(tagger, tmp_path / "tagger.onnx")
    assert set(check.max_abs_diff) == {"logits", "embedding"}
    segmenter = build_segmenter(tiny_segmenter_config(TAGS))
    check = export_onnx(segmenter, tmp_path / "segmenter.onnx")
    assert check.max_abs_diff["logits"] < 1e-4
    images = np.random.default_rng(0).random((3, 3, 64, 64), dtype=np.float32)  # another batch
    (logits,) = run_onnx(tmp_path / "segmenter.onnx", images)
    with torch.inference_mode():
        expected = segmenter.eval()(torch.from_numpy(images)).numpy()
    assert np.abs(logits - expected).max() < 1e-4
