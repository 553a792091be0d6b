"""Find-similar with a tag swapped: top-10 recall on the demo project, whose tags are true.

Usage: ``python bench/similar.py [--images 120] [--epochs 15] [--size 128] [--device auto]``

A demo project is generated and imported; a tagger is trained on its tags
(``app.jobs.train.run_train_tagger``) and ``tessera seed`` stores every image's pooled embedding.
Queries: every (image, A, B) with A one of the image's tags and B a sibling of A that the image
lacks, in one family (colours red/green/blue/yellow, textures striped/dotted/checkered, shapes
circle/square/triangle/star). An image is relevant when it carries B ("recall@10" in the
attribute-manipulation sense: at least one relevant image among the top 10; precision@10 beside
it), and exactly relevant when its tags of that family are the query's with A replaced by B.
The swapped search (``app.services.similar``) is compared with the plain search from the same
image and with random top-10s. Nothing is tuned on these queries.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from app.cli.serve import DEMO_SETTINGS
from app.config import Settings
from app.db import make_engine, make_session_factory
from app.jobs.seed import run_seed
from app.jobs.train import TrainOptions, run_train_tagger
from app.migrate import upgrade_to_head
from app.services.importer import run_import
from app.services.project import create_project, get_project
from app.services.similar import EmbeddingIndex, load_index, nearest
from ml.demo.dataset import write_demo_dataset

FAMILIES = (
    ("red", "green", "blue", "yellow"),
    ("striped", "dotted", "checkered"),
    ("circle", "square", "triangle", "star"),
)


def build(work: Path, args: argparse.Namespace) -> EmbeddingIndex:
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
        epochs=args.epochs,
        size=args.size,
        backbone=args.backbone,
        batch_size=16,
        device=args.device,
    )
    t0 = time.perf_counter()
    outcome = run_train_tagger(factory, settings, slug="demo", options=options)
    print(f"tagger trained in {time.perf_counter() - t0:.0f} s: {outcome.metric} {outcome.score}")
    run_seed(factory, settings, slug="demo", device=args.device)
    with factory() as session:
        return load_index(session, project=get_project(session, slug="demo"))


def queries(tags_of: list[set[str]], known: set[str]) -> list[tuple[int, str, str, set[str]]]:
    """(row, A, B, the family tags wanted) for every sibling swap an image allows."""
    out = []
    for i, tags in enumerate(tags_of):
        for family in FAMILIES:
            for a in sorted(tags & set(family)):
                for b in family:
                    if b not in tags and b in known:
                        out.append((i, a, b, (tags & set(family)) - {a} | {b}))
    return out


def family_of(tag: str) -> set[str]:
    return next(set(f) for f in FAMILIES if tag in f)


def evaluate(index: EmbeddingIndex, k: int, rng: np.random.Generator) -> None:
    n_images = len(index.image_ids)
    tags_of = [{name for name, rows in index.tags.items() if i in rows} for i in range(n_images)]
    results: dict[str, list[tuple[float, float, float]]] = {"swap": [], "plain": [], "random": []}
    for i, a, b, want in queries(tags_of, set(index.tags)):
        image_id = index.image_ids[i]
        others = [j for j in range(n_images) if j != i]
        picks = {
            "swap": [index.row(h) for h, _ in nearest(index, image_id, k=k, swap=(a, b))],
            "plain": [index.row(h) for h, _ in nearest(index, image_id, k=k)],
            "random": list(rng.choice(others, size=min(k, len(others)), replace=False)),
        }
        for name, rows in picks.items():
            has_b = [b in tags_of[j] for j in rows]
            exact = [tags_of[j] & family_of(b) == want for j in rows]
            results[name].append((float(any(has_b)), float(np.mean(has_b)), float(any(exact))))
    n = len(results["swap"])
    print(f"\n{n} swap queries over {n_images} images (tagger v{index.version})")
    print(f"{'search':<8} {'recall@10':>10} {'precision@10':>13} {'exact recall@10':>16}")
    for name, rows in results.items():
        r = np.asarray(rows)
        print(f"{name:<8} {r[:, 0].mean():>10.3f} {r[:, 1].mean():>13.3f} {r[:, 2].mean():>16.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tessera-similar-") as tmp:
        index = build(Path(tmp), args)
        evaluate(index, k=10, rng=np.random.default_rng(args.seed))


if __name__ == "__main__":
    main()
