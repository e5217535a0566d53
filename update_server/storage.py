"""Where bundle bytes live, behind a small interface so an object store can be added later.

Keys are relative, slash-separated paths (``targets/digits/1.0.0/model.onnx``,
``archives/digits/1.0.0.edgepack``). :class:`LocalStorage` keeps them under one directory and writes
atomically (temp file + rename), so a reader never sees half a file.

Uploads are received and verified in the store's staging area (:meth:`BlobStorage.staging_area`), outside
any database transaction; :meth:`BlobStorage.move_in` then puts the verified files in place, for the local
store with a rename (no copy while the upload holds the repository lock).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol

from update_server.errors import BadRequest


def check_key(key: str) -> str:
    parts = PurePosixPath(key).parts
    if not key or key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
        raise BadRequest("unsafe storage key", detail={"key": key})
    return key


class BlobStorage(Protocol):
    """What the server needs from a store of immutable blobs."""

    def put_file(self, key: str, source: Path) -> None: ...
    def move_in(self, key: str, source: Path) -> None:
        """Put ``source`` (a file in the staging area) at ``key``; ``source`` is gone afterwards."""
    def staging_area(self) -> Path:
        """A private local directory where uploads are received and verified before :meth:`move_in`."""
    def open(self, key: str) -> BinaryIO: ...
    def size(self, key: str) -> int | None:
        """Size in bytes, or None when absent."""
    def delete_prefix(self, prefix: str) -> None: ...
    def local_path(self, key: str) -> Path | None:
        """A filesystem path for zero-copy serving, when the backend has one."""


STAGING_MAX_AGE_S = 24 * 3600
"""Staged uploads older than this are left-overs of a crash and removed when the store is opened."""


class LocalStorage:
    """Blobs as files under ``root``; uploads staged in ``root/.staging`` (same file system: moves are renames)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._staging = root / ".staging"  # keys start with archives/ or targets/, never with this
        self._staging.mkdir(exist_ok=True)
        self._prune_staging(time.time())

    def _prune_staging(self, now: float) -> None:
        for entry in self._staging.iterdir():
            try:
                if now - entry.lstat().st_mtime > STAGING_MAX_AGE_S:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            except OSError:
                pass  # another replica removed it first

    def staging_area(self) -> Path:
        return self._staging

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put_file(self, key: str, source: Path) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
        os.close(fd)
        try:
            shutil.copyfile(source, tmp)
            os.replace(tmp, dest)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def move_in(self, key: str, source: Path) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(source, dest)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            self.put_file(key, source)  # another file system after all: copy (atomically), then drop the source
            os.unlink(source)

    def open(self, key: str) -> BinaryIO:
        return open(self._path(key), "rb")

    def size(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return None

    def delete_prefix(self, prefix: str) -> None:
        target = self._path(prefix.rstrip("/"))
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()

    def local_path(self, key: str) -> Path | None:
        path = self._path(key)
        return path if path.is_file() else None


def make_storage(kind: str, data_dir: Path) -> BlobStorage:
    if kind == "local":
        return LocalStorage(data_dir / "blobs")
    raise ValueError(f"unknown storage backend {kind!r}; supported: local")
