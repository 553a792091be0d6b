"""Dense consensus on crowds that err the way people do: borders, parts, the wrong object."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from ml.aggregation.calibration import expected_calibration_error
from ml.aggregation.dense import (
    calibration_on_disputed,
    fuse_masks,
    gaussian_blur,
    mask_iou,
    outliers,
)
from ml.aggregation.io import AggregationInputError, aggregate_file
from ml.aggregation.simulate import photo_like_scene, simulate_annotators


@pytest.fixture(scope="module")
def crowds() -> list[tuple[object, np.ndarray]]:
    """Twelve photograph-like scenes, five simulated annotators each (seeded)."""
    rng = np.random.default_rng(7)
    out = []
    for _ in range(12):
        scene = photo_like_scene(rng)
        out.append((scene, simulate_annotators(rng, scene, k=5).masks))
    return out


def test_simulated_annotators_err_like_real_crowds() -> None:
    rng = np.random.default_rng(3)
    ious: list[float] = []
    for _ in range(12):
        scene = photo_like_scene(rng)
        crowd = simulate_annotators(rng, scene, k=5)
        assert crowd.masks.shape == (5, *scene.truth.shape) and crowd.masks.dtype == bool
        assert scene.image.shape == (*scene.truth.shape, 3) and scene.truth.any()
        ious += list(crowd.iou)
    # published crowd polygon work: about 0.82 mean, 0.87 median per annotator
    assert 0.72 < np.mean(ious) < 0.9 and 0.8 < np.median(ious) < 0.93
    assert min(ious) < 0.3  # some draw the wrong object or miss most of it


def test_simulation_is_seeded() -> None:
    a = photo_like_scene(np.random.default_rng(5))
    b = photo_like_scene(np.random.default_rng(5))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.truth, b.truth)


def test_consensus_beats_majority_and_staple_and_is_calibrated(crowds: list) -> None:
    mv, staple, ours, image = [], [], [], []
    soft, truth = [], []
    for scene, masks in crowds:
        mv.append(mask_iou(fuse_masks(masks, method="majority_vote").hard, scene.truth))
        staple.append(mask_iou(fuse_masks(masks, method="staple").hard, scene.truth))
        fused = fuse_masks(masks)
        ours.append(mask_iou(fused.hard, scene.truth))
        image.append(mask_iou(fuse_masks(masks, image=scene.image).hard, scene.truth))
        disputed = masks.any(0) & ~masks.all(0)
        soft.append(fused.soft[disputed])
        truth.append(scene.truth[disputed])
    assert np.mean(ours) >= np.mean(mv) and np.mean(ours) > np.mean(staple)
    assert np.mean(image) > np.mean(ours) + 0.02
    t = np.concatenate(truth)
    ece = expected_calibration_error(np.concatenate(soft), t)
    assert ece < 0.06
    # the vote share itself, read as a probability, is not calibrated: the check can fail
    share = np.concatenate([m.mean(0)[m.any(0) & ~m.all(0)] for _, m in crowds])
    assert expected_calibration_error(share, t) > ece + 0.05
    # calibration_on_disputed picks the same pixels
    scene, masks = crowds[0]
    one, n = calibration_on_disputed(fuse_masks(masks).soft, masks, scene.truth)
    assert n == len(truth[0]) and one == pytest.approx(
        expected_calibration_error(soft[0], truth[0])
    )


def test_a_thin_part_everyone_drew_is_kept() -> None:
    masks = np.zeros((5, 40, 40), bool)
    masks[:, 10:30, 10:30] = True
    masks[:, 20, 30:39] = True  # a one-pixel antenna all five drew
    masks[0, 8:10, 10:30] = True  # one annotator drew the top a little higher
    fused = fuse_masks(masks)
    assert fused.hard[20, 30:39].all() and fused.hard[10, 10] and fused.hard[29, 29]
    assert not fused.hard[8:10].any()
    assert fused.soft[0, 0] < 1e-3 and fused.soft[15, 15] > 1 - 1e-3


def test_an_annotator_who_drew_another_object_is_set_aside() -> None:
    masks = np.zeros((5, 60, 60), bool)
    masks[:4, 10:30, 10:30] = True
    masks[3, 10:30, 30:33] = True  # a sloppy border, not another object
    masks[4, 40:55, 40:55] = True  # another object
    assert list(outliers(masks)) == [False, False, False, False, True]
    fused = fuse_masks(masks)
    assert list(fused.used) == [True, True, True, True, False]
    assert not fused.hard[40:55, 40:55].any() and fused.hard[10:30, 10:30].all()
    # two of five drew the same other object: the three who agree still carry it
    masks[3] = masks[4]
    assert list(outliers(masks)) == [False, False, False, True, True]
    # two camps and nobody with a majority: nobody is set aside, the crowd votes
    masks[2] = False
    assert not outliers(masks).any()


def test_the_image_redraws_a_border_drawn_too_wide() -> None:
    rng = np.random.default_rng(0)
    h, w = 120, 160
    yy, xx = np.mgrid[0:h, 0:w]
    truth = (yy - 60) ** 2 + (xx - 80) ** 2 < 30**2
    image = np.where(truth[..., None], [200, 40, 40], [40, 90, 160]).astype(np.float64)
    image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
    masks = np.stack(
        [
            (yy - 60 + dy) ** 2 + (xx - 80 + dx) ** 2 < (34 + r) ** 2
            for dy, dx, r in [(0, 0, 0), (1, -1, 1), (-1, 1, 0), (0, 1, 2), (1, 0, 1)]
        ]
    )
    crowd = fuse_masks(masks)
    seen = fuse_masks(masks, image=image)
    assert seen.image_used and not crowd.image_used
    assert mask_iou(seen.hard, truth) > mask_iou(crowd.hard, truth) + 0.1
    assert mask_iou(seen.hard, truth) > 0.95


def test_bad_arguments() -> None:
    masks = np.ones((3, 8, 8), bool)
    with pytest.raises(ValueError, match="unknown"):
        fuse_masks(masks, method="x")
    with pytest.raises(ValueError, match="image must be"):
        fuse_masks(masks, image=np.zeros((8, 9, 3), np.uint8))
    with pytest.raises(ValueError, match="neither"):
        fuse_masks(masks, method="majority_vote", prior=np.full((8, 8), 0.5))


def _write(tmp_path: Path, scene: object, masks: np.ndarray) -> tuple[Path, Path, Path]:
    src = tmp_path / "m.npz"
    np.savez(src, masks=masks)
    img = tmp_path / "photo.png"
    cv2.imwrite(str(img), scene.image[..., ::-1])  # type: ignore[attr-defined]
    truth = tmp_path / "truth.png"
    cv2.imwrite(str(truth), scene.truth.astype(np.uint8) * 255)  # type: ignore[attr-defined]
    return src, img, truth


def test_aggregate_file_with_image_and_truth(tmp_path: Path, crowds: list) -> None:
    scene, masks = crowds[0]
    src, img, truth = _write(tmp_path, scene, masks)
    s = aggregate_file(src, out=tmp_path / "o.npz", image=img, truth=truth)
    assert s.dense and s.method == "consensus" and s.image_used
    assert s.iou is not None and s.iou > 0.85 and s.ece_disputed is not None and s.n_disputed > 0
    with np.load(tmp_path / "o.npz") as z:
        assert z["hard"].shape == scene.truth.shape and z["used"].shape == (5,)
        assert mask_iou(z["hard"], scene.truth) == pytest.approx(s.iou)
    s = aggregate_file(src, out=tmp_path / "o.npz", method="majority_vote", truth=truth)
    assert s.method == "majority_vote" and not s.image_used
    # masks as 0/255 bytes (a stack of PNGs) mean the same as bool masks
    np.savez(src, masks=masks.astype(np.uint8) * 255)
    again = aggregate_file(src, out=tmp_path / "o.npz", method="majority_vote", truth=truth)
    assert again.iou == s.iou


def test_aggregate_file_refuses_what_does_not_fit(tmp_path: Path, crowds: list) -> None:
    scene, masks = crowds[0]
    src, img, _ = _write(tmp_path, scene, masks)
    small = tmp_path / "small.png"
    cv2.imwrite(str(small), np.zeros((10, 20, 3), np.uint8))
    with pytest.raises(AggregationInputError, match="20x10"):
        aggregate_file(src, out=tmp_path / "o.npz", image=small)
    junk = tmp_path / "junk.png"
    junk.write_text("not an image")
    with pytest.raises(AggregationInputError, match="not an image"):
        aggregate_file(src, out=tmp_path / "o.npz", image=junk)
    with pytest.raises(AggregationInputError, match="not one for masks"):
        aggregate_file(src, out=tmp_path / "o.npz", method="weighted_majority")
    with pytest.raises(AggregationInputError, match="neither"):
        aggregate_file(src, out=tmp_path / "o.npz", method="majority_vote", image=img)
    votes = tmp_path / "v.csv"
    votes.write_text("worker,task,label\na,t,1\n")
    with pytest.raises(AggregationInputError, match="for dense masks"):
        aggregate_file(votes, out=tmp_path / "o.csv", image=img)
    assert not (tmp_path / "o.npz").exists()


@pytest.mark.parametrize("shape", [(48, 64), (3, 40), (1, 7), (2, 2)])
def test_numpy_blur_matches_opencv(shape: tuple[int, int]) -> None:
    a = np.random.default_rng(0).random(shape).astype(np.float32)
    assert np.allclose(gaussian_blur(a, 1.0), cv2.GaussianBlur(a, (0, 0), 1.0), atol=1e-6)


def test_masks_without_an_image_do_not_load_opencv() -> None:
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from ml.aggregation.io import aggregate_file\n"
        "from ml.aggregation.dense import fuse_masks\n"
        "m = np.zeros((5, 20, 20), bool); m[:, 5:15, 5:15] = True; m[0, 4] = True\n"
        "assert fuse_masks(m).hard[5:15, 5:15].all()\n"
        "print('cv2' in sys.modules, 'pyarrow' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
