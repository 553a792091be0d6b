"""Benchmark Tessera's aggregation methods against crowd-kit on the same simulated votes.

Usage: ``python bench/aggregation.py [--quick] [--seed N]``

Crowd: 50% diligent, 20% sloppy, 20% random clickers, 10% adversaries; 5% of items are gold
(given to Tessera's methods and, as ``true_labels``, to crowd-kit's DawidSkene+gold; accuracy and
calibration are measured on the other items). Timings start from the same plain arrays on both
sides: Tessera's include building Votes, crowd-kit's its DataFrame handling inside ``fit``.
Times are the best of three runs (one for the 10M-vote scale run).
Targets: accuracy >= crowd-kit DawidSkene, >= 20x faster, EM over 10M votes < 10 s, ECE <= 0.03.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
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
from ml.aggregation.simulate import sample_coverage, sample_gold, simulate_crowd

MIX = {"diligent": 0.5, "sloppy": 0.2, "random_clicker": 0.2, "adversary": 0.1}


@dataclass(frozen=True)
class Sizes:
    items: int
    workers: int
    votes_per_item: int
    scale_votes: int
    mask_side: int
    annotators: int


FULL = Sizes(50_000, 1_000, 7, 10_000_000, 256, 5)
QUICK = Sizes(5_000, 150, 7, 1_000_000, 64, 5)


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


def _masks(sizes: Sizes, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    n = sizes.mask_side
    yy, xx = np.mgrid[0:n, 0:n]
    truth = (yy - n / 2) ** 2 / (n / 3) ** 2 + (xx - n / 2) ** 2 / (n / 4) ** 2 < 1
    flips = [0.03, 0.06, 0.1, 0.5, 0.85][: sizes.annotators]  # last two: random, adversary
    masks = np.stack([truth ^ (rng.random(truth.shape) < p) for p in flips])
    return truth, masks


def bench_dense(sizes: Sizes, seed: int) -> None:
    truth, masks = _masks(sizes, np.random.default_rng(seed))
    print(
        f"\n## dense: {masks.shape[0]} annotators x {truth.shape[0]}x{truth.shape[1]} "
        f"(flip rates 3%, 6%, 10%, random, adversary)"
    )
    print(f"{'method':<28}{'accuracy':>10}{'ECE':>8}{'seconds':>10}")
    fused, dt = timed(lambda: fuse_masks(masks))
    acc = float(np.mean(fused.hard == truth))
    ece = expected_calibration_error(fused.soft.reshape(-1), truth.reshape(-1))
    print(f"{'tessera fuse_masks':<28}{acc:>10.4f}{ece:>8.4f}{dt:>10.3f}")
    df = pd.DataFrame({"worker": range(len(masks)), "task": 0, "segmentation": list(masks)})
    models = (
        ("MajorityVote", SegmentationMajorityVote()),
        ("SegmentationEM", SegmentationEM()),
        ("SegmentationRASA", SegmentationRASA()),
    )
    for label, model in models:
        out, dt = timed(partial(model.fit_predict, df))
        acc = float(np.mean(np.asarray(out.iloc[0], dtype=bool) == truth))
        print(f"crowdkit {label:<19}{acc:>10.4f}{'-':>8}{dt:>10.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    print(f"# aggregation benchmark ({'quick' if args.quick else 'full'}), seed {args.seed}")
    bench_votes(sizes, args.seed)
    bench_scale(sizes, args.seed)
    bench_dense(sizes, args.seed)


if __name__ == "__main__":
    main()
