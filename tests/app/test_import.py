"""Import of folders with tag files and COCO instances: good input lands, bad input is named."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from pycocotools import mask as mask_utils
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from app.config import Settings
from app.models import Image, ImageTag, MaskSource, MaskVersion, Project, Tag, TagAlias, Target
from app.services.errors import InvalidInputError
from app.services.import_formats import ImportFormatError
from app.services.importer import ImportReport, run_import
from app.storage import decode_mask_png
from tests.builders import files_under, write_image


def _import(session: Session, settings: Settings, path: Path, **kw: object) -> ImportReport:
    return run_import(
        session,
        settings=settings,
        project_slug=str(kw.get("slug", "p")),
        path=path,
        tag_file=kw.get("tag_file"),  # type: ignore[arg-type]
    )


def _count(session: Session, model: type, project: str = "p") -> int:
    pid = session.scalar(select(Project.id).where(Project.slug == project))
    return (
        session.scalar(select(func.count()).select_from(model).where(model.project_id == pid)) or 0
    )


def _tags_of(session: Session, file_name: str) -> set[str]:
    rows = session.scalars(
        select(Tag.name)
        .join(ImageTag, ImageTag.tag_id == Tag.id)
        .join(Image, Image.id == ImageTag.image_id)
        .where(Image.file_name == file_name)
    )
    return set(rows)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    write_image(src / "a.png", 80, 60, seed=1)
    write_image(src / "b.jpg", 60, 90, seed=2)
    write_image(src / "images" / "c.webp", 70, 70, seed=3)
    (src / "vocabulary.json").write_text(
        json.dumps(
            {
                "tags": [
                    {"name": "dress", "category": "general"},
                    {
                        "name": "red_dress",
                        "parent": "dress",
                        "aliases": ["crimson_dress"],
                        "display_name": "red dress",
                    },
                    {"name": "striped", "category": "attribute"},
                ]
            }
        )
    )
    (src / "tags.txt").write_text(
        "# Danbooru-style\na.png red_dress Striped\nb.jpg crimson_dress\nc.webp   cat  \n"
    )
    return src


def test_danbooru_folder_imports_images_tags_and_targets(
    session: Session, settings: Settings, folder: Path
) -> None:
    report = _import(session, settings, folder)

    assert report.images_added == 3 and not report.skipped
    assert _count(session, Image) == 3
    # Aliases resolve, names are normalised, and a child tag implies its parent.
    assert _tags_of(session, "a.png") == {"red_dress", "dress", "striped"}
    assert _tags_of(session, "b.jpg") == {"red_dress", "dress"}
    assert _tags_of(session, "c.webp") == {"cat"}
    assert _count(session, Target) == 6
    red = session.scalar(select(Tag).where(Tag.name == "red_dress"))
    assert red is not None and red.display_name == "red dress" and red.parent is not None
    assert (
        session.scalar(select(TagAlias.alias).where(TagAlias.tag_id == red.id)) == "crimson_dress"
    )
    # Stored once by content hash under the data folder.
    stored = files_under(settings.images_dir)
    assert len(stored) == 3
    image = session.scalar(select(Image).where(Image.file_name == "a.png"))
    assert image is not None and any(image.sha256 in p.name for p in stored)
    assert (image.width, image.height, image.format) == (80, 60, "PNG")


def test_reimport_and_duplicates_store_each_image_once(
    session: Session, settings: Settings, folder: Path
) -> None:
    (folder / "copy_of_a.png").write_bytes((folder / "a.png").read_bytes())
    first = _import(session, settings, folder)
    assert first.images_added == 3
    assert any("copy_of_a.png" in w for w in first.warnings)

    again = _import(session, settings, folder)
    assert again.images_added == 0 and again.images_already_present == 3
    assert again.image_tags_added == 0 and again.targets_created == 0
    assert _count(session, Image) == 3
    assert len(files_under(settings.images_dir)) == 3


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("tags.csv", "file_name,tags\na.png,red_dress striped\nb.jpg,crimson_dress\nc.webp,cat\n"),
        ("tags.csv", "image,tag\na.png,red_dress\na.png,striped\nb.jpg,red_dress\nc.webp,cat\n"),
        (
            "tags.json",
            json.dumps(
                {"a.png": ["red_dress", "striped"], "b.jpg": "red_dress", "c.webp": ["cat"]}
            ),
        ),
        (
            "tags.json",
            json.dumps(
                [
                    {"image": "a.png", "tags": ["red_dress", "striped"]},
                    {"file_name": "b.jpg", "tags": ["red_dress"]},
                    {"image": "c.webp", "tags": "cat"},
                ]
            ),
        ),
    ],
)
def test_csv_and_json_tag_files(
    session: Session, settings: Settings, folder: Path, name: str, content: str
) -> None:
    (folder / "tags.txt").unlink()
    (folder / name).write_text(content)
    report = _import(session, settings, folder)
    assert report.images_added == 3
    assert _tags_of(session, "a.png") == {"red_dress", "dress", "striped"}
    assert _tags_of(session, "c.webp") == {"cat"}


def test_bad_files_are_named_skipped_and_leave_nothing(
    session: Session, settings: Settings, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    write_image(src / "good.png", seed=1)
    (src / "notes.png").write_text("this is not an image")
    good_jpeg = write_image(tmp_path / "x.jpg", 64, 64, seed=2).read_bytes()
    (src / "truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    write_image(src / "huge.png", 300, 300, seed=3)
    (src / "empty.png").write_bytes(b"")
    (src / "tags.txt").write_text(
        "good.png cat\nnotes.png cat\ntruncated.jpg cat\nhuge.png cat\nempty.png cat\n"
        "missing.png cat\n../outside.png cat\n/etc/passwd cat\n"
    )
    write_image(tmp_path / "outside.png", seed=4)
    settings.max_image_pixels = 200 * 200

    report = _import(session, settings, src)

    skipped = dict(report.skipped)
    assert report.images_added == 1
    assert set(skipped) == {
        "notes.png",
        "truncated.jpg",
        "huge.png",
        "empty.png",
        "missing.png",
        "../outside.png",
        "/etc/passwd",
    }
    assert "not an image" in skipped["notes.png"]
    assert "truncated" in skipped["truncated.jpg"]
    assert "decompression bomb" in skipped["huge.png"]
    assert "empty" in skipped["empty.png"]
    assert "not found" in skipped["missing.png"]
    assert "leaves the import folder" in skipped["../outside.png"]
    assert len(files_under(settings.images_dir)) == 1
    assert _count(session, Image) == 1


def test_decompression_bomb_header_is_refused_before_decoding(
    session: Session, settings: Settings, tmp_path: Path
) -> None:
    """A PNG whose header claims 100k x 100k pixels is refused from the header alone."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    bomb = (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
    )
    src = tmp_path / "src"
    src.mkdir()
    (src / "bomb.png").write_bytes(bomb + chunk(b"IEND", b""))
    write_image(src / "ok.png", seed=5)
    (src / "tags.txt").write_text("bomb.png cat\nok.png cat\n")
    report = _import(session, settings, src)
    assert report.images_added == 1
    assert "decompression bomb" in dict(report.skipped)["bomb.png"]


def _jpeg_with_repeated_scans(extra: int, side: int = 256) -> bytes:
    """A progressive JPEG whose last scan is repeated ``extra`` times: each repeat is decoded
    over the whole image again."""
    buf = io.BytesIO()
    PILImage.new("RGB", (side, side), (120, 130, 140)).save(
        buf, "JPEG", progressive=True, quality=90
    )
    data = buf.getvalue()
    last = data.rindex(b"\xff\xda")
    end = data.rindex(b"\xff\xd9")
    return data[:end] + data[last:end] * extra + data[end:]


def test_a_jpeg_of_very_many_scans_is_refused_before_decoding(
    session: Session, settings: Settings, tmp_path: Path
) -> None:
    """2,000 repeats of a 4000x4000 image's last scan (63 kB) took 22 s per decode, at import
    and at every tile cut from it."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "bomb.jpg").write_bytes(_jpeg_with_repeated_scans(200))
    (src / "fine.jpg").write_bytes(_jpeg_with_repeated_scans(0))  # a progressive JPEG as made
    (src / "tags.txt").write_text("bomb.jpg cat\nfine.jpg cat\n")
    report = _import(session, settings, src)
    assert report.images_added == 1
    assert "scans" in dict(report.skipped)["bomb.jpg"]


@pytest.mark.parametrize("name", ["vocabulary.json", "tags.txt"])
def test_a_description_file_over_its_limit_is_refused_unread(
    session: Session, settings: Settings, folder: Path, name: str
) -> None:
    """Read whole, JSON takes up to twenty times its size in memory: 120 MB of ``[{},{},...]``
    in an upload took 2.7 GB."""
    small = settings.model_copy(update={"max_description_bytes": 1000})
    (folder / name).write_text((folder / name).read_text() + " " * 1000)  # the others are under
    with pytest.raises(ImportFormatError, match=f"{name}: .* over the limit of 1,000"):
        _import(session, small, folder)
    assert _count(session, Image) == 0
    assert _import(session, settings, folder).images_added == 3  # the default reads it


def test_unknown_tag_format_is_refused_before_anything_is_written(
    session: Session, settings: Settings, folder: Path
) -> None:
    (folder / "tags.txt").unlink()
    (folder / "tags.xml").write_text("<tags/>")
    with pytest.raises(ImportFormatError, match=r"tags.xml: unknown tag file format"):
        _import(session, settings, folder, tag_file=folder / "tags.xml")
    assert files_under(settings.data_dir / "images") == []


@pytest.mark.parametrize("reverse", [False, True])
def test_a_vocabulary_too_deep_or_circular_is_refused_quickly(
    session: Session, settings: Settings, folder: Path, reverse: bool
) -> None:
    """A chain of 20,000 parents (92 kB) took 316 s to import; any order of its entries now
    stops at the depth limit, and a cycle is still a cycle."""
    from app.services.tag import MAX_TAG_DEPTH

    chain = [{"name": f"t{i}", "parent": f"t{i - 1}" if i else None} for i in range(20_000)]
    (folder / "vocabulary.json").write_text(json.dumps({"tags": chain[::-1] if reverse else chain}))
    started = time.perf_counter()
    with pytest.raises(InvalidInputError, match=f"more than {MAX_TAG_DEPTH} levels deep"):
        _import(session, settings, folder)
    assert time.perf_counter() - started < 30
    assert _count(session, Image) == 0
    # As deep as allowed imports; one more is refused.
    ok = chain[:MAX_TAG_DEPTH]
    (folder / "vocabulary.json").write_text(json.dumps({"tags": ok}))
    (folder / "tags.txt").write_text(f"a.png t{MAX_TAG_DEPTH - 1}\n")
    report = _import(session, settings, folder)
    assert report.images_added >= 1
    assert {"t0", f"t{MAX_TAG_DEPTH - 1}"} <= _tags_of(session, "a.png")


def test_a_circular_vocabulary_is_refused(
    session: Session, settings: Settings, folder: Path
) -> None:
    loop = [
        {"name": "a", "parent": "c"},
        {"name": "b", "parent": "a"},
        {"name": "c", "parent": "b"},
    ]
    (folder / "vocabulary.json").write_text(json.dumps({"tags": loop}))
    with pytest.raises(InvalidInputError, match="is a cycle"):
        _import(session, settings, folder)


def test_bad_csv_header_names_the_file(session: Session, settings: Settings, folder: Path) -> None:
    (folder / "tags.txt").unlink()
    (folder / "tags.csv").write_text("picture,labels\na.png,cat\n")
    with pytest.raises(ImportFormatError, match=r"tags.csv: the header must name"):
        _import(session, settings, folder)


def _coco(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    src = tmp_path / "coco"
    write_image(src / "images" / "one.png", 40, 30, seed=5)
    square = np.zeros((30, 40), dtype=bool)
    square[5:15, 10:30] = True
    blob = np.zeros((30, 40), dtype=bool)
    blob[20:28, 2:9] = True
    compressed = mask_utils.encode(np.asfortranarray(square.astype(np.uint8)))
    # Uncompressed RLE: column-major run lengths starting with zeros.
    flat = blob.flatten(order="F").astype(np.uint8)
    runs, current, count = [], 0, 0
    for value in flat:
        if value == current:
            count += 1
        else:
            runs.append(count)
            current, count = value, 1
    runs.append(count)
    coco = {
        "images": [{"id": 1, "file_name": "one.png", "width": 40, "height": 30}],
        "categories": [
            {"id": 1, "name": "red_box", "supercategory": "box"},
            {"id": 2, "name": "Blob", "supercategory": "blob"},
            {"id": 3, "name": "triangle", "supercategory": "shape"},
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "iscrowd": 1,
                "segmentation": {"size": [30, 40], "counts": compressed["counts"].decode()},
            },
            {
                "id": 2,
                "image_id": 1,
                "category_id": 2,
                "iscrowd": 1,
                "segmentation": {"size": [30, 40], "counts": runs},
            },
            {
                "id": 3,
                "image_id": 1,
                "category_id": 3,
                "iscrowd": 0,
                "segmentation": [[20.0, 2.0, 38.0, 2.0, 38.0, 20.0]],
            },
        ],
    }
    (src / "annotations.json").write_text(json.dumps(coco))
    return src, {"red_box": square, "blob": blob}


def test_coco_rle_and_polygons_become_ground_truth(
    session: Session, settings: Settings, tmp_path: Path
) -> None:
    src, expected = _coco(tmp_path)
    report = _import(session, settings, src)

    # Three annotated categories, and two parents derived as unions (blob is its own).
    assert report.images_added == 1 and report.ground_truth_masks == 5
    assert _tags_of(session, "one.png") == {"red_box", "box", "blob", "triangle", "shape"}
    versions = session.execute(
        select(Tag.name, MaskVersion)
        .join(Target, Target.id == MaskVersion.target_id)
        .join(Tag, Tag.id == Target.tag_id)
    )
    masks = {name: decode_mask_png(settings.data_dir / mv.hard_path) for name, mv in versions}
    for name, mask in expected.items():
        np.testing.assert_array_equal(masks[name], mask)
    np.testing.assert_array_equal(masks["box"], masks["red_box"])
    np.testing.assert_array_equal(masks["shape"], masks["triangle"])
    triangle = masks["triangle"]
    assert triangle.shape == (30, 40) and 50 < triangle.sum() < 200
    assert triangle[3, 36] and not triangle[18, 21]
    sources = set(session.scalars(select(MaskVersion.source)))
    assert sources == {MaskSource.GROUND_TRUTH}


def test_coco_truths_past_the_kept_budget_are_read_back_to_open_their_targets(
    session: Session, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The import keeps a bounded share of its masks at hand (every one was kept to the end);
    the others' targets open from the stored truth, the same pyramids and gold."""
    from app.models import Cell, Gold
    from app.services import importer

    def pyramids() -> list[tuple[int, int, int, int, bool | None]]:
        rows = session.execute(
            select(Cell.level, Cell.row, Cell.col, Gold.label.is_(True), Cell.label)
            .outerjoin(Gold, Gold.cell_id == Cell.id)
            .order_by(Cell.target_id, Cell.level, Cell.row, Cell.col)
        )
        return [tuple(r) for r in rows]  # type: ignore[misc]

    from app.services.crowd import opening

    # Whether an image is a control image follows its id, which a second import changes on
    # PostgreSQL: every one is a control here, its whole pyramid opened from its truth.
    monkeypatch.setattr(opening, "is_control", lambda _image_id, _share: True)
    src, _ = _coco(tmp_path)
    kept = _import(session, settings, src)
    with_kept = pyramids()
    session.execute(delete(Project))
    session.commit()
    monkeypatch.setattr(importer, "TRUTHS_KEPT_BYTES", 0)
    read_back = _import(session, settings, src)
    assert read_back.targets_opened == kept.targets_opened > 0
    assert pyramids() == with_kept


def test_coco_with_bad_segmentation_names_the_annotation(
    session: Session, settings: Settings, tmp_path: Path
) -> None:
    src, _ = _coco(tmp_path)
    coco = json.loads((src / "annotations.json").read_text())
    coco["annotations"][1]["segmentation"] = {"size": [10, 10], "counts": [1, 2, 3]}
    (src / "annotations.json").write_text(json.dumps(coco))
    with pytest.raises(ImportFormatError, match=r"annotations\[1\]"):
        _import(session, settings, src)
    assert _count(session, Image) == 0
    assert files_under(settings.data_dir) == []


def test_failed_import_leaves_no_rows_and_no_files(
    session: Session, settings: Settings, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.services import importer

    calls = {"n": 0}
    real = importer._Importer._tag_image

    def crash_on_third(self: importer._Importer, *args: object) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk on fire")
        real(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(importer._Importer, "_tag_image", crash_on_third)
    with pytest.raises(RuntimeError, match="disk on fire"):
        _import(session, settings, folder)
    assert session.scalar(select(func.count()).select_from(Image)) == 0
    assert session.scalar(select(func.count()).select_from(Project)) == 0
    assert files_under(settings.images_dir) == []
