"""Archives given to the importer or uploaded by a curator: good ones land, hostile ones are
refused with a clear message and leave nothing behind (no rows, no files, no scratch)."""

from __future__ import annotations

import io
import re
import stat
import struct
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.config import Settings
from app.models import Image, Project, Role
from app.services.archive import ArchiveLimits, unpack_archive
from app.services.errors import InvalidInputError
from app.services.importer import default_project_slug, run_import
from tests.app.conftest import Live
from tests.app.test_cli import run
from tests.app.test_curate import csrf_of, logged_in
from tests.builders import files_under, image_bytes

LIMITS = ArchiveLimits(max_members=100, max_total_bytes=10 * 1024 * 1024)
Members = list[tuple[str, bytes]]


def good_members(prefix: str = "pets/") -> Members:
    return [
        (f"{prefix}a.png", image_bytes(64, 48, fmt="PNG", seed=1)),
        (f"{prefix}b.png", image_bytes(64, 48, fmt="PNG", seed=2)),
        (f"{prefix}tags.txt", b"a.png cat\nb.png dog\n"),
    ]


def write_zip(path: Path, members: Members) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members:
            z.writestr(name, data)
    return path


def write_tar(path: Path, members: Members, extra: list[tarfile.TarInfo] = ()) -> Path:  # type: ignore[assignment]
    with tarfile.open(path, "w:gz") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        for info in extra:
            t.addfile(info)
    return path


def tar_with_long_name(path: Path, fmt: int) -> Path:
    """A member named with 100,000 characters: a GNU long-name or a pax header that size."""
    with tarfile.open(path, "w:gz", format=fmt) as t:
        data = image_bytes(16, 16, fmt="PNG", seed=3)
        info = tarfile.TarInfo("pets/" + "a" * 100_000 + ".png")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    return path


def zip_patched(path: Path, name: str, patch: Callable[[bytearray, int], None]) -> Path:
    """A one-member zip whose bytes ``patch`` changes (given where the central entry starts)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(name, b"hello")
    data = bytearray(buf.getvalue())
    patch(data, data.rfind(b"PK\x01\x02"))
    return _write(path, bytes(data))


def _deflate64(data: bytearray, central: int) -> None:  # a method zipfile lacks (Windows')
    data[central + 10 : central + 12] = struct.pack("<H", 9)
    data[8:10] = struct.pack("<H", 9)


def _bad_utf8_name(data: bytearray, central: int) -> None:  # flagged UTF-8, and it is not
    data[central + 8 : central + 10] = struct.pack("<H", 0x800)
    at = data.find(b"ab.png", central)
    data[at : at + 2] = b"\xff\xfe"


def tar_damaged_after_first(path: Path) -> Path:
    """An uncompressed tar whose second member's header checksum is broken: tarfile stops
    there without a word, and the first member alone would have been imported."""
    buf = io.BytesIO()
    members = good_members()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            t.addfile(info, io.BytesIO(payload))
    data = bytearray(buf.getvalue())
    second = 512 + -(-len(members[0][1]) // 512) * 512
    data[second + 148 : second + 156] = b"99999999"
    return _write(path, bytes(data))


def corrupt_xz(path: Path) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as t:
        payload = bytes(range(256)) * 1200
        for name in ("a.png", "b.png"):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            t.addfile(info, io.BytesIO(payload))
    data = bytearray(buf.getvalue())
    middle = len(data) // 2
    data[middle : middle + 50] = b"\0" * 50
    return _write(path, bytes(data))


def zip_with_link(folder: Path) -> Path:
    path = folder / "x.zip"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in good_members():
            z.writestr(name, data)
        link = zipfile.ZipInfo("pets/c.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        z.writestr(link, "/etc/passwd")
    return path


def tar_entry(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


def zip_bomb(folder: Path) -> Path:
    """11 MiB of zeros in a 11 KiB zip: past LIMITS by what it declares."""
    path = folder / "x.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("pets/zeros.png", b"\0" * (11 * 1024 * 1024))
        z.writestr("pets/tags.txt", b"zeros.png cat\n")
    return path


HOSTILE: dict[str, tuple[Callable[[Path], Path], str]] = {
    "dotdot in a zip": (
        lambda d: write_zip(d / "x.zip", [*good_members(), ("pets/../../evil.png", b"x")]),
        "'..' leaves",
    ),
    "dotdot in a tar": (
        lambda d: write_tar(d / "x.tar.gz", [*good_members(), ("../evil.png", b"x")]),
        "'..' leaves",
    ),
    "absolute name": (
        lambda d: write_tar(d / "x.tgz", [*good_members(), ("/tmp/evil.png", b"x")]),
        "absolute path",
    ),
    "windows drive": (
        lambda d: write_zip(d / "x.zip", [*good_members(), ("C:\\evil.png", b"x")]),
        "absolute path",
    ),
    "symlink in a tar": (
        lambda d: write_tar(
            d / "x.tar.gz", good_members(), [tar_entry("pets/c.png", tarfile.SYMTYPE, "/etc")]
        ),
        "a link or special file",
    ),
    "hard link in a tar": (
        lambda d: write_tar(
            d / "x.tar.gz", good_members(), [tar_entry("pets/c.png", tarfile.LNKTYPE, "x")]
        ),
        "a link or special file",
    ),
    "fifo in a tar": (
        lambda d: write_tar(
            d / "x.tar.gz", good_members(), [tar_entry("pets/f", tarfile.FIFOTYPE)]
        ),
        "a link or special file",
    ),
    "symlink in a zip": (zip_with_link, "a link or special file"),
    "decompression bomb": (zip_bomb, "decompression bomb"),
    "too many members": (
        lambda d: write_zip(d / "x.zip", [(f"pets/{i}.txt", b"") for i in range(101)]),
        "more than 100",
    ),
    "too many members in a tar": (
        lambda d: write_tar(d / "x.tar.gz", [(f"pets/{i}.txt", b"") for i in range(101)]),
        "more than 100",
    ),
    # tarfile reads such a header whole before anything else is seen (one of 500 MB took 2.8 GB).
    "a long name past the header limit": (
        lambda d: tar_with_long_name(d / "x.tar.gz", tarfile.GNU_FORMAT),
        "extended header of 100,",
    ),
    "a pax header past the limit": (
        lambda d: tar_with_long_name(d / "x.tar.gz", tarfile.PAX_FORMAT),
        "extended header of 100,",
    ),
    # These were server errors: zipfile and lzma raise what the unpacker did not catch.
    "a compression method zipfile lacks": (
        lambda d: zip_patched(d / "x.zip", "a.png", _deflate64),
        "cannot be unpacked",
    ),
    "a name flagged UTF-8 that is not": (
        lambda d: zip_patched(d / "x.zip", "ab.png", _bad_utf8_name),
        "cannot be unpacked",
    ),
    "a corrupt xz stream": (lambda d: corrupt_xz(d / "x.tar.xz"), "cannot be unpacked"),
    "a damaged header after the first": (
        lambda d: tar_damaged_after_first(d / "x.tar"),
        "damaged after its first 1 members",
    ),
    "same name twice": (
        lambda d: write_zip(d / "x.zip", [*good_members(), ("pets/a.png", b"x")]),
        "appears twice",
    ),
    "truncated": (
        lambda d: _truncate(write_tar(d / "x.tar.gz", good_members())),
        "cannot be unpacked",
    ),
    "not an archive": (
        lambda d: _write(d / "x.zip", image_bytes(32, 32, fmt="PNG", seed=0)),
        "cannot be unpacked",
    ),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _truncate(path: Path) -> Path:
    return _write(path, path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.filterwarnings("ignore:Duplicate name")  # the "same name twice" archive
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archives_are_refused_and_nothing_is_unpacked(tmp_path: Path, case: str) -> None:
    make, message = HOSTILE[case]
    (tmp_path / "in").mkdir()
    archive = make(tmp_path / "in")
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(InvalidInputError, match=re.escape(message)):
        unpack_archive(archive, dest, LIMITS)
    assert list(dest.iterdir()) == []
    assert not (tmp_path / "evil.png").exists() and not Path("/tmp/evil.png").exists()


def test_an_archive_that_inflates_past_its_declared_size_is_stopped_while_inflating(
    tmp_path: Path,
) -> None:
    """A tar's headers can't lie, but the budget is counted as bytes arrive all the same."""
    archive = write_tar(tmp_path / "x.tar", [("a/zeros.bin", b"\0" * 4096)])
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(InvalidInputError, match="decompression bomb"):
        unpack_archive(archive, dest, ArchiveLimits(max_members=10, max_total_bytes=1000))
    assert list(dest.iterdir()) == []


def test_zip_and_tar_archives_import_like_their_folder(
    session: Session, settings: Settings, tmp_path: Path
) -> None:
    zipped = write_zip(tmp_path / "pets.zip", good_members())
    tarred = write_tar(tmp_path / "flat.tar.gz", good_members(prefix=""))
    assert default_project_slug(zipped) == "pets" and default_project_slug(tarred) == "flat"
    for slug, archive in (("pets", zipped), ("flat", tarred)):
        report = run_import(
            session, settings=settings, project_slug=slug, path=archive, tag_file=None
        )
        assert (report.images_added, report.image_tags_added, report.skipped) == (2, 2, [])
    assert files_under(settings.scratch_dir) == []  # the unpacked copies are gone


def test_a_hostile_archive_leaves_no_rows_files_or_scratch(
    session: Session, settings: Settings, tmp_path: Path
) -> None:
    archive = write_zip(tmp_path / "x.zip", [*good_members(), ("pets/../../evil.png", b"x")])
    with pytest.raises(InvalidInputError, match=re.escape("'..' leaves")):
        run_import(session, settings=settings, project_slug="x", path=archive, tag_file=None)
    assert session.scalar(select(func.count()).select_from(Project).where(Project.slug == "x")) == 0
    assert files_under(settings.images_dir) == [] and files_under(settings.scratch_dir) == []


def test_an_archive_without_one_good_image_is_refused_whole(
    session: Session, settings: Settings, tmp_path: Path
) -> None:
    junk = [(f"{c}.png", b"not an image") for c in "abcdefgh"]
    archive = write_zip(tmp_path / "junk.zip", [*junk, ("tags.txt", b"a.png cat\n")])
    with pytest.raises(InvalidInputError, match="no image could be imported") as refused:
        run_import(session, settings=settings, project_slug="junk", path=archive, tag_file=None)
    for name, _ in junk:  # every reason, none hidden behind "and 3 more"
        assert f"\n  {name}: not an image" in str(refused.value)
    assert (
        session.scalar(select(func.count()).select_from(Project).where(Project.slug == "junk")) == 0
    )


def test_cli_imports_an_archive_and_refuses_a_hostile_one(tmp_path: Path) -> None:
    good = write_zip(tmp_path / "pets.zip", good_members())
    result = run(tmp_path / "data", "import", str(good))
    assert result.returncode == 0, result.stderr
    assert "'pets'" in result.stdout
    bad = write_tar(
        tmp_path / "bad.tar.gz", good_members(), [tar_entry("pets/l", tarfile.SYMTYPE, "/")]
    )
    result = run(tmp_path / "data", "import", str(bad))
    assert result.returncode == 2
    assert "a link or special file" in result.stderr and "nothing was imported" in result.stderr
    assert "bad" not in run(tmp_path / "data", "project", "list").stdout


def _images(live: Live) -> int:
    with live.factory() as session:
        return session.scalar(select(func.count()).select_from(Image)) or 0


def test_a_curator_uploads_an_archive_and_sees_the_report(live: Live, tmp_path: Path) -> None:
    client = logged_in(live, Role.CURATOR)
    page = client.get("/curate/import")
    assert page.status_code == 200 and 'name="archive"' in page.text
    before = _images(live)
    archive = write_zip(tmp_path / "pets.zip", good_members())
    response = client.post(
        "/curate/import",
        data={"csrf_token": csrf_of(page.text), "new_project": "Pets 2"},
        files={"archive": ("pets.zip", archive.read_bytes(), "application/zip")},
    )
    assert response.status_code == 200, response.text
    assert 'id="images-added">2<' in response.text and "Imported into pets-2" in response.text
    assert _images(live) == before + 2
    assert files_under(live.settings.scratch_dir) == []


def test_uploads_are_refused_clearly_and_store_nothing(live: Live, tmp_path: Path) -> None:
    client = logged_in(live, Role.CURATOR)
    token = csrf_of(client.get("/curate/import").text)
    before, files_before = _images(live), files_under(live.settings.images_dir)
    hostile = write_zip(tmp_path / "x.zip", [*good_members(), ("pets/../../evil.png", b"x")])
    cases = {
        "hostile": ("x.zip", hostile.read_bytes(), 422, "leaves the archive"),
        "an image": ("a.png", image_bytes(32, 32, fmt="PNG", seed=0), 422, "is not an archive"),
        "junk": ("j.zip", b"PK\x03\x04 junk", 422, "cannot be unpacked"),
    }
    for name, data, status, message in cases.values():
        response = client.post(
            "/curate/import",
            data={"csrf_token": token, "project": "demo"},
            files={"archive": (name, data, "application/octet-stream")},
        )
        assert response.status_code == status, (name, response.text)
        assert message in response.text and "Nothing was imported" in response.text
    no_csrf = client.post(
        "/curate/import",
        data={"project": "demo"},
        files={"archive": ("x.zip", hostile.read_bytes(), "application/zip")},
    )
    assert no_csrf.status_code == 403
    anonymous = logged_in(live, None).post(
        "/curate/import", files={"archive": ("x.zip", b"x", "application/zip")}
    )
    assert anonymous.status_code == 401
    assert _images(live) == before and files_under(live.settings.images_dir) == files_before
    assert files_under(live.settings.scratch_dir) == []


def test_an_upload_over_the_limit_is_refused_by_its_length(live: Live, tmp_path: Path) -> None:
    client = logged_in(live, Role.CURATOR)
    token = csrf_of(client.get("/curate/import").text)
    live.settings.max_upload_bytes = 1000  # the app reads its settings per request
    archive = write_zip(tmp_path / "pets.zip", good_members())
    response = client.post(
        "/curate/import",
        data={"csrf_token": token, "project": "demo"},
        files={"archive": ("pets.zip", archive.read_bytes(), "application/zip")},
    )
    assert response.status_code == 413 and "TESSERA_MAX_UPLOAD_BYTES" in response.text


def test_the_server_goes_on_serving_while_a_curator_imports(
    live: Live, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The import ran on the event loop: a 16 s import held /healthz for 13.7 s."""
    import threading
    import time

    from app.pages import curate_import

    def slow_import(*_args: object, **_kwargs: object) -> None:
        time.sleep(1.5)
        raise InvalidInputError("stopped by the test")

    monkeypatch.setattr(curate_import, "run_import", slow_import)
    archive = write_zip(tmp_path / "pets.zip", good_members()).read_bytes()
    # One client, one event loop (its portal) for both requests.
    with TestClient(live.app, follow_redirects=False) as client:
        logged = logged_in(live, Role.CURATOR)  # makes the account; its cookies are copied
        client.cookies.update(logged.cookies)
        token = csrf_of(client.get("/curate/import").text)
        answers: list[int] = []

        def upload() -> None:
            response = client.post(
                "/curate/import",
                data={"csrf_token": token, "new_project": "slow"},
                files={"archive": ("pets.zip", archive, "application/zip")},
            )
            answers.append(response.status_code)

        importing = threading.Thread(target=upload)
        importing.start()
        time.sleep(0.3)
        started = time.perf_counter()
        assert client.get("/healthz").status_code == 200
        waited = time.perf_counter() - started
        importing.join()
    assert answers == [422]
    assert waited < 0.8, f"/healthz waited {waited:.2f} s behind the import"
