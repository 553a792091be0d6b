"""Benchmark Tessera's aggregation methods against crowd-kit on the same simulated votes.

Usage: ``python bench/aggregation.py [--quick] [--seed N] [--only votes|scale|dense ...]``

Crowd: 50% diligent, 20% sloppy, 20% random clickers, 10% adversaries; 5% of items are gold
(given to Tessera's methods and, as ``true_labels``, to crowd-kit's DawidSkene+gold; accuracy and
calibration are measured on the other items). Timings start from the same plain arrays on both
sides: Tessera's include building Votes, crowd-kit's its DataFrame handling inside ``fit``.
Times are the best of three runs (one for the 10M-vote scale run).
Targets: accuracy >= crowd-kit DawidSkene, >= 20x faster, EM over 10M votes < 10 s, ECE <= 0.03.

Dense: 90 photograph-like objects (8 with ``--quick``), five simulated annotators each (see
``bench_dense``); targets: IoU >= 0.90 with the image, above majority vote and crowd-kit's
SegmentationEM and RASA without it, ECE <= 0.05 on disputed pixels, a CLI call under 0.3 s.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from crowdkit.aggregation import (
    DawidSkene,
    MajorityVote,
    SegmentationEM,
    SegmentationMajorityVote,
    SegmentationRASA,
)

from ml.aggregation import METHODS, expected_calibration_error, fuse_masks, make_votes
from ml.aggregation.dawid_skene import dawid_skene
from ml.aggregation.dense import mask_iou
from ml.aggregation.simulate import (
    photo_like_scene,
    sample_coverage,
    sample_gold,
    simulate_annotators,
    simulate_crowd,
)

ROOT = Path(__file__).resolve().parents[1]
MIX = {"diligent": 0.5, "sloppy": 0.2, "random_clicker": 0.2, "adversary": 0.1}


@dataclass(frozen=True)
class Sizes:
    items: int
    workers: int
    votes_per_item: int
    scale_votes: int
    objects: int  # dense: simulated photographs, one object each
    annotators: int


FULL = Sizes(50_000, 1_000, 7, 10_000_000, 90, 5)
QUICK = Sizes(5_000, 150, 7, 1_000_000, 8, 5)


def timed(fn: Callable[[], Any], repeat: int = 3) -> tuple[Any, float]:
    """The result and the best wall time of ``repeat`` runs (the same for every contender)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def bench_votes(sizes: Sizes, seed: int) -> None:
    rng = np.random.default_rng(seed)
    cov = sample_coverage(sizes.items, rng)
    crowd = simulate_crowd(
        cov, n_workers=sizes.workers, votes_per_item=sizes.votes_per_item, rng=rng, mix=MIX
    )
    gold = sample_gold(crowd.truth, 0.05, rng)
    test = gold < 0
    truth = crowd.truth[test]
    v = crowd.votes
    print(
        f"\n## votes: {v.n_items} items, {v.n_workers} workers, {v.n_votes} votes, "
        f"{int((~test).sum())} gold; mix {MIX}"
    )
    print(f"{'method':<28}{'accuracy':>10}{'ECE':>8}{'seconds':>10}")
    # Both sides start from the same plain arrays: Tessera's time includes building (and
    # validating) Votes from them, crowd-kit's includes its own DataFrame handling in fit.
    worker, item, label = v.worker.copy(), v.item.copy(), v.label.copy()
    rows: dict[str, float] = {}
    for name, method in METHODS.items():

        def run(method: Callable[..., Any] = method) -> Any:
            votes = make_votes(worker, item, label, n_workers=v.n_workers, n_items=v.n_items)
            return method(votes, gold=gold)

        r, dt = timed(run)
        rows[name] = dt
        acc = float(np.mean(r.label[test] == truth))
        ece = expected_calibration_error(r.posterior[test], truth)
        print(f"tessera {name:<20}{acc:>10.4f}{ece:>8.4f}{dt:>10.3f}")
    df = pd.DataFrame({"worker": worker, "task": item, "label": label})
    known = np.flatnonzero(~test)
    true_labels = pd.Series(gold[known].astype(np.int64), index=known)
    runs = (
        ("MajorityVote", MajorityVote(), {}),
        ("DawidSkene", DawidSkene(n_iter=100), {}),
        ("DawidSkene+gold", DawidSkene(n_iter=100), {"true_labels": true_labels}),
    )
    for label_, model, kwargs in runs:
        _, dt = timed(partial(model.fit, df, **kwargs))
        rows[f"crowdkit {label_}"] = dt
        assert model.probas_ is not None
        proba = model.probas_.reindex(range(v.n_items)).fillna(0.5)
        p1 = proba[1].to_numpy() if 1 in proba.columns else np.zeros(v.n_items)
        acc = float(np.mean((p1[test] >= 0.5) == truth))
        ece = expected_calibration_error(p1[test], truth)
        print(f"crowdkit {label_:<19}{acc:>10.4f}{ece:>8.4f}{dt:>10.3f}")
    for label_ in ("DawidSkene", "DawidSkene+gold"):
        ratio = rows[f"crowdkit {label_}"] / rows["dawid_skene"]
        print(f"speed ratio crowd-kit {label_} / tessera dawid_skene: {ratio:.1f}x")


def bench_scale(sizes: Sizes, seed: int) -> None:
    rng = np.random.default_rng(seed)
    vpi = 10
    n_items = sizes.scale_votes // vpi
    cov = sample_coverage(n_items, rng)
    crowd = simulate_crowd(
        cov, n_workers=max(sizes.workers * 10, 100), votes_per_item=vpi, rng=rng, mix=MIX
    )
    gold = sample_gold(crowd.truth, 0.05, rng)
    r, dt = timed(lambda: dawid_skene(crowd.votes, gold=gold), repeat=1)
    test = gold < 0
    acc = float(np.mean(r.label[test] == crowd.truth[test]))
    print(
        f"\n## scale: tessera dawid_skene on {crowd.votes.n_votes:,} votes "
        f"({n_items:,} items, {crowd.votes.n_workers:,} workers): {dt:.2f} s, "
        f"{r.iterations} iterations, converged={r.converged}, accuracy {acc:.4f}"
    )


def bench_dense(sizes: Sizes, seed: int) -> None:
    """Five simulated annotators per photograph-like object (``ml.aggregation.simulate.masks``:
    few-vertex polygons, biased and jittered borders, parts left out or added, the wrong
    object), every method on the same masks; IoU against the truth, ECE on disputed pixels."""
    rng = np.random.default_rng(seed)
    crowds = []
    single: list[float] = []
    for _ in range(sizes.objects):
        scene = photo_like_scene(rng)
        crowd = simulate_annotators(rng, scene, k=sizes.annotators)
        crowds.append((scene, crowd.masks))
        single += list(crowd.iou)
    h, w = crowds[0][0].truth.shape
    print(
        f"\n## dense: {sizes.objects} objects in {w}x{h} photograph-like scenes, "
        f"{sizes.annotators} simulated annotators each (single annotator IoU mean "
        f"{np.mean(single):.3f}, median {np.median(single):.3f})"
    )
    print(f"{'method':<30}{'mean IoU':>10}{'median':>8}{'ECE disp.':>11}{'s/call':>9}")
    ours: list[tuple[str, Callable[[Any, Any], Any]]] = [
        ("majority_vote", lambda sc, m: fuse_masks(m, method="majority_vote")),
        ("staple", lambda sc, m: fuse_masks(m, method="staple")),
        ("consensus", lambda sc, m: fuse_masks(m)),
        ("consensus --image", lambda sc, m: fuse_masks(m, image=sc.image)),
    ]
    for name, fn in ours:
        ious, secs, soft, truth = [], [], [], []
        for scene, masks in crowds:
            t = time.perf_counter()
            fused = fn(scene, masks)
            secs.append(time.perf_counter() - t)
            ious.append(mask_iou(fused.hard, scene.truth))
            disputed = masks.any(0) & ~masks.all(0)
            soft.append(fused.soft[disputed])
            truth.append(scene.truth[disputed])
        ece = expected_calibration_error(np.concatenate(soft), np.concatenate(truth))
        print(
            f"tessera {name:<22}{np.mean(ious):>10.4f}{np.median(ious):>8.4f}{ece:>11.3f}"
            f"{np.mean(secs):>9.3f}"
        )
    models = (
        ("SegmentationMajorityVote", SegmentationMajorityVote),
        ("SegmentationEM", SegmentationEM),
        ("SegmentationRASA", SegmentationRASA),
    )
    for label, model in models:
        ious, secs = [], []
        for scene, masks in crowds:
            df = pd.DataFrame({"worker": range(len(masks)), "task": 0, "segmentation": list(masks)})
            t = time.perf_counter()
            out = model().fit_predict(df)
            secs.append(time.perf_counter() - t)
            ious.append(mask_iou(np.asarray(out.iloc[0], dtype=bool), scene.truth))
        print(
            f"crowdkit {label:<21}{np.mean(ious):>10.4f}{np.median(ious):>8.4f}"
            f"{'-':>11}{np.mean(secs):>9.3f}"
        )
    _time_cli(crowds[0])


def _time_cli(crowd: tuple[Any, Any]) -> None:
    """Wall time of one ``tessera aggregate --image`` call, start-up included (best of 3)."""
    import cv2

    scene, masks = crowd
    with tempfile.TemporaryDirectory() as tmp:
        src, img = Path(tmp) / "m.npz", Path(tmp) / "photo.png"
        np.savez(src, masks=masks)
        cv2.imwrite(str(img), scene.image[..., ::-1])
        cmd = [
            sys.executable,
            "-m",
            "app.cli",
            "aggregate",
            str(src),
            "--out",
            str(Path(tmp) / "o.npz"),
        ]
        for extra in ([], ["--image", str(img)]):
            best = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                subprocess.run([*cmd, *extra], check=True, capture_output=True, cwd=ROOT)
                best = min(best, time.perf_counter() - t)
            h, w = masks.shape[1:]
            print(
                f"tessera aggregate {' '.join(['masks', *extra[:1]])} "
                f"({masks.shape[0]} masks, {w}x{h}), start-up included: {best:.3f} s"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--only", choices=("votes", "scale", "dense"), action="append", help="sections to run"
    )
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    only = set(args.only or ("votes", "scale", "dense"))
    print(f"# aggregation benchmark ({'quick' if args.quick else 'full'}), seed {args.seed}")
    if "votes" in only:
        bench_votes(sizes, args.seed)
    if "scale" in only:
        bench_scale(sizes, args.seed)
    if "dense" in only:
        bench_dense(sizes, args.seed)


if __name__ == "__main__":
    main()
