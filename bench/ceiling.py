"""The composition's ceiling: mask IoU when every answer is right, against human-seconds.

Usage: ``python bench/ceiling.py [--scenes demo|photo] [--images N] [--seed S] [--min-cell-px P ...]
[--methods ...] [--crowd perfect|realistic|harsh] [--votes K]``

A perfect crowd answers "is any of it in this square" with the truth (a cell is positive when the
ground truth touches it). Windows open as the product opens them (the refinement rules on the
border, down to ``min_cell_px`` pixels per cell side and ``max_level``), one level at a time;
after each level the mask is composed from the finest cells by each method of
``ml.composition`` (``cells``: whole-cell painting, the old composition) and scored against the
truth. Each window costs ``--votes`` grids of 10.3 s (the measured mean time of a reCAPTCHA
image grid); human-seconds are per object (one object = one (image, tag) target).
``--crowd realistic`` (or ``harsh``) has simulated volunteers answer instead (``crowd_levels``):
a quick stand-in for the campaign's crowd, with its mistakes in the claimed cells, minutes where
a campaign takes half an hour (no picker, no learning of credibility: ``bench/campaign.py``
stays the yardstick).

The last line per method is for scripts:
``ceiling: method=... min_cell_px=... iou=... seconds=...`` (means over targets, all levels).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ml.aggregation import grid
from ml.aggregation.rules import RefinementConfig, choose_refinements
from ml.aggregation.simulate import PROFILES, answer
from ml.aggregation.simulate.masks import photo_like_scene
from ml.composition import METHODS, compose_mask
from ml.demo.scenes import generate_scenes

SECONDS_PER_GRID = 10.3


def iou(mask: np.ndarray, truth: np.ndarray) -> float:
    union = np.logical_or(mask, truth).sum()
    return 1.0 if union == 0 else float(np.logical_and(mask, truth).sum() / union)


Answerer = Callable[[np.ndarray], np.ndarray]  # a window's new cells' coverage -> their posteriors


def answered_levels(
    truth: np.ndarray, config: RefinementConfig, answer_window: Answerer
) -> list[tuple[int, list]]:
    """(windows opened so far, finest cells with their posteriors) after each level: each new
    window's cells are answered once (``answer_window``) and windows open on the posteriors'
    side of one half, as the product's refinement rules open them."""
    h, w = truth.shape
    cells = list(grid.children(grid.ROOT))
    probs = answer_window(grid.cell_coverage(truth, cells, square=config.square))
    opened = [grid.ROOT]
    out = []
    frontier = [grid.ROOT]
    while frontier:
        out.append((len(opened), list(zip(cells, probs, strict=True))))
        labels = (probs > 0.5).astype(np.int8)
        frontier = choose_refinements(cells, labels, h, w, opened=set(opened), config=config)
        opened += frontier
        new = grid.inside_children(frontier, h, w, square=config.square)
        cells += new
        probs = np.concatenate(
            [probs, answer_window(grid.cell_coverage(truth, new, square=config.square))]
        )
    return out


def perfect_levels(truth: np.ndarray, config: RefinementConfig) -> list[tuple[int, list]]:
    """``answered_levels`` with perfect answers: a cell is positive when the truth touches it."""
    return answered_levels(truth, config, lambda coverage: (coverage > 0).astype(np.int8))


CROWDS = {  # the campaign's crowds (bench/campaign.py), as shares of each kind
    "realistic": {"diligent": 0.80, "sloppy": 0.15, "random_clicker": 0.05},
    "harsh": {"diligent": 0.6, "sloppy": 0.2, "random_clicker": 0.1, "adversary": 0.1},
}


def crowd_levels(
    truth: np.ndarray, config: RefinementConfig, rng: np.random.Generator, *, votes: int, crowd: str
) -> list[tuple[int, list]]:
    """``answered_levels`` with simulated volunteers' answers: each window gets ``votes``
    answers from volunteers drawn from ``crowd`` (``ml.aggregation.simulate`` profiles: a
    volunteer misses an object under their coverage threshold and errs at their rates), and a
    cell's posterior is Bayes' rule over its votes with each kind's own rates (what the
    consensus learns of a volunteer, known here), even prior odds: a fast stand-in for a
    campaign's crowd, mistakes included."""
    kinds = list(CROWDS[crowd])
    shares = np.asarray([CROWDS[crowd][k] for k in kinds])
    profiles = [PROFILES[k] for k in kinds]

    def answer_window(coverage: np.ndarray) -> np.ndarray:
        logodds = np.zeros(len(coverage))
        for _ in range(votes):
            for i, cov in enumerate(coverage):
                pr = profiles[rng.choice(len(kinds), p=shares)]
                said, _ = answer(pr, [cov], rng)
                yes = pr.sensitivity / (1.0 - pr.specificity)
                no = (1.0 - pr.sensitivity) / pr.specificity
                logodds[i] += np.log(yes if said[0] else no)
        return np.asarray(1.0 / (1.0 + np.exp(-logodds)))

    return answered_levels(truth, config, answer_window)


def scene_targets(kind: str, *, seed: int, n_images: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image, truth) pairs: every tag of the demo's scenes, or one object per photograph-like
    scene (an image source independent of the demo's flat shapes)."""
    if kind == "photo":
        rng = np.random.default_rng(seed)
        scenes = [photo_like_scene(rng) for _ in range(n_images)]
        return [(s.image, s.truth) for s in scenes]
    demo = generate_scenes(seed=seed, n_images=n_images)
    return [(s.image, m) for s in demo for m in s.tag_masks.values()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--votes", type=int, default=1, help="votes per window (k)")
    parser.add_argument("--min-cell-px", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--max-level", type=int, default=4)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument(
        "--scenes",
        choices=("demo", "photo"),
        default="demo",
        help="demo: the demo's procedural scenes (every tag of each image); photo: "
        "photograph-like scenes (ml.aggregation.simulate.masks, one object each, 480x640)",
    )
    parser.add_argument(
        "--crowd",
        choices=("perfect", *CROWDS),
        default="perfect",
        help="who answers: the truth, or simulated volunteers (crowd_levels)",
    )
    parser.add_argument(
        "--image-frame",
        action="store_true",
        help="cells follow each image's aspect (projects made before square cells)",
    )
    args = parser.parse_args()
    targets = scene_targets(args.scenes, seed=args.seed, n_images=args.images)
    print(
        f"{args.images} {args.scenes} images, {len(targets)} targets, "
        f"{args.votes} vote(s) per window, {args.crowd} answers"
    )
    rng = np.random.default_rng(args.seed)
    for min_px in args.min_cell_px:
        config = RefinementConfig(
            min_cell_px=min_px, max_level=args.max_level, square=not args.image_frame
        )
        rows: dict[str, list[list[tuple[float, float]]]] = {m: [] for m in args.methods}
        took = dict.fromkeys(args.methods, 0.0)
        for image, truth in targets:
            levels = (
                perfect_levels(truth, config)
                if args.crowd == "perfect"
                else crowd_levels(truth, config, rng, votes=args.votes, crowd=args.crowd)
            )
            for method in args.methods:
                curve = []
                for windows, answered in levels:
                    cells = [c for c, _ in answered]
                    probs = [float(y) for _, y in answered]
                    started = time.perf_counter()
                    hard = compose_mask(
                        image, cells, probs, method=method, square=config.square
                    ).hard
                    took[method] += time.perf_counter() - started
                    seconds = windows * args.votes * SECONDS_PER_GRID
                    curve.append((seconds, iou(hard, truth)))
                rows[method].append(curve)
        for method, curves in rows.items():
            final = [c[-1] for c in curves]
            by_depth = max(len(c) for c in curves)
            parts = []
            for d in range(by_depth):
                pts = [c[min(d, len(c) - 1)] for c in curves]
                mean_iou, mean_s = np.mean([p[1] for p in pts]), np.mean([p[0] for p in pts])
                parts.append(f"L{d + 1} {mean_iou:.3f}@{mean_s:.0f}s")
            print(f"  min_cell_px {min_px:3d} {method:8s} " + "  ".join(parts))
            print(
                f"ceiling: method={method} min_cell_px={min_px} "
                f"iou={np.mean([f[1] for f in final]):.3f} "
                f"seconds={np.mean([f[0] for f in final]):.0f} "
                f"compose_ms={1000 * took[method] / max(1, sum(len(c) for c in curves)):.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
