"""``bench/campaign.py``, bounded: the crowd arm on a few demo images up to 10 s per target.

The targets are the benchmark's (three seeds, every arm, up to 160 s per target); this run checks
what must hold in any run: the script runs end to end, prints its line for scripts, the crowd's
masks improve from nothing, and nothing beats the ceiling of perfect answers."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from app.db import make_engine, make_session_factory
from app.models import Image, Project, Tag, Target
from app.services.crowd.opening import load_truth
from bench.campaign import (
    PHOTO_TAG,
    SLUG,
    Measurer,
    _settings,
    build,
    frozen_images,
    hidden_truth,
    hide_truth,
    size_class,
)
from ml.aggregation.simulate.masks import photo_like_scene
from tests.conftest import run_script

BENCH = Path(__file__).resolve().parents[2] / "bench" / "campaign.py"

pytestmark = [pytest.mark.slow, pytest.mark.bench]


def test_a_bounded_campaign_prints_its_line_and_the_crowd_improves_the_masks(
    tmp_path: Path,
) -> None:
    done = run_script(
        [
            *(sys.executable, str(BENCH), "--quick", "--plot", str(tmp_path / "c.png")),
            *("--keep", str(tmp_path / "kept"), "--set", "vote_budget=6"),
        ],
        timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    line = re.search(
        r"^campaign: arm=crowd seeds=0 iou@10=([\d.]+) iou@20=nan iou@40=nan iou@80=nan "
        r"iou@160=nan ceiling=([\d.]+)$",
        done.stdout,
        flags=re.MULTILINE,
    )
    assert line is not None, done.stdout
    at_10, ceiling = float(line[1]), float(line[2])
    start = re.search(r"answers +0 +0\.0 s/target +IoU ([\d.]+)", done.stdout)
    assert start is not None, done.stdout
    assert float(start[1]) < at_10 < ceiling <= 1.0
    assert ceiling > 0.85  # the composition fed perfect answers
    sizes = re.search(r"^crowd +(small|medium|large) .*$", done.stdout, flags=re.MULTILINE)
    assert sizes is not None, done.stdout
    shares = re.findall(r"(small|medium|large) (\d+) IoU ([\d.]+)±[\d.]+ grids", sizes[0])
    assert shares and all(0.0 <= float(v) <= 1.0 for _, _, v in shares), sizes[0]
    # Where the grids went: mostly to the evaluation targets; none to tags the tagger gave, as
    # the crowd arm has no tagger.
    spent = re.search(
        r"^crowd +grids to evaluation (\d+)%, control (\d+)%, tagger (\d+)%, other (\d+)%, "
        r"known (\d+)%; window tiles already settled when shown (\d+)%$",
        done.stdout,
        flags=re.MULTILINE,
    )
    assert spent is not None, done.stdout
    *shares_spent, settled = [int(v) for v in spent.groups()]
    assert settled < 100  # a window is served for its open squares
    assert 98 <= sum(shares_spent) <= 102 and shares_spent[0] > 0 and shares_spent[2] == 0
    assert (tmp_path / "c.png").stat().st_size > 0
    # --keep leaves the arm's project to study (its votes are in its database).
    kept = tmp_path / "kept" / "crowd-seed0" / "tessera.db"
    assert kept.stat().st_size > 0
    # --set reached the arm's project.
    with sqlite3.connect(kept) as db:
        (settings,) = db.execute("SELECT settings FROM projects").fetchone()
    assert json.loads(settings)["vote_budget"] == 6


def test_keep_refuses_a_folder_that_exists(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--keep", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 2 and "the folder exists; name a new one" in done.stderr


def test_set_refuses_a_setting_projects_do_not_have() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--set", "min_vote=2"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 2 and "want KEY=VALUE with KEY one of" in done.stderr


def test_object_sizes_are_cocos_pixel_areas() -> None:
    def square(side: int) -> np.ndarray:
        mask = np.zeros((200, 200), dtype=bool)
        mask[:side, :side] = True
        return mask

    assert size_class(square(0)) == "absent"
    assert size_class(square(31)) == "small"
    assert size_class(square(32)) == "medium"
    assert size_class(square(95)) == "medium"
    assert size_class(square(96)) == "large"


def test_photograph_like_scenes_import_as_a_project_with_their_truth(tmp_path: Path) -> None:
    folder = tmp_path / "seed-0" / "template"
    build(folder, 3, 0, scenes="photo")
    settings = _settings(folder)
    engine = make_engine(settings.resolved_database_url)
    rng = np.random.default_rng(0)
    truths = [photo_like_scene(rng).truth for _ in range(3)]
    with make_session_factory(engine)() as session:
        targets = list(session.scalars(select(Target).order_by(Target.id)))
        names = {session.get(Tag, t.tag_id).name for t in targets}  # type: ignore[union-attr]
        assert len(targets) == 3 and names == {PHOTO_TAG}
        for target, truth in zip(targets, truths, strict=True):
            image = session.get(Image, target.image_id)
            assert image is not None and (image.height, image.width) == truth.shape
            loaded = load_truth(session, settings, target)
            assert loaded is not None and np.array_equal(loaded, truth)
        assert session.scalar(select(Project.slug)) == SLUG
    engine.dispose()


def test_the_project_holds_the_truth_a_real_one_does_and_the_bench_the_rest(
    tmp_path: Path,
) -> None:
    """Control images and a frozen share of the others keep their truth in the project; the
    others' moves to the benchmark's file, whole, so the loop's models may learn from the
    crowd's masks there and the measurement still scores every target."""
    folder = tmp_path / "seed-0" / "template"
    build(folder, 6, 0)
    settings = _settings(folder)
    engine = make_engine(settings.resolved_database_url)
    factory = make_session_factory(engine)
    with factory() as session:
        targets = Measurer(settings, factory).evaluation_targets(session)
        before = {t.id: load_truth(session, settings, t) for t in targets}
    moved = hide_truth(folder, 0.3)
    hidden = hidden_truth(folder)
    images = sorted({t.image_id for t in targets})
    frozen = frozen_images(images, 0.3)
    assert len(frozen) == round(0.3 * len(images)) >= 1 and frozen == frozen_images(images, 0.3)
    with factory() as session:
        for target in targets:
            now, then = load_truth(session, settings, target), before[target.id]
            if target.image_id in frozen or then is None:
                assert target.id not in hidden and (now is None) == (then is None)
            else:
                assert now is None and np.array_equal(hidden[target.id], then)
    assert moved == len(hidden) > 0
    engine.dispose()
