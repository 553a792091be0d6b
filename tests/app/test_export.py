"""`tessera export`: finished masks, the current masks of unfinished targets, nothing to export."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
from PIL import Image as PILImage
from pycocotools import mask as mask_utils
from sqlalchemy import select

from app.models import Image, Project, Tag, Target, TargetState
from app.services.curation.triage import accept_target
from app.services.masks.export import NothingToExportError, export_project
from tests.app.conftest import SLUG, Live
from tests.app.test_cli import run


def _project(session: object) -> Project:
    project = session.scalar(select(Project).where(Project.slug == SLUG))  # type: ignore[attr-defined]
    assert project is not None
    return project


def _names(live: Live, states: tuple[TargetState, ...]) -> dict[str, tuple[int, int]]:
    """``IMAGE__TAG.png`` of the targets in ``states``, with their image's (height, width)."""
    with live.factory() as session:
        rows = session.execute(
            select(Image, Tag)
            .join(Target, Target.image_id == Image.id)
            .join(Tag, Tag.id == Target.tag_id)
            .where(Target.state.in_(states))
        ).all()
        return {f"{Path(i.file_name).stem}__{t.name}.png": (i.height, i.width) for i, t in rows}


def _accept(live: Live, n: int) -> list[int]:
    """Complete the first ``n`` targets with their masks as they stand."""
    with live.factory() as session:
        project = _project(session)
        targets = session.scalars(select(Target).order_by(Target.id).limit(n)).all()
        for target in targets:
            accept_target(
                session, settings=live.settings, project=project, target=target, curator="ada"
            )
        session.commit()
        return [t.id for t in targets]


def _png(archive: zipfile.ZipFile, name: str) -> PILImage.Image:
    return PILImage.open(io.BytesIO(archive.read(name)))


def test_unfinished_masks_come_marked_and_apart(live: Live, tmp_path: Path) -> None:
    live.volunteer().step(SLUG)  # some votes, so that the current masks are the crowd's
    _accept(live, 2)
    finished = _names(live, (TargetState.COMPLETE,))
    unfinished = _names(live, (TargetState.COLLECTING, TargetState.TRIAGE))
    assert len(finished) == 2 and unfinished
    out = tmp_path / "all.zip"
    with live.factory() as session:
        report = export_project(
            session,
            settings=live.settings,
            project=_project(session),
            out=out,
            include_unfinished=True,
        )
    assert report.masks == len(finished) + len(unfinished)
    assert report.unfinished == len(unfinished)
    archive = zipfile.ZipFile(out)
    names = archive.namelist()
    assert {n.removeprefix("masks/") for n in names if n.startswith("masks/")} == set(finished)
    assert {
        n.removeprefix("unfinished/masks/") for n in names if n.startswith("unfinished/masks/")
    } == set(unfinished)
    for name, (height, width) in unfinished.items():
        hard = _png(archive, f"unfinished/masks/{name}")
        soft = _png(archive, f"unfinished/soft/{name}")
        assert hard.mode == "1" and soft.mode == "L"
        assert hard.size == soft.size == (width, height)

    coco = json.loads(archive.read("annotations.json"))
    assert coco["info"]["tessera"] == {"include_unfinished": True}
    marks = [a["tessera"] for a in coco["annotations"]]
    assert any(not m["finished"] for m in marks)
    for ann in coco["annotations"]:
        state, done = ann["tessera"]["state"], ann["tessera"]["finished"]
        assert done == (state == "complete") and state in ("complete", "collecting", "triage")
        rle = dict(ann["segmentation"], counts=ann["segmentation"]["counts"].encode())
        image = next(i for i in coco["images"] if i["id"] == ann["image_id"])
        assert mask_utils.decode(rle).shape == (image["height"], image["width"])
        assert ann["area"] > 0  # empty masks are PNGs only


def test_without_the_flag_only_finished_masks(live: Live, tmp_path: Path) -> None:
    _accept(live, 1)
    out = tmp_path / "finished.zip"
    with live.factory() as session:
        report = export_project(session, settings=live.settings, project=_project(session), out=out)
    archive = zipfile.ZipFile(out)
    assert report.masks == 1 and report.unfinished == 0
    assert not [n for n in archive.namelist() if n.startswith("unfinished/")]
    coco = json.loads(archive.read("annotations.json"))
    assert coco["info"]["tessera"] == {"include_unfinished": False}
    assert all(a["tessera"] == {"state": "complete", "finished": True} for a in coco["annotations"])


def test_nothing_to_export_writes_nothing(live: Live, tmp_path: Path) -> None:
    out = tmp_path / "empty.zip"
    with live.factory() as session:
        with pytest.raises(NothingToExportError, match="no finished mask yet"):
            export_project(
                session,
                settings=live.settings,
                project=_project(session),
                out=out,
                allow_empty=False,
            )
        with pytest.raises(NothingToExportError, match="no mask to export"):
            export_project(
                session,
                settings=live.settings,
                project=_project(session),
                out=out,
                tag="no-such-tag",
                include_unfinished=True,
                allow_empty=False,
            )
    assert not out.exists() and not list(tmp_path.glob(".empty.zip.*"))


def test_export_command_says_when_nothing_is_finished(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "masks.zip"
    assert run(data, "demo", "--no-serve", "--images", "2", "--seed", "1").returncode == 0
    empty = run(data, "export", "--out", str(out))
    assert empty.returncode == 2 and "no finished mask" in empty.stderr
    assert "--include-unfinished" in empty.stderr and not out.exists()

    wip = run(data, "export", "--out", str(out), "--include-unfinished")
    assert wip.returncode == 0, wip.stderr
    assert "of them unfinished" in wip.stdout
    names = set(zipfile.ZipFile(out).namelist()) - {"annotations.json"}
    assert names and all(n.startswith(("unfinished/masks/", "unfinished/soft/")) for n in names)
