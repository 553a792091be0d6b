"""Training loops of the tagger and the segmenter: small, seeded, device-agnostic.

``train_tagger(config, train_items, val_items, device=..., progress=...)`` fits the tagger with
a loss from ``ml.losses`` (BCE with positive weights from the training split, or ASL), then
tunes a threshold per tag for F1 on the validation split and reports mAP and per-tag
precision/recall/F1 there. ``train_segmenter`` fits BCE + Dice weighted per pixel and reports
IoU, mIoU and boundary F1 on the validation split, at the model's input resolution.

Training length is a number of optimizer steps (``steps``): the shuffled data is cycled, each
pass reshuffled and re-augmented, however many items there are, so that a round's training time
does not depend on the size of the data (the tagger may say ``epochs`` instead: that many passes).
Every random generator training draws from (Python, NumPy, torch, the loader's shuffling) is
seeded from the config's ``seed``: the same config and data give the same model. Cycling makes
reading the same items again the main cost on a CPU (a demo image's 16 mask planes take about
0.4 s to read and resize), so without loader workers the segmenter's items are read once and
kept small (``CachedSegmenterDataset``).

Both use AdamW with a cosine schedule; on a GPU they run in bf16 autocast with channels_last
(``amp``/``channels_last`` in the config; ignored on the CPU). Progress goes to a callback, one
call per optimizer step; nothing is printed.

Under ``torchrun`` (a process group opened by ``ml.distributed``) every rank calls the same
function with the same items and config; the model is wrapped in DistributedDataParallel (rank
0's initial weights go to every rank). ``batch_size`` stays the global batch: each optimizer
step's batch is the one one process would take, cut into ``world_size`` equal slices, one per
rank (``ml.distributed.RankBatches``), and DDP averages the slices' gradients. So the steps, the
passes and the data order are those of one process; what differs is per rank: BatchNorm's
statistics (over the slice), the augmentation draws (each rank seeds ``seed + rank``) and Dice's
normalisation. The validation split is scored by rank 0 alone on the unwrapped model and its
scores given to every rank: they are exactly one process's scores for that model.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence, Sized
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from ml import distributed
from ml.data import (
    Augment,
    SegmenterDataset,
    SegmenterItem,
    TaggerDataset,
    TaggerItem,
    augment_pair,
    read_rgb,
    read_targets,
    resize,
)
from ml.hierarchy import close_hierarchy
from ml.losses import get_loss, positive_weights
from ml.metrics import (
    apply_thresholds,
    average_precision,
    mean_average_precision,
    tag_scores,
    tune_thresholds,
)
from ml.segmenter import (
    SegmentationMeter,
    SegmentationScores,
    Segmenter,
    SegmenterConfig,
    build_segmenter,
    weighted_bce_dice,
)
from ml.tagger import Tagger, TaggerConfig, build_tagger

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """One optimizer step: ``step`` (1-based) of ``steps``, its loss, the seconds since
    training began, and the pass over the data it belongs to (1-based)."""

    task: str  # "tagger" | "segmenter"
    step: int
    steps: int
    loss: float
    seconds: float
    epoch: int


ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class TaggerTrainConfig:
    model: TaggerConfig
    epochs: int = 10  # passes over the data, unless ``steps`` is given
    steps: int | None = None  # optimizer steps; overrides ``epochs``
    batch_size: int = 32  # the global batch: under torchrun, split over the ranks
    lr: float = 1e-3
    weight_decay: float = 1e-4
    loss: str = "asl"  # a key of ml.losses.LOSSES
    seed: int = 0
    augment: Augment = field(default_factory=Augment)
    num_workers: int = 0
    amp: bool = True  # bf16 autocast, GPU only
    channels_last: bool = True  # GPU only


@dataclass(frozen=True)
class SegmenterTrainConfig:
    model: SegmenterConfig
    steps: int = 200  # optimizer steps, the data cycled as needed
    batch_size: int = 8  # the global batch: under torchrun, split over the ranks
    lr: float = 1e-3
    weight_decay: float = 1e-4
    dice_weight: float = 1.0
    seed: int = 0
    augment: Augment = field(default_factory=Augment)
    num_workers: int = 0
    amp: bool = True
    channels_last: bool = True


@dataclass(frozen=True)
class TaggerMetrics:
    """Validation metrics; per-tag arrays are ``(T,)``, in tag order."""

    map: float
    ap: npt.NDArray[np.float64]
    precision: npt.NDArray[np.float64]
    recall: npt.NDArray[np.float64]
    f1: npt.NDArray[np.float64]
    macro_f1: float
    macro_f1_at_half: float  # the same with a single 0.5 threshold, for comparison

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN becomes None)."""

        def clean(a: npt.NDArray[np.float64]) -> list[float | None]:
            return [None if np.isnan(v) else float(v) for v in a]

        return {
            "map": None if np.isnan(self.map) else self.map,
            "ap": clean(self.ap),
            "precision": clean(self.precision),
            "recall": clean(self.recall),
            "f1": clean(self.f1),
            "macro_f1": self.macro_f1,
            "macro_f1_at_half": self.macro_f1_at_half,
        }


@dataclass(frozen=True)
class TaggerResult:
    model: Tagger
    metrics: TaggerMetrics
    thresholds: npt.NDArray[np.float64]
    losses: list[float]  # mean training loss per pass over the data (the last may be partial)
    steps: int  # optimizer steps taken
    seconds: float  # training time, evaluation excluded


@dataclass(frozen=True)
class SegmenterResult:
    model: Segmenter
    metrics: SegmentationScores
    losses: list[float]  # mean training loss per pass over the data (the last may be partial)
    steps: int
    seconds: float


@dataclass(frozen=True)
class Fitted:
    """What the shared loop reports: the mean loss per pass, the steps taken, the seconds."""

    losses: list[float]
    steps: int
    seconds: float


CACHE_BYTES = 2**30  # the most memory the cached items of one training run take


class CachedSegmenterDataset(Dataset[tuple[Tensor, Tensor, Tensor]]):
    """``SegmenterDataset`` whose items are read once and kept in memory, smaller.

    An item is kept as its image and the planes of the tags it has weight for (masks and
    weights; other tags weigh 0 everywhere, so nothing is lost), squashed to a square of side
    ``ceil(size / min_scale)``: the smallest random crop still spans ``size`` pixels, so the
    model sees what it would have seen from the full image. Draws augment the kept tensors
    and resize them to ``size``, as ``SegmenterDataset`` does. Items past ``CACHE_BYTES`` are
    read from disk each time. Shapes as ``SegmenterDataset``.
    """

    def __init__(
        self, items: Sequence[SegmenterItem], n_tags: int, size: int, augment: Augment
    ) -> None:
        self.items, self.n_tags, self.size, self.augment = list(items), n_tags, size, augment
        self.side = math.ceil(size / augment.min_scale) if augment.min_scale > 0 else size
        self.kept: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        self.kept_bytes = 0

    def __len__(self) -> int:
        return len(self.items)

    def _read(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        """(image ``(3, s, s)``, tag indices ``(k,)``, planes ``(2, k, s, s)``), float16."""
        if index in self.kept:
            return self.kept[index]
        item = self.items[index]
        image = read_rgb(item.image)
        targets = read_targets(item, self.n_tags, image.shape[-2], image.shape[-1])
        present = torch.nonzero(targets[1].flatten(1).amax(dim=1) > 0).flatten()  # (k,)
        planes = targets[:, present].flatten(0, 1)  # (2k, H, W)
        k = len(present)
        small = resize(planes, self.side) if k else planes.new_zeros(0, self.side, self.side)
        read = (
            resize(image, self.side).half(),
            present,
            small.view(2, k, self.side, self.side).half(),
        )
        size = read[0].nbytes + read[2].nbytes
        if self.kept_bytes + size <= CACHE_BYTES:
            self.kept[index], self.kept_bytes = read, self.kept_bytes + size
        return read

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        image, present, planes = self._read(index)
        image, moved = augment_pair(image.float(), planes.float(), self.augment)
        planes = planes.float() if moved is None else moved  # (2, k, h, w)
        out = torch.zeros(2, self.n_tags, self.size, self.size)
        k = len(present)
        if k:
            out[:, present] = resize(planes.flatten(0, 1), self.size).view(2, k, *out.shape[-2:])
        return resize(image, self.size), out[0], out[1]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA: ``torch.manual_seed`` seeds every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else the CPU; ``cuda`` without a GPU is an error.
    Under torchrun, ``cuda`` is the GPU of the process's ``LOCAL_RANK``."""
    if str(device) == "auto":
        resolved = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but no GPU is visible; use 'cpu' or 'auto'")
    return distributed.local_device(resolved)


def _autocast(device: torch.device, amp: bool) -> AbstractContextManager[Any]:
    if device.type == "cuda" and amp:
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


def _prepare(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    model.to(device)
    if device.type == "cuda" and channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def _loader(
    dataset: Dataset[Any], batch_size: int, *, shuffle: bool, seed: int, workers: int
) -> DataLoader[Any]:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        generator=generator,
        drop_last=False,
    )


def _training_loader(
    dataset: Dataset[Any], config: TaggerTrainConfig | SegmenterTrainConfig
) -> DataLoader[Any]:
    """Shuffled batches of ``config.batch_size``; under torchrun, this rank's slice of each of
    them (the same global batches: the sampler is built and seeded as one process's is)."""
    world = distributed.world_size()
    if world == 1:
        return _loader(
            dataset, config.batch_size, shuffle=True, seed=config.seed, workers=config.num_workers
        )
    assert isinstance(dataset, Sized)
    generator = torch.Generator().manual_seed(config.seed)
    batches = BatchSampler(
        RandomSampler(dataset, generator=generator), config.batch_size, drop_last=False
    )
    return DataLoader(
        dataset,
        batch_sampler=distributed.RankBatches(batches, rank=distributed.rank(), world_size=world),
        num_workers=config.num_workers,
        generator=generator,
    )


def _cycle(loader: DataLoader[Any]) -> Iterator[tuple[int, tuple[Tensor, ...]]]:
    """``(pass, batch)`` forever: each pass over ``loader`` reshuffles (its seeded generator)
    and re-augments (the dataset draws from torch's seeded global generator)."""
    if len(loader) == 0:
        raise ValueError("nothing to train on: the data loader is empty")
    for epoch in itertools.count(1):
        for batch in loader:
            yield epoch, batch


def _fit(
    model: nn.Module,
    batches: Iterator[tuple[int, tuple[Tensor, ...]]],
    step_loss: Callable[[tuple[Tensor, ...]], Tensor],
    *,
    task: str,
    steps: int,
    lr: float,
    weight_decay: float,
    progress: ProgressCallback | None,
) -> Fitted:
    """The shared loop: exactly ``steps`` AdamW steps on a cosine schedule, one progress call
    per step."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    # The fused kernel: a resnet18 Unet's step takes 0.05 s on two CPU cores, 0.5 s unfused.
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=lr, weight_decay=weight_decay, fused=fused or None
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    by_pass: dict[int, list[float]] = {}
    started = time.perf_counter()
    model.train()
    # zip stops on the range first: no batch is loaded after the last step
    for step, (epoch, batch) in zip(range(1, steps + 1), batches, strict=False):
        loss = step_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        value = float(distributed.mean(loss.detach()))  # the global batch's, under torchrun
        by_pass.setdefault(epoch, []).append(value)
        seconds = time.perf_counter() - started
        if progress:
            progress(Progress(task, step, steps, value, seconds, epoch))
        if step == steps or step % max(1, steps // 10) == 0:
            log.info("%s step %d/%d: loss %.4f, %.1f s", task, step, steps, value, seconds)
    losses = [float(np.mean(v)) for v in by_pass.values()]
    return Fitted(losses, steps, time.perf_counter() - started)


def _tagger_probabilities(
    model: Tagger, loader: DataLoader[Any], device: torch.device, amp: bool
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    model.eval()
    probs, labels = [], []
    with torch.inference_mode(), _autocast(device, amp):
        for images, y in loader:
            probs.append(torch.sigmoid(model(images.to(device))).float().cpu())
            labels.append(y)
    if not probs:
        return np.zeros((0, model.config.n_tags)), np.zeros((0, model.config.n_tags))
    return torch.cat(probs).double().numpy(), torch.cat(labels).double().numpy()


def evaluate_tagger(
    probabilities: npt.NDArray[np.float64],
    labels: npt.NDArray[np.float64],
    parents: npt.ArrayLike,
) -> tuple[TaggerMetrics, npt.NDArray[np.float64]]:
    """Tune per-tag thresholds on a split and score it there (hierarchy closed).

    Shape:
        probabilities, labels ``(N, T)``; returns the metrics and the thresholds ``(T,)``.
    """
    thresholds = tune_thresholds(probabilities, labels)
    tuned = tag_scores(
        close_hierarchy(apply_thresholds(probabilities, thresholds), parents), labels
    )
    at_half = tag_scores(close_hierarchy(probabilities >= 0.5, parents), labels)
    metrics = TaggerMetrics(
        map=mean_average_precision(probabilities, labels),
        ap=average_precision(probabilities, labels),
        precision=tuned.precision,
        recall=tuned.recall,
        f1=tuned.f1,
        macro_f1=tuned.macro_f1,
        macro_f1_at_half=at_half.macro_f1,
    )
    return metrics, thresholds


def _train(
    net: nn.Module,
    dataset: Dataset[Any],
    config: TaggerTrainConfig | SegmenterTrainConfig,
    dev: torch.device,
    *,
    task: str,
    loss_of: Callable[[Tensor, list[Tensor]], Tensor],
    progress: ProgressCallback | None,
) -> Fitted:
    """Cycle ``dataset`` in shuffled batches ``(images, *targets)`` and fit ``net`` on
    ``loss_of(logits, targets)`` for the config's steps, in bf16 autocast and channels_last on a
    GPU. Under torchrun, in DistributedDataParallel on this rank's slice of each batch."""
    loader = _training_loader(dataset, config)
    model = distributed.parallel(net, dev)
    if model is not net:
        seed_everything(config.seed + distributed.rank())  # the ranks' augmentations differ
    memory = torch.channels_last if dev.type == "cuda" and config.channels_last else None

    def step_loss(batch: tuple[Tensor, ...]) -> Tensor:
        images, *targets = (t.to(dev) for t in batch)
        if memory is not None:
            images = images.contiguous(memory_format=memory)
        with _autocast(dev, config.amp):
            logits = model(images)
        return loss_of(logits, targets)

    return _fit(
        model,
        _cycle(loader),
        step_loss,
        task=task,
        steps=training_steps(config, batches_per_pass=len(loader)),
        lr=config.lr,
        weight_decay=config.weight_decay,
        progress=progress,
    )


def training_steps(
    config: TaggerTrainConfig | SegmenterTrainConfig, *, batches_per_pass: int
) -> int:
    """Optimizer steps a config asks for: its ``steps``, or (a tagger config without them)
    ``epochs`` passes of ``batches_per_pass`` batches."""
    if config.steps is not None:
        return config.steps
    assert isinstance(config, TaggerTrainConfig)
    return config.epochs * batches_per_pass


def train_tagger(
    config: TaggerTrainConfig,
    train_items: Sequence[TaggerItem],
    val_items: Sequence[TaggerItem],
    *,
    device: str | torch.device = "auto",
    progress: ProgressCallback | None = None,
    model: Tagger | None = None,
) -> TaggerResult:
    """Train (or fine-tune ``model``) and tune thresholds on ``val_items``.

    Without validation items the thresholds stay 0.5 and the metrics are NaN.

    Raises:
        ValueError: there are no training items.
    """
    if not train_items:
        raise ValueError("the tagger needs at least one training item")
    seed_everything(config.seed)
    dev = resolve_device(device)
    net = model if model is not None else build_tagger(config.model)
    _prepare(net, dev, config.channels_last)
    labels = np.stack([np.asarray(item.labels, np.float32) for item in train_items])
    loss_fn = get_loss(config.loss, pos_weight=positive_weights(labels)).to(dev)
    size = config.model.input_size
    fitted = _train(
        net,
        TaggerDataset(train_items, size, config.augment),
        config,
        dev,
        task="tagger",
        loss_of=lambda logits, targets: loss_fn(logits.float(), targets[0]),
        progress=progress,
    )
    metrics, thresholds = distributed.from_rank_zero(
        lambda: _score_tagger(net, val_items, dev, config.batch_size, config.amp)
    )
    return TaggerResult(net, metrics, thresholds, fitted.losses, fitted.steps, fitted.seconds)


def score_tagger(
    model: Tagger,
    items: Sequence[TaggerItem],
    *,
    device: str | torch.device = "auto",
    batch_size: int = 32,
    amp: bool = True,
) -> TaggerMetrics:
    """mAP and per-tag scores of a trained tagger on ``items`` (thresholds tuned there)."""
    dev = resolve_device(device)
    model.to(dev)
    return _score_tagger(model, items, dev, batch_size, amp)[0]


def _score_tagger(
    model: Tagger, items: Sequence[TaggerItem], dev: torch.device, batch_size: int, amp: bool
) -> tuple[TaggerMetrics, npt.NDArray[np.float64]]:
    loader = _loader(
        TaggerDataset(items, model.config.input_size),
        batch_size,
        shuffle=False,
        seed=0,
        workers=0,
    )
    probs, labels = _tagger_probabilities(model, loader, dev, amp)
    return evaluate_tagger(probs, labels, model.config.parent_array())


def evaluate_segmenter(
    model: Segmenter,
    items: Sequence[SegmenterItem],
    *,
    device: str | torch.device = "auto",
    batch_size: int = 8,
    amp: bool = True,
) -> SegmentationScores:
    """IoU per tag, mIoU and boundary F1 on ``items``, at the model's input resolution."""
    dev = resolve_device(device)
    cfg = model.config
    loader = _loader(
        SegmenterDataset(items, cfg.n_tags, cfg.input_size),
        batch_size,
        shuffle=False,
        seed=0,
        workers=0,
    )
    meter = SegmentationMeter(cfg.n_tags)
    model.eval()
    with torch.inference_mode(), _autocast(dev, amp):
        for images, masks, weights in loader:
            probs = torch.sigmoid(model(images.to(dev)).float())
            meter.update(probs, masks, weights)
    return meter.scores()


def train_segmenter(
    config: SegmenterTrainConfig,
    train_items: Sequence[SegmenterItem],
    val_items: Sequence[SegmenterItem],
    *,
    device: str | torch.device = "auto",
    progress: ProgressCallback | None = None,
    model: Segmenter | None = None,
) -> SegmenterResult:
    """Train (or fine-tune ``model``) on weighted masks for ``config.steps`` optimizer steps;
    score on ``val_items``.

    Raises:
        ValueError: there are no training items.
    """
    if not train_items:
        raise ValueError("the segmenter needs at least one training item")
    seed_everything(config.seed)
    dev = resolve_device(device)
    net = model if model is not None else build_segmenter(config.model)
    _prepare(net, dev, config.channels_last)
    cfg = config.model
    data: Dataset[Any] = (
        CachedSegmenterDataset(train_items, cfg.n_tags, cfg.input_size, config.augment)
        if config.num_workers == 0  # workers would each keep their own copy, for one pass
        else SegmenterDataset(train_items, cfg.n_tags, cfg.input_size, config.augment)
    )
    fitted = _train(
        net,
        data,
        config,
        dev,
        task="segmenter",
        loss_of=lambda logits, targets: weighted_bce_dice(
            logits, targets[0], targets[1], dice_weight=config.dice_weight
        ),
        progress=progress,
    )
    scores = distributed.from_rank_zero(
        lambda: evaluate_segmenter(
            net, val_items, device=dev, batch_size=config.batch_size, amp=config.amp
        )
    )
    return SegmenterResult(net, scores, fitted.losses, fitted.steps, fitted.seconds)
