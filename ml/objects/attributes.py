"""Attribute-specific embeddings and attribute manipulation, learned from a project's objects.

After the fashion-retrieval work this follows (FIR + FAM: an attribute-specific embedding per
attribute group with a dictionary of attribute prototypes, and a manipulation network trained
semi-supervised with an adversarial loss), sized for a CPU:

- an object's description is the tagger's feature map pooled inside the object's mask (the
  object cropped alone, ``ml.objects.instances.object_crop``) beside its hand-made description
  (``describe``), standardised;
- each attribute group ``g`` embeds it into its own unit sphere, ``e_g = norm(MLP_g(x))``, and
  keeps one prototype per value; ``e_g`` is trained to lie nearest its value's prototype
  (cosine softmax), so each part of the embedding says one property;
- a manipulation network per group maps ``(e_g, old value, new value)`` to the embedding of the
  changed object, residually: ``e'_g = norm(e_g + MLP(e_g, old, new))``. There are no pairs of an
  object before and after a change, so it learns without them: ``e'_g`` must read as the new
  value, look like a real embedding of that value to a discriminator (the adversarial loss),
  come back when changed back (cycle) and stay put when nothing changes (identity);
- a general part tells apart objects whose attributes all agree, so that a plain search finds
  the same object again: each block of the description (the tagger's features of the object
  alone and with its surroundings, reduced to their principal components; the hand-made
  description; the surroundings) weighs the same in it, so that the few numbers that say where
  an object lies and how large it is are not drowned by a thousand deep features.

Everything is seeded; the result is plain numpy arrays (``AttributeWeights``) that
``ml.objects.index`` applies without torch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ml.objects.index import AttributeWeights, standardise
from ml.objects.instances import (
    DESCRIPTION_DIM,
    SURROUNDINGS_DIM,
    Group,
    Instance,
    describe,
    object_crop,
    surroundings,
)
from ml.tagger import Tagger

FloatArray = npt.NDArray[np.float32]
SCALE = 10.0  # the cosine softmax's temperature
CROP = 96  # the side an object is shown to the tagger at


@dataclass(frozen=True)
class AttributeOptions:
    steps: int = 400
    dim: int = 32  # each group's embedding
    hidden: int = 64
    block_dim: int = 24  # a block of the description wider than this keeps its principal parts
    lr: float = 3e-3
    batch_size: int = 256
    weight_decay: float = 1e-4
    noise: float = 0.1  # Gaussian noise on the standardised input, against overfitting
    adversarial: float = 0.2
    cycle: float = 1.0
    identity: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class AttributeReport:
    steps: int
    seconds: float
    accuracy: dict[str, float]  # per group: embeddings nearest their own value's prototype
    manipulated: dict[str, float]  # per group: changed embeddings read as the new value


@torch.no_grad()
def backbone_features(
    tagger: Tagger, crops: npt.NDArray[np.uint8], weights: FloatArray, device: torch.device
) -> FloatArray:
    """The tagger's last feature map pooled with each crop's object weights.

    Shape: crops ``(B, S, S, 3)`` uint8, weights ``(B, S, S)``; returns ``(B, C)``.
    """
    tagger.eval()
    x = torch.from_numpy(crops).to(device).permute(0, 3, 1, 2).float() / 255.0
    fmap = tagger.features(tagger.normalize(x))  # (B, C, h, w)
    w = torch.from_numpy(weights).to(device)[:, None]
    w = F.adaptive_avg_pool2d(w, fmap.shape[-2:])
    pooled = (fmap * w).sum(dim=(2, 3)) / w.sum(dim=(2, 3)).clamp_min(1e-6)
    out: FloatArray = pooled.cpu().numpy().astype(np.float32)
    return out


def feature_blocks(n_features: int) -> list[int]:
    """The widths of ``object_features``' blocks, in order, from how many numbers it gave."""
    deep, odd = divmod(n_features - DESCRIPTION_DIM - SURROUNDINGS_DIM, 2)
    if odd or deep < 0:
        raise ValueError(f"{n_features} features are not what object_features gives")
    if deep == 0:
        return [DESCRIPTION_DIM, SURROUNDINGS_DIM]
    return [deep, DESCRIPTION_DIM, deep, SURROUNDINGS_DIM]


def attribute_dim(n_features: int) -> int:
    """How many of ``object_features``' leading numbers describe the object itself (what the
    attribute embeddings read); the rest say what surrounds it (only the general part reads
    them)."""
    return sum(feature_blocks(n_features)[:-2]) or DESCRIPTION_DIM


def object_features(
    pixels: npt.NDArray[np.uint8],
    objects: Sequence[Instance],
    tagger: Tagger | None,
    device: torch.device,
) -> FloatArray:
    """Objects' descriptions ``(N, F)``: the tagger's feature map pooled inside each object
    cropped alone (when there is a tagger) and the hand-made description (``describe``), then
    the tagger's features of the crop with its surroundings and ``surroundings``."""
    hand = np.stack([describe(pixels, obj) for obj in objects])
    around = np.stack([surroundings(pixels, obj) for obj in objects])
    if tagger is None:
        return np.concatenate([hand, around], axis=1).astype(np.float32)
    alone = [object_crop(pixels, obj, size=CROP) for obj in objects]
    framed = [object_crop(pixels, obj, size=CROP, alone=False) for obj in objects]
    deep = backbone_features(
        tagger, np.stack([c for c, _ in alone]), np.stack([w for _, w in alone]), device
    )
    context = backbone_features(
        tagger,
        np.stack([c for c, _ in framed]),
        np.ones((len(framed), CROP, CROP), np.float32),
        device,
    )
    return np.concatenate([deep, hand, context, around], axis=1).astype(np.float32)


def _mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_out))


class _Group(nn.Module):
    def __init__(self, n_in: int, n_values: int, options: AttributeOptions) -> None:
        super().__init__()
        self.n_values = n_values
        self.embed = _mlp(n_in, options.hidden, options.dim)
        self.prototypes = nn.Parameter(torch.randn(n_values, options.dim))
        self.manipulate = _mlp(options.dim + 2 * n_values, options.hidden, options.dim)
        self.discriminator = _mlp(options.dim + n_values, options.hidden, 1)

    def embedding(self, x: Tensor) -> Tensor:
        return F.normalize(self.embed(x), dim=-1)

    def logits(self, e: Tensor) -> Tensor:
        return SCALE * e @ F.normalize(self.prototypes, dim=-1).T

    def change(self, e: Tensor, old: Tensor, new: Tensor) -> Tensor:
        one = F.one_hot(old, self.n_values).float(), F.one_hot(new, self.n_values).float()
        return F.normalize(e + self.manipulate(torch.cat([e, *one], dim=-1)), dim=-1)

    def judge(self, e: Tensor, value: Tensor) -> Tensor:
        return self.discriminator(
            torch.cat([e, F.one_hot(value, self.n_values).float()], dim=-1)
        ).squeeze(-1)


def _other_value(labels: Tensor, n_values: int, generator: torch.Generator) -> Tensor:
    shift = torch.randint(1, n_values, labels.shape, generator=generator)
    return (labels + shift) % n_values


def _principal(x: FloatArray, dim: int) -> FloatArray:
    """The top ``dim`` principal directions of ``x`` (already centred), ``(F, dim)``."""
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    out: FloatArray = vt[:dim].T.astype(np.float32)
    return out


def general_projection(standard: FloatArray, blocks: Sequence[int], block_dim: int) -> FloatArray:
    """The general part's linear map ``(F, D)``: block by block (``blocks`` are the widths of
    consecutive feature blocks), the principal parts of a wide block or a narrow block as it is,
    scaled so that every block's mean squared length is one."""
    if sum(blocks) != standard.shape[1]:
        raise ValueError(f"blocks {list(blocks)} do not add up to {standard.shape[1]} features")
    columns = []
    start = 0
    for width in blocks:
        part = np.zeros((standard.shape[1], 0), np.float32)
        if width > block_dim:
            directions = _principal(
                standard[:, start : start + width], min(block_dim, len(standard))
            )
            part = np.zeros((standard.shape[1], directions.shape[1]), np.float32)
            part[start : start + width] = directions
        elif width:
            part = np.zeros((standard.shape[1], width), np.float32)
            part[start : start + width] = np.eye(width, dtype=np.float32)
        if part.shape[1]:
            size = float(np.mean(np.sum((standard @ part) ** 2, axis=1)))
            columns.append(part / np.sqrt(max(size, 1e-6)))
        start += width
    out: FloatArray = np.concatenate(columns, axis=1).astype(np.float32)
    return out


def train_attributes(
    features: FloatArray,
    labels: npt.NDArray[np.int64],
    groups: Sequence[Group],
    options: AttributeOptions | None = None,
    *,
    attribute_dim: int | None = None,
    blocks: Sequence[int] | None = None,
) -> tuple[AttributeWeights, AttributeReport]:
    """Learn the groups' embeddings, prototypes and manipulation from objects.

    Shape: features ``(N, F)`` (backbone and hand-made parts side by side), labels ``(N, G)``
    value indices into each group's ``values`` (-1: unknown, left out of that group's losses).
    The embeddings read the first ``attribute_dim`` features (all by default); the general part
    reads all of them, by ``blocks`` (``feature_blocks``; one block by default).
    """
    options = options or AttributeOptions()
    if len(features) < 2:
        raise ValueError("at least two objects are needed to learn attributes")
    # Matrices this small gain nothing from a second thread: 400 steps took the same 4 s of wall
    # time on one thread as on two, and twice the CPU on two.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(features, labels, groups, options, attribute_dim, blocks)
    finally:
        torch.set_num_threads(threads)


def _train(
    features: FloatArray,
    labels: npt.NDArray[np.int64],
    groups: Sequence[Group],
    options: AttributeOptions,
    attribute_dim: int | None,
    blocks: Sequence[int] | None,
) -> tuple[AttributeWeights, AttributeReport]:
    started = time.perf_counter()
    torch.manual_seed(options.seed)
    generator = torch.Generator().manual_seed(options.seed)
    mean = features.mean(axis=0)
    std = np.maximum(features.std(axis=0), 1e-3).astype(np.float32)
    standard = standardise(features, mean, std)
    blocks = list(blocks or [standard.shape[1]])
    general = general_projection(standard, blocks, options.block_dim)
    width = standard.shape[1] if attribute_dim is None else attribute_dim
    # The embeddings read the object's own blocks the same way, so that a few hundred objects
    # do not teach them a thousand deep features' accidents.
    own = list(np.cumsum(blocks))
    own_blocks = blocks[: own.index(width) + 1] if width in own else [width]
    reduce = general_projection(standard[:, :width], own_blocks, options.block_dim)
    x_all = torch.from_numpy(standard[:, :width] @ reduce)
    y_all = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    heads = [_Group(reduce.shape[1], len(g.values), options) for g in groups]
    makers = [p for h in heads for m in (h.embed, h.manipulate) for p in m.parameters()]
    makers += [h.prototypes for h in heads]
    judges = [p for h in heads for p in h.discriminator.parameters()]
    opt = torch.optim.AdamW(makers, lr=options.lr, weight_decay=options.weight_decay)
    opt_d = torch.optim.AdamW(judges, lr=options.lr, weight_decay=options.weight_decay)
    n = len(standard)
    for _ in range(options.steps):
        rows = torch.randint(0, n, (min(options.batch_size, n),), generator=generator)
        x = x_all[rows] + options.noise * torch.randn(
            len(rows), x_all.shape[1], generator=generator
        )
        y = y_all[rows]
        loss = torch.zeros(())
        fakes = []
        for g, head in enumerate(heads):
            known = y[:, g] >= 0
            if not bool(known.any()):
                continue
            e = head.embedding(x[known])
            old = y[known, g]
            loss = loss + F.cross_entropy(head.logits(e), old)
            if head.n_values < 2:
                continue
            new = _other_value(old, head.n_values, generator)
            base = e.detach()
            changed = head.change(base, old, new)
            proto = F.normalize(head.prototypes.detach(), dim=-1)
            loss = loss + F.cross_entropy(SCALE * changed @ proto.T, new)
            back = head.change(changed, new, old)
            same = head.change(base, old, old)
            loss = loss + options.cycle * (1 - (back * base).sum(-1)).mean()
            loss = loss + options.identity * (1 - (same * base).sum(-1)).mean()
            verdict = head.judge(changed, new)
            loss = loss + options.adversarial * F.binary_cross_entropy_with_logits(
                verdict, torch.ones_like(verdict)
            )
            fakes.append((head, base, old, changed.detach(), new))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if fakes:
            loss_d = torch.zeros(())
            for head, real, real_value, fake, fake_value in fakes:
                r, f = head.judge(real, real_value), head.judge(fake, fake_value)
                loss_d = loss_d + F.binary_cross_entropy_with_logits(r, torch.ones_like(r))
                loss_d = loss_d + F.binary_cross_entropy_with_logits(f, torch.zeros_like(f))
            opt_d.zero_grad()
            loss_d.backward()
            opt_d.step()
    weights = AttributeWeights(
        mean=mean.astype(np.float32),
        std=std,
        general=general,
        groups=[_export(head) for head in heads],
        attribute_dim=width,
        reduce=reduce,
    )
    return weights, _report(weights, features, labels, groups, options, started, generator)


def _export(head: _Group) -> dict[str, FloatArray]:
    def arrays(prefix: str, mlp: nn.Sequential) -> dict[str, FloatArray]:
        first, last = mlp[0], mlp[2]
        assert isinstance(first, nn.Linear) and isinstance(last, nn.Linear)
        return {
            f"{prefix}.w1": first.weight.detach().numpy().T.copy(),
            f"{prefix}.b1": first.bias.detach().numpy().copy(),
            f"{prefix}.w2": last.weight.detach().numpy().T.copy(),
            f"{prefix}.b2": last.bias.detach().numpy().copy(),
        }

    out = {**arrays("embed", head.embed), **arrays("manipulate", head.manipulate)}
    out["prototypes"] = F.normalize(head.prototypes.detach(), dim=-1).numpy().copy()
    return out


def _report(
    weights: AttributeWeights,
    features: FloatArray,
    labels: npt.NDArray[np.int64],
    groups: Sequence[Group],
    options: AttributeOptions,
    started: float,
    generator: torch.Generator,
) -> AttributeReport:
    """How well the exported (numpy) weights read the training objects' values back, and how
    often a changed embedding reads as the value it was changed to."""
    manipulated = {}
    standard = weights.standardise(features)
    for g, group in enumerate(groups):
        known = labels[:, g] >= 0
        if known.any() and len(group.values) > 1:
            e = weights.embed(g, standard[known], standardised=True)
            old = labels[known, g]
            new = _other_value(torch.from_numpy(old), len(group.values), generator).numpy()
            changed = weights.change(g, e, old, new)
            protos = weights.groups[g]["prototypes"]
            manipulated[group.name] = float(((changed @ protos.T).argmax(1) == new).mean())
    accuracy = weights.accuracy(features, labels, groups)
    return AttributeReport(options.steps, time.perf_counter() - started, accuracy, manipulated)
