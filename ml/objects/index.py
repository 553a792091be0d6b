"""The object index: every object's embedding, and queries with one attribute changed (numpy).

An object's vector is its general part and one unit vector per attribute group side by side,
``[a * general, e_1, ..., e_G]``, so that one dot product scores ``a * cos(general) + sum_g
cos(e_g)``: an object must match the query in every property to rank first, and among objects
whose properties all match, the one most like the query overall comes first. A query changes
one group's part, with the learned manipulation network (``change``) or, as the baseline, with
prototype arithmetic (``e - p_old + p_new``), and leaves the others as they are: the colour of
one object changes, not the colour of the image.

A query scans every vector (a matrix-vector product): at 100,000 objects of 160 numbers that
is a few milliseconds on one core (``bench/similar.py`` measures it), below what an approximate
index would save.

Saved as one ``.npz`` of plain arrays and a JSON header (no pickles), written elsewhere and
renamed into place by the caller.
"""

from __future__ import annotations

import io
import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from ml.objects.instances import Group

FloatArray = npt.NDArray[np.float32]
FORMAT = 1
GENERAL_WEIGHT = 0.5
CLIP = 5.0
# A plain search ("more like this object") weighs the general part as 8 groups: it looks for
# this object, or one just like it, and the attribute parts only break ties (chosen on the demo's
# held-out objects, bench/similar.py: the same object under variation found first 0.60 of the
# time at 0.5, 0.91 at 8).
PLAIN_GENERAL_WEIGHT = 8.0
Method = Literal["learned", "prototype"]


def normalise(x: FloatArray) -> FloatArray:
    out: FloatArray = (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(
        np.float32
    )
    return out


def standardise(features: FloatArray, mean: FloatArray, std: FloatArray) -> FloatArray:
    """``(features - mean) / std``, clipped to +-``CLIP``: a number that barely varied among the
    objects learned from (a plain object's texture) must not outweigh the rest when it moves."""
    out: FloatArray = np.clip((features - mean) / std, -CLIP, CLIP).astype(np.float32)
    return out


def _mlp(x: FloatArray, w: dict[str, FloatArray], prefix: str) -> FloatArray:
    hidden = np.maximum(x @ w[f"{prefix}.w1"] + w[f"{prefix}.b1"], 0.0)
    out: FloatArray = (hidden @ w[f"{prefix}.w2"] + w[f"{prefix}.b2"]).astype(np.float32)
    return out


def _one_hot(values: npt.ArrayLike, n: int) -> FloatArray:
    out: FloatArray = np.eye(n, dtype=np.float32)[np.asarray(values, dtype=np.int64)]
    return out


@dataclass
class AttributeWeights:
    """What ``ml.objects.attributes`` learned, as arrays: the input's standardisation, the
    general part's principal directions, and per group its embedding, prototypes (unit rows)
    and manipulation network."""

    mean: FloatArray  # (F,)
    std: FloatArray  # (F,)
    general: FloatArray  # (F, general_dim)
    groups: list[dict[str, FloatArray]] = field(default_factory=list)
    attribute_dim: int | None = None  # the embeddings read this many leading features (None: all)
    reduce: FloatArray | None = None  # (attribute_dim, k): what the embeddings read of them

    def standardise(self, features: FloatArray) -> FloatArray:
        return standardise(features, self.mean, self.std)

    def embed(self, g: int, x: FloatArray, *, standardised: bool = False) -> FloatArray:
        """Group ``g``'s unit embedding of objects. Shape: x ``(N, F)``; returns ``(N, d)``."""
        x = x if standardised else self.standardise(x)
        return normalise(_mlp(self.reduced(x), self.groups[g], "embed"))

    def reduced(self, standard: FloatArray) -> FloatArray:
        """What the embeddings read of standardised features."""
        x = standard[:, : self.attribute_dim]
        out: FloatArray = x if self.reduce is None else (x @ self.reduce).astype(np.float32)
        return out

    def change(self, g: int, e: FloatArray, old: npt.ArrayLike, new: npt.ArrayLike) -> FloatArray:
        """Group ``g``'s embeddings ``e`` ``(N, d)`` changed from value ``old`` to ``new``."""
        n = len(self.groups[g]["prototypes"])
        e = np.atleast_2d(e).astype(np.float32)
        old_1 = np.broadcast_to(_one_hot(old, n), (len(e), n))
        new_1 = np.broadcast_to(_one_hot(new, n), (len(e), n))
        delta = _mlp(np.concatenate([e, old_1, new_1], axis=1), self.groups[g], "manipulate")
        return normalise(e + delta)

    def vectors(
        self, features: FloatArray, *, general_weight: float = GENERAL_WEIGHT
    ) -> FloatArray:
        """Index vectors ``(N, general_dim + G * d)`` of objects' features ``(N, F)``."""
        x = self.standardise(features)
        parts = [general_weight * normalise(x @ self.general)]
        parts += [self.embed(g, x, standardised=True) for g in range(len(self.groups))]
        out: FloatArray = np.concatenate(parts, axis=1).astype(np.float32)
        return out

    def accuracy(
        self, features: FloatArray, labels: npt.NDArray[np.int64], groups: Sequence[Group]
    ) -> dict[str, float]:
        """Per group, the share of objects whose embedding lies nearest their own value's
        prototype (objects of unknown value left out)."""
        x = self.standardise(features)
        out = {}
        for g, group in enumerate(groups):
            known = labels[:, g] >= 0
            if known.any():
                e = self.embed(g, x[known], standardised=True)
                guess = (e @ self.groups[g]["prototypes"].T).argmax(1)
                out[group.name] = float((guess == labels[known, g]).mean())
        return out

    def arrays(self) -> dict[str, FloatArray]:
        width = self.mean.shape[0] if self.attribute_dim is None else self.attribute_dim
        out = {"mean": self.mean, "std": self.std, "general": self.general}
        out["attribute_dim"] = np.asarray([width], np.float32)
        if self.reduce is not None:
            out["reduce"] = self.reduce
        for g, arrays in enumerate(self.groups):
            out.update({f"group{g}.{name}": a for name, a in arrays.items()})
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, FloatArray], n_groups: int) -> AttributeWeights:
        groups = []
        for g in range(n_groups):
            prefix = f"group{g}."
            groups.append({k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)})
        width = int(arrays["attribute_dim"][0]) if "attribute_dim" in arrays else None
        reduce = arrays.get("reduce")
        return cls(arrays["mean"], arrays["std"], arrays["general"], groups, width, reduce)


@dataclass(frozen=True)
class Hit:
    row: int
    score: float


@dataclass
class ObjectIndex:
    """Every indexed object: where it is, what it is (as far as the project's tags say), and
    its vector."""

    groups: list[Group]
    weights: AttributeWeights
    vectors: FloatArray  # (N, general_dim + G * d)
    image_ids: npt.NDArray[np.int64]  # (N,)
    labels: npt.NDArray[np.int64]  # (N, G) value indices; -1 unknown
    boxes: npt.NDArray[np.int32]  # (N, 4) x0, y0, x1, y1
    tags: list[list[str]]  # per object: the tags that name it and the attributes that cover it
    outlines: list[list[list[int]]]  # per object: [[x, y], ...] in image pixels
    general_weight: float = GENERAL_WEIGHT
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def general_dim(self) -> int:
        return int(self.weights.general.shape[1])

    def part(self, g: int) -> slice:
        """The columns of group ``g``'s embedding in ``vectors``."""
        d = int(self.weights.groups[g]["prototypes"].shape[1])
        start = self.general_dim + g * d
        return slice(start, start + d)

    def rows_of(self, image_id: int) -> list[int]:
        return [int(r) for r in np.flatnonzero(self.image_ids == image_id)]

    def group_index(self, name: str) -> int:
        for g, group in enumerate(self.groups):
            if group.name == name:
                return g
        raise KeyError(
            f"no attribute group {name!r}; the groups are {[g.name for g in self.groups]}"
        )

    def query(
        self, row: int, change: tuple[int, int] | None = None, *, method: Method = "learned"
    ) -> FloatArray:
        """The vector to search with: object ``row``, with group ``change[0]`` set to value
        ``change[1]`` when given."""
        q = self.vectors[row].copy()
        if change is None:
            return self.plain(q)
        g, new = change
        old = int(self.labels[row, g])
        part = self.part(g)
        e = q[part][None]
        if old == new:
            return self.plain(q)
        if method == "learned" and old >= 0:
            q[part] = self.weights.change(g, e, [old], [new])[0]
        else:
            protos = self.weights.groups[g]["prototypes"]
            base = protos[old] if old >= 0 else protos[np.argmax(e[0] @ protos.T)]
            q[part] = normalise(e[0] - base + protos[new])
        return q

    def plain(self, vector: FloatArray) -> FloatArray:
        """An object's vector made a plain query (``PLAIN_GENERAL_WEIGHT``)."""
        q = vector.copy()
        q[: self.general_dim] *= PLAIN_GENERAL_WEIGHT / self.general_weight
        return q

    def search(
        self, q: FloatArray, *, k: int = 10, exclude_images: Collection[int] = ()
    ) -> list[Hit]:
        """The best object of each of the ``k`` best images, best first."""
        scores = self.vectors @ q
        if exclude_images:
            scores[np.isin(self.image_ids, list(exclude_images))] = -np.inf
        want = min(len(scores), max(8 * k, 64))  # objects enough for k images, mostly
        while True:
            if want < len(scores):
                top = np.argpartition(-scores, want - 1)[:want]
                order = top[np.argsort(-scores[top], kind="stable")]
            else:
                order = np.argsort(-scores, kind="stable")
            hits = self._best_per_image(order, scores, k)
            if len(hits) == k or want >= len(scores):
                return hits
            want = min(len(scores), want * 8)

    def _best_per_image(
        self, order: npt.NDArray[np.int64], scores: FloatArray, k: int
    ) -> list[Hit]:
        hits: list[Hit] = []
        seen: set[int] = set()
        for row in order:
            image = int(self.image_ids[row])
            if image in seen or not np.isfinite(scores[row]):
                continue
            seen.add(image)
            hits.append(Hit(int(row), float(scores[row])))
            if len(hits) == k:
                break
        return hits

    def save(self, out: io.BufferedIOBase | io.BytesIO) -> None:
        header = {
            "format": FORMAT,
            "groups": [{"name": g.name, "values": list(g.values)} for g in self.groups],
            "tags": self.tags,
            "outlines": self.outlines,
            "general_weight": self.general_weight,
            "meta": self.meta,
        }
        arrays: dict[str, npt.NDArray[Any]] = {
            f"w.{k}": v for k, v in self.weights.arrays().items()
        }
        arrays.update(
            header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
            vectors=self.vectors,
            image_ids=self.image_ids,
            labels=self.labels,
            boxes=self.boxes,
        )
        np.savez(out, allow_pickle=False, **arrays)

    @classmethod
    def load(cls, source: Any) -> ObjectIndex:
        with np.load(source, allow_pickle=False) as data:
            header = json.loads(bytes(data["header"]).decode())
            if header.get("format") != FORMAT:
                raise ValueError(f"object index format {header.get('format')} is not {FORMAT}")
            groups = [Group(g["name"], tuple(g["values"])) for g in header["groups"]]
            weights = AttributeWeights.from_arrays(
                {k[2:]: data[k] for k in data.files if k.startswith("w.")}, len(groups)
            )
            return cls(
                groups,
                weights,
                data["vectors"],
                data["image_ids"],
                data["labels"],
                data["boxes"],
                header["tags"],
                header["outlines"],
                float(header["general_weight"]),
                header["meta"],
            )


def build_index(
    weights: AttributeWeights,
    groups: Sequence[Group],
    features: FloatArray,
    *,
    image_ids: Sequence[int],
    labels: npt.NDArray[np.int64],
    boxes: Sequence[tuple[int, int, int, int]],
    tags: Sequence[Sequence[str]],
    outlines: Sequence[list[list[int]]],
    meta: dict[str, Any] | None = None,
    general_weight: float = GENERAL_WEIGHT,
) -> ObjectIndex:
    return ObjectIndex(
        list(groups),
        weights,
        weights.vectors(features, general_weight=general_weight),
        np.asarray(image_ids, dtype=np.int64),
        np.asarray(labels, dtype=np.int64).reshape(len(image_ids), len(groups)),
        np.asarray(boxes, dtype=np.int32).reshape(-1, 4),
        [sorted(t) for t in tags],
        [list(o) for o in outlines],
        general_weight,
        dict(meta or {}),
    )
