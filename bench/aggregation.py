"""Benchmark Tessera's aggregation methods against crowd-kit on the same simulated votes.

Usage: ``python bench/aggregation.py [--quick] [--seed N] [--only votes|scale|e2e|dense ...]
[--scenes photo|demo]``

Crowd: 50% diligent, 20% sloppy, 20% random clickers, 10% adversaries; 5% of items are gold
(given to Tessera's methods and, as ``true_labels``, to crowd-kit's DawidSkene+gold; accuracy and
calibration are measured on the other items). Timings start from the same plain arrays on both
sides: Tessera's include building Votes, crowd-kit's its DataFrame handling inside ``fit``.
Times are the best of three runs (one for the 10M-vote scale run).
Targets: accuracy >= crowd-kit DawidSkene, >= 20x faster, EM over 10M votes < 10 s, ECE <= 0.03.
End to end (``tessera aggregate`` on a 10M-vote CSV, CSV out, against ``pd.read_csv`` + crowd-kit
``DawidSkene``): < 5 s and >= 5x faster; ``--quick`` runs it on 1M votes.

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
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
from ml.aggregation.io import aggregate_file
from ml.aggregation.simulate import (
    DenseScene,
    SimulatedCrowd,
    photo_like_scene,
    sample_coverage,
    sample_gold,
    simulate_annotators,
    simulate_crowd,
)
from ml.aggregation.votes import Votes
from ml.demo.scenes import generate_scenes

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


def _scale_crowd(sizes: Sizes, seed: int) -> tuple[SimulatedCrowd, np.ndarray, int]:
    """The scale runs' crowd: ``sizes.scale_votes`` votes, 10 per item, 5% of items gold."""
    rng = np.random.default_rng(seed)
    vpi = 10
    n_items = sizes.scale_votes // vpi
    cov = sample_coverage(n_items, rng)
    crowd = simulate_crowd(
        cov, n_workers=max(sizes.workers * 10, 100), votes_per_item=vpi, rng=rng, mix=MIX
    )
    return crowd, sample_gold(crowd.truth, 0.05, rng), n_items


def bench_scale(sizes: Sizes, seed: int) -> None:
    crowd, gold, n_items = _scale_crowd(sizes, seed)
    r, dt = timed(lambda: dawid_skene(crowd.votes, gold=gold), repeat=1)
    test = gold < 0
    acc = float(np.mean(r.label[test] == crowd.truth[test]))
    print(
        f"\n## scale: tessera dawid_skene on {crowd.votes.n_votes:,} votes "
        f"({n_items:,} items, {crowd.votes.n_workers:,} workers): {dt:.2f} s, "
        f"{r.iterations} iterations, converged={r.converged}, accuracy {acc:.4f}"
    )


def _write_votes_csv(path: Path, votes: Votes) -> None:
    """worker,task,label with integer names (crowd-kit's convention; pandas reads them as int64,
    its fastest case), in the simulated order (votes grouped by item)."""
    table = pa.table({"worker": votes.worker, "task": votes.item, "label": votes.label})
    with path.open("wb") as f:
        f.write(b"worker,task,label\n")
        pacsv.write_csv(table, f, write_options=pacsv.WriteOptions(include_header=False))


def _e2e_row(name: str, acc: float, ece: float, seconds: float) -> None:
    print(f"{name:<44}{acc:>10.4f}{ece:>8.4f}{seconds:>10.2f}")


def bench_end_to_end(sizes: Sizes, seed: int) -> None:
    """``tessera aggregate`` from CSVs (read votes and gold, Dawid-Skene, write the result CSVs)
    against ``pd.read_csv`` + crowd-kit ``DawidSkene(n_iter=100).fit`` with the same gold as
    ``true_labels``, on the same files, in one run. The crowd is bench_scale's (5% gold);
    accuracy and ECE on the other items."""
    crowd, gold, n_items = _scale_crowd(sizes, seed)
    test = gold < 0
    truth = crowd.truth[test]
    with tempfile.TemporaryDirectory() as tmp:
        src, gold_csv = Path(tmp) / "votes.csv", Path(tmp) / "gold.csv"
        _write_votes_csv(src, crowd.votes)
        known = np.flatnonzero(~test)
        pd.DataFrame({"task": known, "label": gold[known]}).to_csv(gold_csv, index=False)
        size_mb = src.stat().st_size / 1e6
        print(
            f"\n## end to end: {crowd.votes.n_votes:,} votes from CSV ({size_mb:.0f} MB, "
            f"{n_items:,} items, {crowd.votes.n_workers:,} workers, {known.size:,} gold)"
        )
        print(f"{'pipeline':<44}{'accuracy':>10}{'ECE':>8}{'seconds':>10}")
        out = Path(tmp) / "out.csv"
        _, dt_ours = timed(lambda: aggregate_file(src, out=out, gold=gold_csv), repeat=1)
        result = pd.read_csv(out, dtype={"task": np.int64})
        p1 = np.full(n_items, 0.5)
        p1[result["task"].to_numpy()] = result["posterior"].to_numpy()
        acc = float(np.mean((p1[test] >= 0.5) == truth))
        ece = expected_calibration_error(p1[test], truth)
        _e2e_row("tessera aggregate_file (CSV in, CSV out)", acc, ece, dt_ours)

        def crowdkit() -> Any:
            df = pd.read_csv(src)
            g = pd.read_csv(gold_csv)
            true_labels = pd.Series(g["label"].to_numpy(), index=g["task"].to_numpy())
            return DawidSkene(n_iter=100).fit(df, true_labels=true_labels)

        model, dt_ck = timed(crowdkit, repeat=1)
        assert model.probas_ is not None
        proba = model.probas_.reindex(range(n_items)).fillna(0.5)
        q1 = proba[1].to_numpy() if 1 in proba.columns else np.zeros(n_items)
        acc = float(np.mean((q1[test] >= 0.5) == truth))
        ece = expected_calibration_error(q1[test], truth)
        _e2e_row("pd.read_csv + crowd-kit DawidSkene.fit", acc, ece, dt_ck)
    print(
        f"speed ratio (pandas + crowd-kit) / tessera: {dt_ck / dt_ours:.1f}x "
        f"(targets: >= 5x; 10M votes < 5 s)"
    )


def _masks(sizes: Sizes, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    n = sizes.mask_side
    yy, xx = np.mgrid[0:n, 0:n]
    truth = (yy - n / 2) ** 2 / (n / 3) ** 2 + (xx - n / 2) ** 2 / (n / 4) ** 2 < 1
    flips = [0.03, 0.06, 0.1, 0.5, 0.85][: sizes.annotators]  # last two: random, adversary
    masks = np.stack([truth ^ (rng.random(truth.shape) < p) for p in flips])
    return truth, masks


def _demo_scenes(seed: int, n: int) -> Iterator[DenseScene]:
    """The demo's procedural scenes (flat geometric shapes, not the photograph-like ones): a
    second, independent source of images, one object each as the one to outline."""
    rng = np.random.default_rng(seed)
    for scene in generate_scenes(seed=seed, n_images=n):
        masks = [o.mask for o in scene.objects if o.mask.sum() >= 60]
        if not masks:
            continue
        t = int(rng.integers(len(masks)))
        others = tuple(m for k, m in enumerate(masks) if k != t)
        yield DenseScene(scene.image, masks[t], others)


def bench_dense(sizes: Sizes, seed: int, scenes: str = "photo") -> None:
    """Five simulated annotators per object (``ml.aggregation.simulate.masks``: few-vertex
    polygons, biased and jittered borders, parts left out or added, the wrong object), every
    method on the same masks; IoU against the truth, ECE on disputed pixels. ``scenes``:
    ``photo`` (photograph-like scenes, 640x480) or ``demo`` (the demo's scenes, 384-1024 px)."""
    rng = np.random.default_rng(seed)
    source = (
        (photo_like_scene(rng) for _ in range(sizes.objects))
        if scenes == "photo"
        else _demo_scenes(seed, sizes.objects)
    )
    crowds = []
    single: list[float] = []
    for scene in source:
        crowd = simulate_annotators(rng, scene, k=sizes.annotators)
        crowds.append((scene, crowd.masks))
        single += list(crowd.iou)
    h, w = crowds[0][0].truth.shape
    kind = f"{w}x{h} photograph-like scenes" if scenes == "photo" else "the demo's scenes"
    print(
        f"\n## dense: {len(crowds)} objects in {kind}, "
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
        "--scenes",
        choices=("photo", "demo"),
        default="photo",
        help="dense: photograph-like scenes or the demo's",
    )
    parser.add_argument(
        "--only",
        choices=("votes", "scale", "e2e", "dense"),
        action="append",
        help="sections to run",
    )
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    only = set(args.only or ("votes", "scale", "e2e", "dense"))
    print(f"# aggregation benchmark ({'quick' if args.quick else 'full'}), seed {args.seed}")
    if "votes" in only:
        bench_votes(sizes, args.seed)
    if "scale" in only:
        bench_scale(sizes, args.seed)
    if "e2e" in only:
        bench_end_to_end(sizes, args.seed)
    if "dense" in only:
        bench_dense(sizes, args.seed, args.scenes)


if __name__ == "__main__":
    main()
