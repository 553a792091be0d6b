"""Unpack an import archive (zip or tar, optionally compressed) into a private folder, safely.

An archive is untrusted input. Nothing in it may land outside the folder it is unpacked into,
so a member is refused when its name is absolute, has a drive letter or a ``..`` part, or when
it is anything but a plain file or folder (links, devices, fifos). A decompression bomb is
refused twice: by the sizes the archive declares, before anything is written, and by counting
the bytes actually inflated, because a crafted archive can lie about its sizes. Any refusal
names the member and the limit, and leaves nothing behind: the caller's folder is emptied.
"""

from __future__ import annotations

import lzma
import os
import shutil
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import IO

from app.services.errors import InvalidInputError

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
CHUNK = 1024 * 1024
UNIX = 3  # a zip member's create_system


@dataclass(frozen=True)
class ArchiveLimits:
    max_members: int
    max_total_bytes: int  # inflated, all members together


@dataclass(frozen=True)
class _Member:
    name: PurePosixPath
    is_dir: bool
    size: int  # as declared
    open: object  # the library's member object, for _open


def archive_suffix(name: str) -> str:
    """The archive suffix NAME ends with (``.tar.gz``), or ``""``."""
    return next((s for s in ARCHIVE_SUFFIXES if name.lower().endswith(s)), "")


def is_archive(path: Path) -> bool:
    """Whether PATH names an archive the importer unpacks (by its name, then by its content)."""
    if not path.is_file():
        return False
    if archive_suffix(path.name):
        return True
    return zipfile.is_zipfile(path) or tarfile.is_tarfile(path)


def safe_member_name(raw: str) -> PurePosixPath:
    """The member's name as a relative path inside the folder, or an error saying why not."""
    name = raw.replace("\\", "/")
    if not name or "\x00" in name:
        raise InvalidInputError(f"archive member {raw!r}: empty or NUL in its name")
    if name.startswith("/") or PureWindowsPath(raw).drive:
        raise InvalidInputError(f"archive member {raw!r}: absolute path; nothing was imported")
    parts = PurePosixPath(name).parts
    if ".." in parts:
        raise InvalidInputError(f"archive member {raw!r}: '..' leaves the archive's folder")
    clean = PurePosixPath(*[p for p in parts if p != "."]) if parts else PurePosixPath()
    if not clean.parts:
        raise InvalidInputError(f"archive member {raw!r}: no file name")
    return clean


def _zip_members(archive: zipfile.ZipFile) -> list[_Member]:
    members = []
    for info in archive.infolist():
        # Unix zips keep st_mode in the high bytes; a file type there other than file or folder
        # is a link or a device (other systems, and zips written without one, leave it 0).
        kind = stat.S_IFMT(info.external_attr >> 16) if info.create_system == UNIX else 0
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise InvalidInputError(
                f"archive member {info.filename!r}: a link or special file; only plain files "
                "and folders are imported"
            )
        if info.flag_bits & 0x1:
            raise InvalidInputError(f"archive member {info.filename!r}: encrypted")
        members.append(
            _Member(safe_member_name(info.filename), info.is_dir(), info.file_size, info)
        )
    return members


# A member's extended header (a GNU long name, a pax record) is read whole into memory by
# tarfile, before any member or limit is seen: one declared at 500 MB in a 486 kB upload took
# 2.8 GB. Real ones hold a path and a few attributes.
MAX_TAR_HEADER_BYTES = 64 * 1024
_EXTENDED = (
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
)


class BoundedTarInfo(tarfile.TarInfo):
    """A tar header whose extended header is refused past ``MAX_TAR_HEADER_BYTES`` before it is
    read (``_proc_member`` is tarfile's documented point for subclasses to hook)."""

    def _proc_member(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _EXTENDED and self.size > MAX_TAR_HEADER_BYTES:
            raise InvalidInputError(
                f"the archive has an extended header of {self.size:,} bytes, more than "
                f"{MAX_TAR_HEADER_BYTES:,}; refused"
            )
        return super()._proc_member(archive)  # type: ignore[misc]  # not in typeshed


def _tar_members(archive: tarfile.TarFile, limits: ArchiveLimits) -> list[_Member]:
    members: list[_Member] = []
    for info in archive:  # one header at a time: the count is checked as they come
        if len(members) >= limits.max_members:
            raise InvalidInputError(
                f"the archive has more than {limits.max_members:,} members "
                "(TESSERA_MAX_ARCHIVE_MEMBERS)"
            )
        if not (info.isfile() or info.isdir()):
            raise InvalidInputError(
                f"archive member {info.name!r}: a link or special file; only plain files and "
                "folders are imported"
            )
        members.append(_Member(safe_member_name(info.name), info.isdir(), info.size, info))
    # tarfile ends its walk quietly at a damaged header after the first: the archive's end is
    # a block of zeros, anything else is a member cut off (imported, the members before it
    # would have landed alone, without a word).
    fileobj = archive.fileobj
    assert fileobj is not None
    fileobj.seek(archive.offset)
    if fileobj.read(tarfile.BLOCKSIZE).strip(b"\0"):
        raise InvalidInputError(
            f"the archive is damaged after its first {len(members):,} members (a header that "
            "cannot be read)"
        )
    return members


def _check_declared(members: list[_Member], limits: ArchiveLimits) -> None:
    if len(members) > limits.max_members:
        raise InvalidInputError(
            f"the archive has {len(members):,} members, more than {limits.max_members:,} "
            "(TESSERA_MAX_ARCHIVE_MEMBERS)"
        )
    declared = sum(m.size for m in members)
    if declared > limits.max_total_bytes:
        raise InvalidInputError(
            f"the archive unpacks to {declared:,} bytes, more than {limits.max_total_bytes:,} "
            "(TESSERA_MAX_ARCHIVE_BYTES); refused as a possible decompression bomb"
        )
    seen: dict[PurePosixPath, bool] = {}
    for m in members:
        if seen.get(m.name, m.is_dir) != m.is_dir or (not m.is_dir and m.name in seen):
            raise InvalidInputError(f"archive member {str(m.name)!r} appears twice")
        seen[m.name] = m.is_dir


def _copy(source: IO[bytes], target: Path, budget: int, name: PurePosixPath) -> int:
    """Copy up to ``budget`` bytes; more is a bomb that lied about its size."""
    written = 0
    with target.open("xb") as out:
        while chunk := source.read(CHUNK):
            written += len(chunk)
            if written > budget:
                raise InvalidInputError(
                    f"archive member {str(name)!r} inflates past the archive's limit "
                    "(TESSERA_MAX_ARCHIVE_BYTES); refused as a decompression bomb"
                )
            out.write(chunk)
    return written


def _zip_entries(path: Path, most: int) -> int:
    """How many entries a zip's central directory holds, counted from its raw headers up to
    ``most + 1`` before ``ZipFile`` builds an object for every one (a 57 MB zip of a million
    entries took 850 MB before the member limit was checked). The count its end record declares
    where the directory cannot be walked (ZipFile then says what is wrong)."""
    with path.open("rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - (1 << 16) - 22))
        tail = fh.read()
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) < at + 22:
            return 0
        declared, _, start = struct.unpack("<HII", tail[at + 10 : at + 20])
        locator = tail.rfind(b"PK\x06\x07", 0, at)
        if locator >= 0 and len(tail) >= locator + 20:  # zip64: its own end record
            fh.seek(min(struct.unpack("<Q", tail[locator + 8 : locator + 16])[0], size))
            record = fh.read(56)
            if record[:4] == b"PK\x06\x06" and len(record) == 56:
                declared, _, start = struct.unpack("<QQQ", record[32:56])
        fh.seek(min(start, size))
        count = 0
        while count <= most:
            header = fh.read(46)
            if len(header) < 46 or header[:4] != b"PK\x01\x02":
                break
            name, extra, comment = struct.unpack("<HHH", header[28:34])
            fh.seek(name + extra + comment, os.SEEK_CUR)
            count += 1
        return max(count, min(int(declared), most + 1))


# Damaged or unsupported archives surface as any of these, often only while inflating: zipfile
# raises NotImplementedError for methods it lacks (deflate64, which Windows writes for large
# files; AES) and UnicodeDecodeError for a name flagged UTF-8 that is not; lzma's error is no
# OSError.
_DAMAGED = (
    zipfile.BadZipFile,
    tarfile.TarError,
    EOFError,
    zlib.error,
    lzma.LZMAError,
    OSError,
    NotImplementedError,
    UnicodeDecodeError,
)


@contextmanager
def _opened(path: Path, limits: ArchiveLimits) -> Iterator[tuple[list[_Member], object]]:
    try:
        if zipfile.is_zipfile(path):
            if _zip_entries(path, limits.max_members) > limits.max_members:
                raise InvalidInputError(
                    f"the archive has more than {limits.max_members:,} members "
                    "(TESSERA_MAX_ARCHIVE_MEMBERS)"
                )
            with zipfile.ZipFile(path) as z:
                yield _zip_members(z), z
            return
        with tarfile.open(path, tarinfo=BoundedTarInfo) as t:
            yield _tar_members(t, limits), t
    except _DAMAGED as exc:
        # An OSError's own words, not its file name: that is a path in the server's scratch.
        said = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise InvalidInputError(f"{path.name}: the archive cannot be unpacked ({said})") from exc


def _open_member(archive: object, member: _Member) -> IO[bytes]:
    if isinstance(archive, zipfile.ZipFile):
        assert isinstance(member.open, zipfile.ZipInfo)
        return archive.open(member.open)
    assert isinstance(archive, tarfile.TarFile) and isinstance(member.open, tarfile.TarInfo)
    handle = archive.extractfile(member.open)
    assert handle is not None  # a regular file
    return handle


def unpack_archive(path: Path, dest: Path, limits: ArchiveLimits) -> Path:
    """Unpack PATH into the empty folder DEST; returns the folder to import from.

    That is DEST itself, or its only subfolder when the archive wraps everything in one folder
    (``photos.zip`` holding ``photos/...``). On any error DEST is emptied and the error raised.
    """
    try:
        with _opened(path, limits) as (members, archive):
            _check_declared(members, limits)
            budget = limits.max_total_bytes
            for member in members:
                target = dest.joinpath(*member.name.parts)
                if member.is_dir:
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with _open_member(archive, member) as source:
                    budget -= _copy(source, target, budget, member.name)
    except BaseException:
        for child in dest.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise
    entries = [p for p in dest.iterdir() if not p.name.startswith((".", "__MACOSX"))]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return dest
