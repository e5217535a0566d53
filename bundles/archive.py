"""The bundle archive: one zip file carrying signed metadata and the bundle's files.

Layout::

    metadata/root.json            newest image-repository root when the bundle was signed
    metadata/roots/N.root.json    every root version (lets an old device walk key rotations)
    metadata/targets.json         targets metadata signed offline (lists every file below)
    targets/<name>/<version>/...  the bundle's files, each a TUF target

Reading is defensive because an archive is untrusted until verified: only regular files and
directories; no absolute names, ``..``, backslashes, empty or duplicate names, no overlapping
entries; declared sizes bounded and compression ratios capped *before* anything is inflated;
inflation streams with a byte counter so a lying header cannot exceed the cap.
Writing is deterministic: sorted names, fixed timestamps and permissions, so the same files give the
same archive bytes.
"""

from __future__ import annotations

import itertools
import stat
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from bundles.errors import ArchiveError

METADATA_PREFIX = "metadata/"
TARGETS_PREFIX = "targets/"
MAX_MEMBERS = 10_000
MAX_METADATA_BYTES = 5_000_000
MAX_RATIO = 200
"""Largest accepted inflated/compressed size ratio of a member (a 1000:1 member is a bomb)."""
RATIO_FLOOR_BYTES = 64 * 1024
"""Members smaller than this are not ratio-checked (tiny JSON compresses very well)."""
_FIXED_DATE = (1980, 1, 1, 0, 0, 0)
_CHUNK = 1 << 16


@dataclass(frozen=True)
class Member:
    """A checked archive entry."""

    name: str
    size: int
    compressed_size: int
    info: zipfile.ZipInfo


def check_member_name(name: str) -> None:
    """Refuse names that could escape a directory or alias another file."""
    if not name or "\x00" in name or "\\" in name:
        raise ArchiveError("archive member has an unsafe name", path=repr(name))
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise ArchiveError("archive member has an absolute path", path=name)
    parts = name[:-1].split("/") if name.endswith("/") else name.split("/")
    if any(p in ("..", ".", "") for p in parts):
        raise ArchiveError("archive member path escapes or aliases (.., ., empty component)", path=name)


def _unix_mode(info: zipfile.ZipInfo) -> int:
    return (info.external_attr >> 16) & 0xFFFF


class BundleArchive:
    """A bundle archive opened for checked reading. Use as a context manager."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._zip = zipfile.ZipFile(path)
        except (OSError, zipfile.BadZipFile) as exc:
            raise ArchiveError(f"not a readable bundle archive: {exc}", path=str(path)) from exc
        try:
            self.members = self._check_members()
        except BaseException:
            self._zip.close()
            raise

    def __enter__(self) -> BundleArchive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._zip.close()

    def _check_members(self) -> dict[str, Member]:
        infos = self._zip.infolist()
        if len(infos) > MAX_MEMBERS:
            raise ArchiveError("too many archive members", expected=f"<= {MAX_MEMBERS}", found=len(infos))
        members: dict[str, Member] = {}
        spans: list[tuple[int, int, str]] = []
        for info in infos:
            name = info.filename
            check_member_name(name)
            mode = _unix_mode(info)
            if info.is_dir():
                continue
            if mode and stat.S_IFMT(mode) not in (0, stat.S_IFREG):
                kind = "symlink" if stat.S_ISLNK(mode) else "special file (device, fifo, socket or link)"
                raise ArchiveError(f"archive member is a {kind}; only regular files are allowed", path=name)
            if info.flag_bits & 0x1:
                raise ArchiveError("encrypted archive members are not supported", path=name)
            if name in members:
                raise ArchiveError("duplicate archive member", path=name)
            if not (name.startswith(METADATA_PREFIX) or name.startswith(TARGETS_PREFIX)):
                raise ArchiveError("archive member outside metadata/ and targets/", path=name)
            if (info.file_size > RATIO_FLOOR_BYTES
                    and info.file_size > MAX_RATIO * max(info.compress_size, 1)):
                raise ArchiveError(
                    "archive member inflates beyond the allowed ratio (decompression bomb?)",
                    path=name, expected=f"<= {MAX_RATIO}:1",
                    found=f"{info.file_size}:{info.compress_size}",
                )
            spans.append((info.header_offset, info.header_offset + 30 + len(info.filename.encode())
                          + info.compress_size, name))
            members[name] = Member(name, info.file_size, info.compress_size, info)
        spans.sort()
        for (_, end, a), (start, _, b) in itertools.pairwise(spans):
            if start < end:
                raise ArchiveError("archive members overlap (a shared or hard-linked entry?)",
                                   path=f"{a} / {b}")
        return members

    # ---- reading -----------------------------------------------------------------------------------------
    def read_bounded(self, name: str, limit: int) -> bytes:
        """Read a member fully, refusing more than ``limit`` bytes whatever its header says."""
        member = self._get(name)
        if member.size > limit:
            raise ArchiveError("archive member larger than allowed", path=name,
                               expected=f"<= {limit} bytes", found=member.size)
        return b"".join(self.iter_bounded(name, limit))

    def iter_bounded(self, name: str, limit: int) -> Iterator[bytes]:
        member = self._get(name)
        total = 0
        try:
            with self._zip.open(member.info) as fh:
                while chunk := fh.read(_CHUNK):
                    total += len(chunk)
                    if total > limit:
                        raise ArchiveError("archive member longer than its allowed length",
                                           path=name, expected=f"<= {limit} bytes", found=f"> {limit}")
                    yield chunk
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise ArchiveError(f"corrupt archive member: {exc}", path=name) from exc

    def _get(self, name: str) -> Member:
        try:
            return self.members[name]
        except KeyError:
            raise ArchiveError("archive member not found", path=name) from None

    def names(self, prefix: str = "") -> list[str]:
        return sorted(n for n in self.members if n.startswith(prefix))


def write_archive(path: Path, entries: Mapping[str, bytes]) -> None:
    """Write a deterministic zip: sorted names, fixed dates and modes, deflate for compressible files."""
    for name in entries:
        check_member_name(name)
    with zipfile.ZipFile(path, "w") as zf:
        for name in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=_FIXED_DATE)
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            info.create_system = 3
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, entries[name], compresslevel=6)
