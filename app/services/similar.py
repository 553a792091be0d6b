"""Find similar images by the tagger's embedding, optionally with one tag swapped for another.

The swap moves the query at the feature level, as attribute-manipulation retrieval does
(Zhao et al. 2017, "Memory-augmented attribute manipulation networks"; Ak et al. 2018,
FashionSearchNet): each tag has a prototype, the mean of the L2-normalised embeddings of the
images that carry it, and "like this, but with B instead of A" searches near
``q - strength * (proto_A - proto_B)``, renormalised, by cosine similarity. It assumes that the
embedding space is roughly additive in tags, which a multi-label tagger's pooled features are
trained towards (its head is linear in them).

Embeddings come from one tagger version: the active one if it has embedded images, else the
latest that has (``tessera seed`` writes them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import (
    Image,
    ImageEmbedding,
    ImageTag,
    ImageTagStatus,
    ModelKind,
    ModelVersion,
    Project,
    Tag,
)
from app.services.errors import InvalidInputError, NotFoundError

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class EmbeddingIndex:
    image_ids: list[int]
    vectors: FloatArray  # (N, D), rows L2-normalised
    tags: dict[str, set[int]]  # tag name -> rows (indices into image_ids) carrying it
    version: int

    def row(self, image_id: int) -> int:
        try:
            return self.image_ids.index(image_id)
        except ValueError:
            raise NotFoundError(
                f"image {image_id} has no embedding yet: run `tessera seed` with a tagger"
            ) from None

    def prototype(self, tag: str) -> FloatArray:
        rows = sorted(self.tags.get(tag, ()))
        if not rows:
            raise InvalidInputError(f"no embedded image carries the tag {tag!r}")
        proto: FloatArray = self.vectors[rows].mean(axis=0)
        return proto


def _normalise(x: FloatArray) -> FloatArray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    out: FloatArray = x / np.maximum(norm, 1e-12)
    return out


def load_index(session: Session, *, project: Project) -> EmbeddingIndex:
    """Every embedded image of the project, with its active tags."""
    versions = session.execute(
        select(ModelVersion.id, ModelVersion.version, ModelVersion.active)
        .join(ImageEmbedding, ImageEmbedding.model_version_id == ModelVersion.id)
        .where(ModelVersion.project_id == project.id, ModelVersion.kind == ModelKind.TAGGER)
        .distinct()
    ).all()
    if not versions:
        raise NotFoundError("no image has an embedding yet: train a tagger, then `tessera seed`")
    chosen = max(versions, key=lambda v: (bool(v.active), v.version))
    rows = session.execute(
        select(ImageEmbedding.image_id, ImageEmbedding.vector)
        .where(ImageEmbedding.model_version_id == chosen.id)
        .order_by(ImageEmbedding.image_id)
    ).all()
    image_ids = [image_id for image_id, _ in rows]
    vectors = _normalise(np.stack([np.frombuffer(v, dtype=np.float32) for _, v in rows]))
    index = {image_id: i for i, image_id in enumerate(image_ids)}
    tags: dict[str, set[int]] = {}
    for image_id, name in session.execute(
        select(ImageTag.image_id, Tag.name)
        .join(Tag, Tag.id == ImageTag.tag_id)
        .where(ImageTag.image_id.in_(image_ids), ImageTag.status == ImageTagStatus.ACTIVE)
    ):
        tags.setdefault(name, set()).add(index[image_id])
    return EmbeddingIndex(image_ids, vectors, tags, chosen.version)


def query_vector(
    index: EmbeddingIndex,
    image_id: int,
    *,
    swap: tuple[str, str] | None = None,
    strength: float = 1.0,
) -> FloatArray:
    q = index.vectors[index.row(image_id)]
    if swap is not None:
        old, new = swap
        q = q - strength * (index.prototype(old) - index.prototype(new))
    return _normalise(q)


def nearest(
    index: EmbeddingIndex,
    image_id: int,
    *,
    k: int = 10,
    swap: tuple[str, str] | None = None,
    strength: float = 1.0,
) -> list[tuple[int, float]]:
    """The ``k`` images nearest the (possibly swapped) query, the query itself left out.

    Returns (image id, cosine similarity), most similar first.
    """
    q = query_vector(index, image_id, swap=swap, strength=strength)
    scores = index.vectors @ q  # (N,)
    scores[index.row(image_id)] = -np.inf
    order = np.argsort(-scores, kind="stable")[:k]
    return [(index.image_ids[i], float(scores[i])) for i in order if np.isfinite(scores[i])]


@dataclass(frozen=True)
class SimilarImage:
    image: Image
    score: float
    tags: list[str]


def similar_images(
    session: Session,
    *,
    project: Project,
    image_id: int,
    k: int = 12,
    swap: tuple[str, str] | None = None,
) -> list[SimilarImage]:
    index = load_index(session, project=project)
    hits = nearest(index, image_id, k=k, swap=swap)
    images = {
        i.id: i for i in session.scalars(select(Image).where(Image.id.in_([h for h, _ in hits])))
    }
    out = []
    for image_id_, score in hits:
        row = index.row(image_id_)
        names = sorted(name for name, rows in index.tags.items() if row in rows)
        out.append(SimilarImage(images[image_id_], score, names))
    return out
