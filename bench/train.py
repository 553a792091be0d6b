"""Training and prediction speed of Tessera's models, and their quality on the demo data.

Usage: ``python bench/train.py [--quick] [--device cpu|cuda|auto] [--images N] [--skip-speed]``
(``--help`` lists the size, epoch, step, encoder and worker flags).

Speed: images/s of a training step (forward, backward, AdamW step) and of prediction
(``inference_mode`` forward) on random tensors, for the segmenter (smp Unet, resnet34 encoder,
512x512, no weights downloaded) and the tagger (timm resnet18, 256x256), warm-up steps excluded
and the GPU synchronised around each timed loop. On a GPU each runs twice in the same process,
fp32 and bf16 autocast + channels_last, and the ratio (bf16+CL / fp32) is printed; on the CPU
only fp32 runs (bf16 autocast + channels_last is the GPU path of ``ml.train``).

Quality (an upper bound: trained from exact ground truth): a seeded demo dataset
(``ml.demo.write_demo_dataset``), the last 20% of its images held out. ``ml.train.train_tagger``
fits the tagger on the tags and ``ml.train.train_segmenter`` the segmenter on the masks of the
rest; the held-out images give tagger mAP, macro F1 at 0.5 and with per-tag thresholds, and
segmenter mIoU and boundary F1. ``train_tagger`` tunes its thresholds on the split it scores,
which flatters that F1, so the F1 with thresholds cross-fitted over two halves of the held-out
images (tuned on one half, scored on the other) is printed beside it. Nothing is selected on the
held-out images (no early stopping), so mAP and mIoU are honest for this data.

``--quick`` shrinks everything (60 images, 128 px, resnet18 encoder, 6 tagger epochs, 200
segmenter steps, two timed steps) to finish on a 2-core CPU in minutes; its 12 held-out images
make noisy scores. The defaults (400 images, 256 px, resnet34 encoder, 30 tagger epochs, 1600
segmenter steps) are meant for a GPU.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from ml.coco import read_demo
from ml.data import TaggerItem, load_images
from ml.demo import write_demo_dataset
from ml.hierarchy import close_hierarchy
from ml.metrics import apply_thresholds, tag_scores, tune_thresholds
from ml.segmenter import SegmenterConfig, build_segmenter, weighted_bce_dice
from ml.tagger import Tagger, TaggerConfig, build_tagger
from ml.train import (
    SegmenterTrainConfig,
    TaggerTrainConfig,
    resolve_device,
    train_segmenter,
    train_tagger,
)

SPEED_TAGS = 16  # output channels of the speed models (the demo vocabulary has 16 tags)
SEGMENTER_SPEED = ("Unet", "resnet34", 512)  # arch, encoder, input side
TAGGER_SPEED = ("resnet18", 256)  # backbone, input side
HELD_OUT = 0.2


@dataclass(frozen=True)
class Speed:
    model: str
    mode: str
    batch: int
    train_ips: float
    predict_ips: float
    peak_gib: float | None  # CUDA peak memory over the training and prediction loops


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _rate(
    step: Callable[[], None], images: int, steps: int, warmup: int, dev: torch.device
) -> float:
    """Images/s of ``steps`` calls of ``step`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    _sync(dev)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(dev)
    return images * steps / (time.perf_counter() - start)


def measure(
    name: str,
    model: nn.Module,
    loss: Callable[[torch.Tensor], torch.Tensor],
    size: int,
    batch: int,
    dev: torch.device,
    *,
    fast: bool,
    steps: int,
    warmup: int,
) -> Speed:
    """Images/s for training and prediction; ``fast``: bf16 autocast + channels_last."""
    model = model.to(dev)
    x = torch.rand(batch, 3, size, size, device=dev)
    if fast:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def autocast() -> torch.autocast:
        return torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=fast)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            logits = model(x)
        loss(logits).backward()
        optimizer.step()

    def predict_step() -> None:
        with torch.inference_mode(), autocast():
            model(x)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    model.train()
    train_ips = _rate(train_step, batch, steps, warmup, dev)
    model.eval()
    predict_ips = _rate(predict_step, batch, steps, warmup, dev)
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    mode = "bf16+channels_last" if fast else "fp32"
    return Speed(name, mode, batch, train_ips, predict_ips, peak)


def speed(dev: torch.device, quick: bool) -> list[Speed]:
    """Both models, fp32 (and bf16 + channels_last on a GPU), on random tensors."""
    tags = tuple(f"t{i}" for i in range(SPEED_TAGS))
    arch, encoder, seg_size = SEGMENTER_SPEED
    backbone, tag_size = TAGGER_SPEED
    if dev.type == "cpu":
        seg_batch, tag_batch = 2, 8
        steps, warmup = (2, 1) if quick else (5, 2)
    else:
        seg_batch, tag_batch = 16, 64
        steps, warmup = (10, 3) if quick else (30, 5)
    seg_name = f"segmenter {arch}/{encoder} {seg_size}px"
    tag_name = f"tagger {backbone} {tag_size}px"
    results = []
    for fast in (False, True) if dev.type == "cuda" else (False,):
        torch.manual_seed(0)
        segmenter = build_segmenter(
            SegmenterConfig(tags, arch=arch, encoder=encoder, input_size=seg_size)
        )
        masks = torch.zeros(seg_batch, len(tags), seg_size, seg_size, device=dev)
        weights = torch.ones_like(masks)
        results.append(
            measure(
                seg_name,
                segmenter,
                partial(weighted_bce_dice, masks=masks, weights=weights),
                seg_size,
                seg_batch,
                dev,
                fast=fast,
                steps=steps,
                warmup=warmup,
            )
        )
        del segmenter
        tagger = build_tagger(TaggerConfig(tags, backbone=backbone, input_size=tag_size))
        results.append(
            measure(
                tag_name,
                tagger,
                lambda logits: logits.float().sigmoid().mean(),
                tag_size,
                tag_batch,
                dev,
                fast=fast,
                steps=steps,
                warmup=warmup,
            )
        )
        del tagger
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return results


def speedups(results: list[Speed]) -> list[tuple[str, float, float]]:
    """(model, train ratio, predict ratio) of bf16+channels_last over fp32, where both ran."""
    out = []
    for model in dict.fromkeys(r.model for r in results):
        modes = {r.mode: r for r in results if r.model == model}
        if "fp32" in modes and "bf16+channels_last" in modes:
            fp32, fast = modes["fp32"], modes["bf16+channels_last"]
            out.append(
                (model, fast.train_ips / fp32.train_ips, fast.predict_ips / fp32.predict_ips)
            )
    return out


def print_speed(results: list[Speed], dev: torch.device) -> None:
    print(
        f"{'model':32s} {'mode':19s} {'batch':>5s} {'train img/s':>12s} {'predict img/s':>14s}"
        + (f" {'peak GiB':>9s}" if dev.type == "cuda" else "")
    )
    for r in results:
        peak = f" {r.peak_gib:9.2f}" if r.peak_gib is not None else ""
        print(
            f"{r.model:32s} {r.mode:19s} {r.batch:5d} {r.train_ips:12.2f} "
            f"{r.predict_ips:14.2f}{peak}"
        )
    for model, train_x, predict_x in speedups(results):
        ratios = f"train {train_x:.2f}x, predict {predict_x:.2f}x"
        print(f"{model}: bf16+channels_last / fp32 = {ratios}")
    if dev.type == "cpu":
        print("(CPU: fp32 only; bf16 autocast + channels_last is measured on a GPU)")


def tag_probabilities(
    model: Tagger, items: list[TaggerItem], dev: torch.device, batch: int = 32
) -> npt.NDArray[np.float64]:
    """Raw sigmoid probabilities ``(N, T)`` in fp32, as ``train_tagger`` scores them."""
    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(items), batch):
            chunk = items[start : start + batch]
            images = load_images([i.image for i in chunk], model.config.input_size).to(dev)
            out.append(torch.sigmoid(model(images).float()).cpu())
    return torch.cat(out).double().numpy()


def cross_fitted_f1(
    probs: npt.NDArray[np.float64], labels: npt.NDArray[np.float64], parents: npt.ArrayLike
) -> float:
    """Macro F1 with per-tag thresholds tuned on one half of the images, applied to the other
    (both ways), decisions pooled and hierarchy-closed as ``ml.train`` does."""
    halves = (np.arange(len(probs)) % 2 == 0, np.arange(len(probs)) % 2 == 1)
    decided = np.zeros(probs.shape, dtype=bool)
    for fit, score in (halves, halves[::-1]):
        thresholds = tune_thresholds(probs[fit], labels[fit])
        decided[score] = apply_thresholds(probs[score], thresholds)
    return tag_scores(close_hierarchy(decided, parents), labels).macro_f1


def quality(dev: torch.device, args: argparse.Namespace) -> dict[str, float | int]:
    """Train both models from ground truth on the demo data; score them on held-out images."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "demo"
        start = time.perf_counter()
        write_demo_dataset(folder, seed=args.seed, n_images=args.images)
        split = read_demo(folder)
        generate_s = time.perf_counter() - start
        n = len(split.tagger_items)
        cut = n - max(2, round(HELD_OUT * n))
        if cut < 2:
            raise SystemExit(f"--images {args.images} is too few to split; use 10 or more")
        train_tags, held_tags = split.tagger_items[:cut], split.tagger_items[cut:]
        start = time.perf_counter()
        tagger = train_tagger(
            TaggerTrainConfig(
                TaggerConfig(split.tags, split.parents, backbone="resnet18", input_size=args.size),
                epochs=args.tagger_epochs,
                batch_size=args.tagger_batch,
                loss="asl",
                seed=args.seed,
                num_workers=args.workers,
            ),
            train_tags,
            held_tags,
            device=dev,
        )
        tagger_s = time.perf_counter() - start
        labels = np.stack([np.asarray(i.labels, np.float64) for i in held_tags])
        probs = tag_probabilities(tagger.model, held_tags, dev)
        crossed = cross_fitted_f1(probs, labels, tagger.model.config.parent_array())
        start = time.perf_counter()
        segmenter = train_segmenter(
            SegmenterTrainConfig(
                SegmenterConfig(split.tags, encoder=args.encoder, input_size=args.size),
                steps=args.segmenter_steps,
                batch_size=args.segmenter_batch,
                seed=args.seed,
                num_workers=args.workers,
            ),
            split.segmenter_items[:cut],
            split.segmenter_items[cut:],
            device=dev,
        )
        segmenter_s = time.perf_counter() - start
    present = int((labels.sum(axis=0) > 0).sum())
    return {
        "train images": cut,
        "held-out images": n - cut,
        f"held-out tags with a positive (of {len(split.tags)})": present,
        "demo generation + read s": generate_s,
        "tagger mAP": tagger.metrics.map,
        "tagger macro F1 @0.5": tagger.metrics.macro_f1_at_half,
        "tagger macro F1 tuned on held-out": tagger.metrics.macro_f1,
        "tagger macro F1 tuned 2-fold": crossed,
        "tagger train + eval s": tagger_s,
        "tagger final train loss": tagger.losses[-1],
        "segmenter mIoU": segmenter.metrics.miou,
        "segmenter boundary F1": segmenter.metrics.mean_boundary_f1,
        "segmenter steps": segmenter.steps,
        "segmenter train s": segmenter.seconds,
        "segmenter train + eval s": segmenter_s,
        "segmenter final train loss": segmenter.losses[-1],
    }


def _value(value: float | int) -> str:
    return f"{value:10d}" if isinstance(value, int) else f"{value:10.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for a 2-core CPU")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    parser.add_argument("--images", type=int, default=None, help="demo images (400; quick 60)")
    parser.add_argument("--size", type=int, default=None, help="input side, px (256; quick 128)")
    parser.add_argument("--encoder", default=None, help="smp encoder (resnet34; quick resnet18)")
    parser.add_argument("--tagger-epochs", type=int, default=None, help="(30; quick 6)")
    parser.add_argument("--segmenter-steps", type=int, default=None, help="(1600; quick 200)")
    parser.add_argument("--tagger-batch", type=int, default=None, help="(16; quick 8)")
    parser.add_argument("--segmenter-batch", type=int, default=None, help="(8; quick 4)")
    parser.add_argument(
        "--workers", type=int, default=None, help="DataLoader workers (0 on CPU; GPU up to 8)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args()
    quick = args.quick
    dev = resolve_device(args.device)
    args.images = args.images or (60 if quick else 400)
    args.size = args.size or (128 if quick else 256)
    args.encoder = args.encoder or ("resnet18" if quick else "resnet34")
    args.tagger_epochs = args.tagger_epochs or (6 if quick else 30)
    args.segmenter_steps = args.segmenter_steps or (200 if quick else 1600)
    args.tagger_batch = args.tagger_batch or (8 if quick else 16)
    args.segmenter_batch = args.segmenter_batch or (4 if quick else 8)
    if args.workers is None:
        args.workers = 0 if dev.type == "cpu" else min(8, os.cpu_count() or 1)
    torch.backends.cudnn.benchmark = True
    name = (
        torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads, {os.cpu_count()} cores)"
    )
    print(f"torch {torch.__version__} on {name}{' [--quick]' if quick else ''}")
    began = time.perf_counter()

    results: list[Speed] = []
    if not args.skip_speed:
        print("\n== speed (images/s; random tensors, warm-up excluded)")
        results = speed(dev, quick)
        print_speed(results, dev)

    config = (
        f"{args.images} images ({HELD_OUT:.0%} held out), {args.size}px, seed {args.seed}, "
        f"workers {args.workers}; tagger resnet18 ASL {args.tagger_epochs} epochs "
        f"batch {args.tagger_batch}; segmenter Unet/{args.encoder} {args.segmenter_steps} "
        f"steps batch {args.segmenter_batch}"
    )
    scores: dict[str, float | int] = {}
    if not args.skip_quality:
        print(
            "\n== quality on held-out demo images (trained from ground truth: an upper bound)\n"
            + config
        )
        scores = quality(dev, args)
        for key, value in scores.items():
            print(f"{key:44s} {_value(value)}")

    total_s = time.perf_counter() - began
    print("\n== summary")
    rows: list[tuple[str, str]] = [
        ("device", name),
        ("torch", torch.__version__),
        ("run", "--quick" if quick else "full"),
    ]
    for r in results:
        rows.append((f"{r.model} {r.mode} train img/s", f"{r.train_ips:.2f}"))
        rows.append((f"{r.model} {r.mode} predict img/s", f"{r.predict_ips:.2f}"))
    for model, train_x, predict_x in speedups(results):
        rows.append((f"{model} bf16+CL/fp32", f"train {train_x:.2f}x, predict {predict_x:.2f}x"))
    if results and dev.type == "cpu":
        rows.append(("bf16+CL/fp32", "not measured on the CPU"))
    if scores:
        rows.append(("quality config", config))
        keep = (
            "tagger mAP",
            "tagger macro F1 @0.5",
            "tagger macro F1 tuned 2-fold",
            "tagger train + eval s",
            "segmenter mIoU",
            "segmenter boundary F1",
            "segmenter steps",
            "segmenter train s",
            "segmenter train + eval s",
        )
        rows.extend((key, _value(scores[key]).strip()) for key in keep)
    rows.append(("total wall s", f"{total_s:.1f}"))
    width = max(len(key) for key, _ in rows)
    for key, text in rows:
        print(f"{key:{width}s}  {text}")


if __name__ == "__main__":
    main()
