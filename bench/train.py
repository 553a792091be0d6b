"""Training and prediction speed of Tessera's models, and their quality on the demo data.

Usage: ``python bench/train.py [--quick] [--device cpu|cuda|auto] [--images N]``

Speed: images/s of a training step (forward, backward, AdamW) and of prediction
(``inference_mode``) on random tensors, for the segmenter (smp Unet, resnet34 encoder, 512x512)
and the tagger (timm resnet18, 256x256), warm-up steps excluded. On a GPU each runs twice in the
same process, fp32 and bf16 autocast + channels_last, and the ratio is printed; on the CPU only
fp32 runs (bf16 autocast is a GPU path here).

Quality (an upper bound: trained from exact ground truth): a seeded demo dataset, the last 20%
of its images held out; the tagger trains on the tags and the segmenter on the masks of the
rest, and the held-out images give tagger mAP (macro F1 with tuned thresholds and at 0.5) and
segmenter mIoU and boundary F1. ``--quick`` shrinks everything to fit a 2-core CPU in minutes.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ml.coco import read_demo
from ml.demo import write_demo_dataset
from ml.segmenter import SegmenterConfig, build_segmenter, weighted_bce_dice
from ml.tagger import TaggerConfig, build_tagger
from ml.train import (
    SegmenterTrainConfig,
    TaggerTrainConfig,
    resolve_device,
    train_segmenter,
    train_tagger,
)


@dataclass(frozen=True)
class Speed:
    model: str
    mode: str
    train_ips: float
    predict_ips: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _rate(
    step: Callable[[], None], images: int, steps: int, warmup: int, dev: torch.device
) -> float:
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
    fast: bool,
    steps: int,
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
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            value = loss(model(x))
        value.backward()
        optimizer.step()

    def predict_step() -> None:
        model.eval()
        with torch.inference_mode(), autocast():
            model(x)

    warmup = 2 if dev.type == "cpu" else 5
    return Speed(
        name,
        "bf16+channels_last" if fast else "fp32",
        _rate(train_step, batch, steps, warmup, dev),
        _rate(predict_step, batch, steps, warmup, dev),
    )


def speed(dev: torch.device, quick: bool) -> list[Speed]:
    tags = tuple(f"t{i}" for i in range(16))
    seg_size, seg_batch = (512, 2) if dev.type == "cpu" else (512, 16)
    tag_size, tag_batch = (256, 8) if dev.type == "cpu" else (256, 64)
    steps = (2 if quick else 5) if dev.type == "cpu" else 20
    results = []
    for fast in (False, True) if dev.type == "cuda" else (False,):
        torch.manual_seed(0)
        segmenter = build_segmenter(
            SegmenterConfig(tags, arch="Unet", encoder="resnet34", input_size=seg_size)
        )
        ones = torch.ones(seg_batch, len(tags), seg_size, seg_size, device=dev)
        results.append(
            measure(
                "segmenter Unet/resnet34 512",
                segmenter,
                lambda y, ones=ones: weighted_bce_dice(y.float(), ones * 0, ones),
                seg_size,
                seg_batch,
                dev,
                fast,
                steps,
            )
        )
        tagger = build_tagger(TaggerConfig(tags, backbone="resnet18", input_size=tag_size))
        results.append(
            measure(
                "tagger resnet18 256",
                tagger,
                lambda y: y.float().sigmoid().mean(),
                tag_size,
                tag_batch,
                dev,
                fast,
                steps,
            )
        )
    return results


def quality(dev: torch.device, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "demo"
        write_demo_dataset(folder, seed=args.seed, n_images=args.images)
        split = read_demo(folder)
        cut = round(0.8 * len(split.tagger_items))
        start = time.perf_counter()
        tagger = train_tagger(
            TaggerTrainConfig(
                TaggerConfig(split.tags, split.parents, backbone="resnet18", input_size=args.size),
                epochs=args.tagger_epochs,
                batch_size=16,
                loss="asl",
                seed=args.seed,
            ),
            split.tagger_items[:cut],
            split.tagger_items[cut:],
            device=dev,
        )
        tagger_s = time.perf_counter() - start
        start = time.perf_counter()
        segmenter = train_segmenter(
            SegmenterTrainConfig(
                SegmenterConfig(split.tags, encoder=args.encoder, input_size=args.size),
                epochs=args.segmenter_epochs,
                batch_size=8,
                seed=args.seed,
            ),
            split.segmenter_items[:cut],
            split.segmenter_items[cut:],
            device=dev,
        )
        segmenter_s = time.perf_counter() - start
    return {
        "held-out images": len(split.tagger_items) - cut,
        "tagger mAP": tagger.metrics.map,
        "tagger macro F1 (tuned thresholds)": tagger.metrics.macro_f1,
        "tagger macro F1 (0.5)": tagger.metrics.macro_f1_at_half,
        "tagger train s": tagger_s,
        "segmenter mIoU": segmenter.metrics.miou,
        "segmenter boundary F1": segmenter.metrics.mean_boundary_f1,
        "segmenter train s": segmenter_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for a 2-core CPU")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--images", type=int, default=None, help="demo images (default 400)")
    parser.add_argument("--size", type=int, default=None, help="model input side (default 256)")
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--tagger-epochs", type=int, default=None)
    parser.add_argument("--segmenter-epochs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    quick = args.quick
    args.images = args.images or (60 if quick else 400)
    args.size = args.size or (128 if quick else 256)
    args.tagger_epochs = args.tagger_epochs or (8 if quick else 30)
    args.segmenter_epochs = args.segmenter_epochs or (8 if quick else 40)
    if quick and args.encoder == "resnet34":
        args.encoder = "resnet18"
    dev = resolve_device(args.device)
    torch.backends.cudnn.benchmark = True
    name = (
        torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"torch {torch.__version__} on {name}")
    if not args.skip_speed:
        print("\n== speed (images/s; random tensors, warm-up excluded)")
        results = speed(dev, quick)
        print(f"{'model':30s} {'mode':20s} {'train img/s':>12s} {'predict img/s':>14s}")
        for r in results:
            print(f"{r.model:30s} {r.mode:20s} {r.train_ips:12.1f} {r.predict_ips:14.1f}")
        if dev.type == "cuda":
            for model in dict.fromkeys(r.model for r in results):
                fp32, fast = [r for r in results if r.model == model]
                train_x = fast.train_ips / fp32.train_ips
                predict_x = fast.predict_ips / fp32.predict_ips
                print(
                    f"{model}: bf16+channels_last / fp32 = train {train_x:.2f}x, "
                    f"predict {predict_x:.2f}x"
                )
        else:
            print("(CPU: fp32 only; bf16 autocast + channels_last is measured on a GPU)")
    print(
        f"\n== quality on held-out demo images (trained from ground truth: an upper bound)\n"
        f"images {args.images}, input {args.size}px, tagger resnet18 {args.tagger_epochs} epochs,"
        f" segmenter Unet/{args.encoder} {args.segmenter_epochs} epochs, seed {args.seed}"
    )
    for key, value in quality(dev, args).items():
        print(f"{key:38s} {value:10.4f}" if isinstance(value, float) else f"{key:38s} {value:10d}")


if __name__ == "__main__":
    main()
