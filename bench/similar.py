"""Find this object, but with one attribute changed: object-level search against its baselines.

Usage: ``python bench/similar.py [--images 120] [--epochs 15] [--size 128] [--holdout 0.3]``

A demo project is generated and imported (its masks are the crowd's, as if finished); a
tagger is trained on its tags (``app.jobs.train.run_train_tagger``), ``tessera seed`` stores
every image's embedding (the image-level baselines) and ``tessera objects index`` cuts every
image's masks into objects and learns their attributes (``app.jobs.objects``), *not* from the
objects of a held-out share of the images (``--holdout``). Every query starts from an object of
a held-out image.

A query is an object with attributes (S, C1, T) (one value per attribute group the index found:
shape, colour, texture on the demo) with one value changed, C1 -> C2; an image is relevant when
one of its objects has S, C2 and T together (a tag list cannot say that: "a red star and a blue
circle" carry the tags of a blue star). Reported over every such query that has a relevant
image: precision@10, recall@10 and @30 (at least one relevant image among the top 10 / 30), for
the learned manipulation, prototype arithmetic at the object level, the plain object search
(nothing changed), today's image-level swap (``app.services.similar``), a filter on the image's
tag set (images carrying S, C2 and T, nearest the query image first) and random images.

Plain retrieval under tile-like variation: each held-out object's image shifted by up to 3% of
the object's box, its brightness, contrast and saturation changed within 6%, Gaussian noise
(sigma 2 levels) and a JPEG quality of 80-92; the object described again and searched among
every indexed object: recall@1 is the share found as itself.

Speed: the index's vectors repeated with noise up to ``--speed-objects`` objects, one query's
change, scan and best object per image timed (median of 200).

Nothing is tuned on these queries. It ends with one line that scripts can read:
``similar: p@10=... random_p@10=... tagset_p@10=... r@10=... plain_r@1=... ms_per_query=...``.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image as PILImage

from app.cli.serve import DEMO_SETTINGS
from app.config import Settings
from app.db import make_engine, make_session_factory
from app.jobs.objects import Cut, cut_objects, held_out_images, run_index_objects
from app.jobs.seed import run_seed
from app.jobs.train import TrainOptions, run_train_tagger
from app.migrate import upgrade_to_head
from app.models import ModelKind
from app.services.curation.objects import load_object_index
from app.services.files import model_file
from app.services.importer import run_import
from app.services.model_version import active_model
from app.services.project import create_project, get_project
from app.services.similar import EmbeddingIndex, load_index, nearest
from ml.checkpoints import load_checkpoint
from ml.demo.dataset import write_demo_dataset
from ml.objects.attributes import AttributeOptions, object_features
from ml.objects.index import ObjectIndex
from ml.objects.instances import NONE, Instance
from ml.tagger import Tagger
from ml.train import resolve_device

K = 10


@dataclass
class Built:
    objects: ObjectIndex
    images: EmbeddingIndex
    held: set[int]
    tagger: Tagger
    cuts: dict[int, Cut] = field(default_factory=dict)  # held-out images' objects


def build(work: Path, args: argparse.Namespace) -> Built:
    settings = Settings(
        environment="test",
        data_dir=work / "data",
        database_url=f"sqlite:///{work}/bench.db",
        secret_key="bench-secret-key-that-is-long-enough",
        consensus_interval_s=0,
    )
    engine = make_engine(settings.resolved_database_url)
    upgrade_to_head(engine)
    factory = make_session_factory(engine)
    write_demo_dataset(work / "demo", seed=args.seed, n_images=args.images)
    with factory() as session:
        project = create_project(session, slug="demo")
        project.settings = {**project.settings, **DEMO_SETTINGS}
        session.commit()
        run_import(
            session, settings=settings, project_slug="demo", path=work / "demo", tag_file=None
        )
    options = TrainOptions(
        epochs=args.epochs, size=args.size, backbone="resnet18", batch_size=16, device="cpu"
    )
    t0 = time.perf_counter()
    outcome = run_train_tagger(factory, settings, slug="demo", options=options)
    print(f"tagger trained in {time.perf_counter() - t0:.0f} s: {outcome.metric} {outcome.score}")
    run_seed(factory, settings, slug="demo", device="cpu")
    t0 = time.perf_counter()
    report = run_index_objects(
        factory,
        settings,
        slug="demo",
        device="cpu",
        options=AttributeOptions(steps=args.steps),
        holdout=args.holdout,
    )
    print(
        f"objects indexed in {time.perf_counter() - t0:.0f} s: {report.objects} objects "
        f"({report.held_out} held out) of {report.images} images; groups {report.groups}"
    )
    print(f"  value read back, learned objects: {fmt(report.accuracy)}")
    print(f"  value read back, held-out objects: {fmt(report.held_out_accuracy)}")
    print(f"  changed embeddings read as the new value: {fmt(report.manipulated)}")
    with factory() as session:
        project = get_project(session, slug="demo")
        objects = load_object_index(settings, project=project)
        images = load_index(session, project=project)
        version = active_model(session, project=project, kind=ModelKind.TAGGER)
        assert version is not None
        tagger = load_checkpoint(model_file(settings, version.path), device="cpu").model
        assert isinstance(tagger, Tagger)
        ids = sorted({int(i) for i in objects.image_ids})
        held = held_out_images(ids, args.holdout)
        cuts = {c.image.id: c for c in cut_objects(session, settings, project, image_ids=held)}
    return Built(objects, images, held, tagger, cuts)


def fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in values.items()) or "-"


@dataclass(frozen=True)
class Query:
    row: int  # the query object
    group: int
    new: int
    relevant: frozenset[int]  # image ids


def queries(index: ObjectIndex, held: set[int]) -> list[Query]:
    by_image: dict[int, set[tuple[int, ...]]] = {}
    for row, image in enumerate(index.image_ids):
        by_image.setdefault(int(image), set()).add(tuple(int(v) for v in index.labels[row]))
    out = []
    for row, image in enumerate(index.image_ids):
        if int(image) not in held or (index.labels[row] < 0).any():
            continue
        for g, group in enumerate(index.groups):
            for new in range(len(group.values)):
                if new == index.labels[row, g]:
                    continue
                want = tuple(int(v) for v in index.labels[row])
                want = (*want[:g], new, *want[g + 1 :])
                relevant = frozenset(i for i, kinds in by_image.items() if want in kinds) - {
                    int(image)
                }
                if relevant:
                    out.append(Query(row, g, new, relevant))
    return out


def _value_tags(index: ObjectIndex, row: int, g: int, new: int) -> tuple[str, str, set[str]]:
    """(old tag, new tag, the tags an image must carry to hold the changed object)."""
    values = [int(v) for v in index.labels[row]]
    values[g] = new
    need = {grp.values[v] for grp, v in zip(index.groups, values, strict=True)} - {NONE}
    old = index.groups[g].values[int(index.labels[row, g])]
    return old, index.groups[g].values[new], need


def evaluate(built: Built, rng: np.random.Generator) -> dict[str, np.ndarray]:
    objects, images = built.objects, built.images
    # The filter's tag sets are the images' true tags (every tag of every object in its
    # masks), not what the tagger added since: the strongest a tag filter can be.
    tags_of: dict[int, set[str]] = {image_id: set() for image_id in images.image_ids}
    for row, image_id in enumerate(objects.image_ids):
        tags_of.setdefault(int(image_id), set()).update(objects.tags[row])
    all_images = list(images.image_ids)
    results: dict[str, list[tuple[float, float, float, int]]] = {}

    def score(name: str, ranked: Sequence[int], q: Query) -> None:
        top = list(ranked)
        hits = [i in q.relevant for i in top[:K]]
        results.setdefault(name, []).append(
            (
                float(np.sum(hits)) / K,
                float(any(hits)),
                float(any(i in q.relevant for i in top[:30])),
                q.group,
            )
        )

    for q in queries(objects, built.held):
        image_id = int(objects.image_ids[q.row])
        old, new, need = _value_tags(objects, q.row, q.group, q.new)
        for method in ("learned", "prototype"):
            vec = objects.query(q.row, (q.group, q.new), method=method)  # type: ignore[arg-type]
            hits = objects.search(vec, k=30, exclude_images=[image_id])
            score(method, [int(objects.image_ids[h.row]) for h in hits], q)
        hits = objects.search(objects.query(q.row), k=30, exclude_images=[image_id])
        score("plain object", [int(objects.image_ids[h.row]) for h in hits], q)
        score("plain image", [h for h, _ in nearest(images, image_id, k=30)], q)
        swap = (old, new) if old != NONE and new != NONE else None
        if swap is not None and old in images.tags and new in images.tags:
            score("image swap", [h for h, _ in nearest(images, image_id, k=30, swap=swap)], q)
        ranked = [h for h, _ in nearest(images, image_id, k=len(all_images))]
        score("tag-set filter", [i for i in ranked if need <= tags_of[i]], q)
        others = [i for i in all_images if i != image_id]
        score("random", list(rng.permutation(others)[:30]), q)
    return {name: np.asarray(rows) for name, rows in results.items()}


def vary(
    pixels: np.ndarray, obj: Instance, rng: np.random.Generator
) -> tuple[np.ndarray, Instance]:
    """The image as a tile's variation would show it, and the object moved with it."""
    x0, y0, x1, y1 = obj.box
    reach = 0.03 * max(x1 - x0, y1 - y0)
    dx, dy = (round(float(v)) for v in rng.uniform(-reach, reach, 2))
    h, w = pixels.shape[:2]
    shift = np.float32([[1, 0, dx], [0, 1, dy]])
    moved = cv2.warpAffine(pixels, shift, (w, h), borderMode=cv2.BORDER_REPLICATE)
    moved = moved.astype(np.float32)
    factors = rng.uniform(0.94, 1.06, 3)
    moved *= factors[0]
    grey = moved @ np.asarray([0.299, 0.587, 0.114], np.float32)
    mean = float(grey.mean())
    moved = mean + factors[1] * (moved - mean)
    grey = mean + factors[1] * (grey - mean)
    moved = grey[..., None] + factors[2] * (moved - grey[..., None])
    moved += rng.normal(0.0, 2.0, moved.shape)
    buffer = io.BytesIO()
    quality = int(rng.integers(80, 93))
    PILImage.fromarray(np.clip(np.rint(moved), 0, 255).astype(np.uint8)).save(
        buffer, "JPEG", quality=quality
    )
    varied = np.asarray(PILImage.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    full = cv2.warpAffine(obj.full_mask(h, w).astype(np.uint8), shift, (w, h)) > 0
    ys, xs = np.nonzero(full)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    return varied, Instance(box, full[box[1] : box[3], box[0] : box[2]])


def plain_recall(built: Built, rng: np.random.Generator) -> tuple[float, int]:
    objects = built.objects
    found, total = 0, 0
    device = resolve_device("cpu")
    for image_id, cut in built.cuts.items():
        rows = objects.rows_of(image_id)
        assert len(rows) == len(cut.objects), "the index and the masks disagree"
        for row, obj in zip(rows, cut.objects, strict=True):
            varied, moved = vary(cut.pixels, obj, rng)
            x = object_features(varied, [moved], built.tagger, device)
            vec = objects.weights.vectors(x, general_weight=objects.general_weight)[0]
            best = objects.search(objects.plain(vec), k=1)
            found += bool(best) and best[0].row == row
            total += 1
    return found / max(total, 1), total


def speed(index: ObjectIndex, n_objects: int, rng: np.random.Generator) -> float:
    """Median milliseconds per query (change, scan, best object per image) at ``n_objects``."""
    reps = -(-n_objects // len(index))
    big = ObjectIndex(
        index.groups,
        index.weights,
        np.tile(index.vectors, (reps, 1))[:n_objects]
        + rng.normal(0, 0.02, (n_objects, index.vectors.shape[1])).astype(np.float32),
        np.arange(n_objects, dtype=np.int64) // 4,  # four objects per image
        np.tile(index.labels, (reps, 1))[:n_objects],
        np.tile(index.boxes, (reps, 1))[:n_objects],
        [],
        [],
        index.general_weight,
    )
    times = []
    for i in range(200):
        row = int(rng.integers(n_objects))
        g = i % len(big.groups)
        new = int(rng.integers(len(big.groups[g].values)))
        t0 = time.perf_counter()
        big.search(big.query(row, (g, new)), k=K, exclude_images=[int(big.image_ids[row])])
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=400, help="attribute model steps")
    parser.add_argument("--holdout", type=float, default=0.3)
    parser.add_argument("--speed-objects", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory(prefix="tessera-similar-") as tmp:
        built = build(Path(tmp), args)
        results = evaluate(built, rng)
        plain_r1, varied = plain_recall(built, rng)
    ms = speed(built.objects, args.speed_objects, rng)
    n = len(results["learned"])
    ceiling = float(
        np.mean([min(len(q.relevant), K) / K for q in queries(built.objects, built.held)])
    )
    print(f"\n{n} queries from {len(built.held)} held-out images (p@10 at most {ceiling:.3f})")
    print(f"{'search':<16} {'queries':>7} {'p@10':>7} {'r@10':>7} {'r@30':>7}")
    for name, r in results.items():
        p10, r10, r30 = r[:, 0].mean(), r[:, 1].mean(), r[:, 2].mean()
        print(f"{name:<16} {len(r):>7d} {p10:>7.3f} {r10:>7.3f} {r30:>7.3f}")
    learned = results["learned"]
    for g, group in enumerate(built.objects.groups):
        mine = learned[learned[:, 3] == g]
        if len(mine):
            p10, r10 = mine[:, 0].mean(), mine[:, 1].mean()
            print(
                f"  learned, changing {group.name}: {len(mine)} queries, "
                f"p@10 {p10:.3f}, r@10 {r10:.3f}"
            )
    print(f"the same object under variation: recall@1 {plain_r1:.3f} ({varied} objects)")
    print(f"one query over {args.speed_objects} objects: {ms:.1f} ms (numpy scan)")
    random_p, tagset_p = results["random"][:, 0].mean(), results["tag-set filter"][:, 0].mean()
    print(
        f"similar: p@10={learned[:, 0].mean():.3f} random_p@10={random_p:.3f} "
        f"tagset_p@10={tagset_p:.3f} r@10={learned[:, 1].mean():.3f} "
        f"plain_r@1={plain_r1:.3f} ms_per_query={ms:.1f}"
    )


if __name__ == "__main__":
    main()
