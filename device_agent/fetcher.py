"""Fetching under an overall deadline: python-tuf's metadata fetcher, and resumable target downloads.

* :class:`DeadlineFetcher` implements python-tuf's ``FetcherInterface`` over our :class:`Transport`, with
  the deadline python-tuf lacks (its ``Urllib3Fetcher`` only has a gap timeout, so a drip-feeding server
  can hold a client forever: TUF's removed "slow retrieval" attack).
* :func:`download_target` fetches one signed target into ``<dest>.part`` with HTTP ``Range`` resumption,
  never accepts more than the signed length, checks length and every signed hash at the end, and only then
  renames the file into place. The agent and the TUF conformance CLI both use it.
* :func:`open_updater` builds python-tuf's ``Updater`` with that fetcher.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import TargetFile
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from bundles.errors import DigestMismatchError
from device_agent.clock import Clock
from device_agent.errors import TransportError
from device_agent.transport import Deadline, Transport

log = logging.getLogger(__name__)
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class DeadlineFetcher(FetcherInterface):
    """python-tuf fetcher with an overall deadline (set :attr:`deadline` before each refresh)."""

    def __init__(self, transport: Transport, clock: Clock, *, socket_timeout_s: float = 30.0,
                 chunk_bytes: int = 64 * 1024, headers: dict[str, str] | None = None,
                 progress: Callable[[], None] | None = None) -> None:
        self.transport = transport
        self.clock = clock
        self.socket_timeout_s = socket_timeout_s
        self.chunk_bytes = chunk_bytes
        self.headers = dict(headers or {})
        self.deadline = Deadline(clock, None)
        self.progress = progress
        """Called for each chunk received (the agent's watchdog heartbeat)."""

    def _fetch(self, url: str) -> Iterator[bytes]:
        return self._chunks(url)

    def _chunks(self, url: str) -> Iterator[bytes]:
        if self.deadline.remaining() <= 0:
            raise tuf_exc.SlowRetrievalError(f"deadline passed before fetching {url}")
        timeout = max(0.1, min(self.socket_timeout_s, self.deadline.remaining()))
        try:
            with self.transport.stream(url, headers=self.headers, timeout=timeout,
                                       chunk_bytes=self.chunk_bytes) as resp:
                if resp.status >= 400:
                    raise tuf_exc.DownloadHTTPError(f"HTTP {resp.status} for {url}", resp.status)
                for chunk in resp.chunks:
                    yield chunk
                    if self.progress is not None:
                        self.progress()
                    if self.deadline.remaining() <= 0:
                        raise tuf_exc.SlowRetrievalError(
                            f"{url}: overall deadline of {self.deadline.seconds} s passed")
        except TransportError as exc:
            raise tuf_exc.DownloadError(str(exc)) from exc


def open_updater(metadata_dir: Path, metadata_url: str, fetcher: FetcherInterface, *,
                 bootstrap: bytes | None, target_dir: Path | None = None, target_url: str | None = None,
                 prefix_targets_with_hash: bool = True, max_metadata_bytes: int = 5_000_000,
                 clock: Clock | None = None) -> Updater:
    """python-tuf's updater over ``fetcher``. ``bootstrap=None`` trusts the cached ``root.json``."""
    config = UpdaterConfig(prefix_targets_with_hash=prefix_targets_with_hash,
                           snapshot_max_length=max_metadata_bytes, targets_max_length=max_metadata_bytes)
    updater = Updater(str(metadata_dir), metadata_url, str(target_dir) if target_dir else None, target_url,
                      fetcher=fetcher, config=config, bootstrap=bootstrap)
    if clock is not None:
        # Expiry is checked against one reference time per refresh (TUF 5.1). python-tuf takes it from the
        # system clock; an injected clock (fleet simulation) sets it, as the conformance client does.
        updater._trusted_set.reference_time = clock.now()
    return updater


def target_url(base_url: str, target: TargetFile, *, hash_prefix: bool) -> str:
    """URL of a target; with consistent snapshots the basename is prefixed with a hash (TUF 5.7.3).

    The hash is the first one the metadata lists, as python-tuf's ``Updater.download_target`` picks it (a
    repository with consistent snapshots stores each target under every listed hash)."""
    path = target.path
    if hash_prefix:
        dirname, sep, basename = path.rpartition("/")
        digest = next(iter(target.hashes.values()))
        path = f"{dirname}{sep}{digest}.{basename}"
    return base_url.rstrip("/") + "/" + path


def _verify_file(path: Path, target: TargetFile) -> None:
    with open(path, "rb") as fh:
        try:
            target.verify_length_and_hashes(fh)
        except tuf_exc.LengthOrHashMismatchError as exc:
            raise DigestMismatchError(f"downloaded file does not match its signed length and hashes: {exc}",
                                      path=target.path) from exc


def cached(dest: Path, target: TargetFile) -> bool:
    """True when ``dest`` already holds exactly the signed target (no need to download again)."""
    try:
        _verify_file(dest, target)
        return True
    except (OSError, DigestMismatchError):
        return False


def download_target(
    transport: Transport,
    url: str,
    dest: Path,
    target: TargetFile,
    deadline: Deadline,
    *,
    socket_timeout_s: float = 30.0,
    chunk_bytes: int = 256 * 1024,
    headers: dict[str, str] | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> Path:
    """Download ``target`` to ``dest`` through ``dest.part``, resuming what an earlier attempt left.

    Raises:
        DigestMismatchError: the server sent more than the signed length, or the finished file does not
            match the signed length and hashes (the ``.part`` file is deleted).
        DeadlineError: the overall deadline passed (the ``.part`` file is kept for the next attempt).
        TransportError: network failure or an HTTP error status (the ``.part`` file is kept).
    """
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    if have > target.length:
        part.unlink()
        have = 0
    if have < target.length or target.length == 0:
        _fetch_into(transport, url, part, have, target, deadline, socket_timeout_s, chunk_bytes,
                    dict(headers or {}), on_chunk)
    try:
        _verify_file(part, target)
    except DigestMismatchError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    return dest


def _fetch_into(transport: Transport, url: str, part: Path, have: int, target: TargetFile, deadline: Deadline,
                socket_timeout_s: float, chunk_bytes: int, headers: dict[str, str],
                on_chunk: Callable[[int], None] | None) -> None:
    deadline.check()
    if have:
        headers["Range"] = f"bytes={have}-"
    timeout = max(0.1, min(socket_timeout_s, deadline.remaining()))
    with transport.stream(url, headers=headers, timeout=timeout, chunk_bytes=chunk_bytes) as resp:
        if resp.status == 416 and have:
            part.unlink(missing_ok=True)  # our partial file is not a prefix the server knows: start over
            raise TransportError(f"server refused to resume {url} (416); restarting the file", code="http_416")
        if resp.status not in (200, 206):
            raise TransportError(f"HTTP {resp.status} downloading {url}", code=f"http_{resp.status}",
                                 detail={"url": url})
        if resp.status == 206:
            m = _CONTENT_RANGE.match(resp.headers.get("content-range", ""))
            if not m or int(m.group(1)) != have:
                part.unlink(missing_ok=True)
                raise TransportError(f"server answered a range request for {url} with another range",
                                     code="bad_range", detail={"content_range": resp.headers.get("content-range")})
            mode = "ab"
        else:
            mode, have = "wb", 0
        written = have
        with open(part, mode) as fh:
            for chunk in resp.chunks:
                written += len(chunk)
                if written > target.length:
                    fh.close()
                    part.unlink(missing_ok=True)
                    raise DigestMismatchError("server sent more than the signed length", path=target.path,
                                              expected=f"{target.length} bytes", found=f"> {target.length}")
                fh.write(chunk)
                if on_chunk is not None:
                    on_chunk(len(chunk))
                deadline.check()
            fh.flush()
            os.fsync(fh.fileno())
