"""HTTP as an injectable dependency, and the overall deadline every download runs under.

:class:`Transport` is the seam: the agent, the TUF fetcher and the resumable downloader all go through it,
so tests and the fleet simulator can pass their own (httpx's ``Client(transport=...)`` is the model).
:class:`Urllib3Transport` is the real one. urllib3 errors are translated here, once, into
:class:`~device_agent.errors.TransportError`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Protocol

from device_agent.clock import Clock
from device_agent.errors import DeadlineError, TransportError


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: dict[str, str]
    """Header names lower-cased."""
    body: bytes


@dataclass
class StreamResponse:
    status: int
    headers: dict[str, str]
    chunks: Iterator[bytes]


class Transport(Protocol):
    def request(self, method: str, url: str, *, headers: Mapping[str, str] | None = None,
                body: bytes | None = None, timeout: float = 15.0) -> HttpResponse: ...

    def stream(self, url: str, *, headers: Mapping[str, str] | None = None, timeout: float = 30.0,
               chunk_bytes: int = 256 * 1024) -> AbstractContextManager[StreamResponse]:
        """A context manager yielding the response with a chunk iterator."""
        ...


class Deadline:
    """An overall deadline on a monotonic clock. ``None`` seconds means no deadline."""

    def __init__(self, clock: Clock, seconds: float | None, what: str = "download") -> None:
        self.clock = clock
        self.what = what
        self.seconds = seconds
        self.at = None if seconds is None else clock.monotonic() + seconds

    def remaining(self) -> float:
        return float("inf") if self.at is None else self.at - self.clock.monotonic()

    def check(self) -> None:
        if self.remaining() <= 0:
            raise DeadlineError(f"{self.what} did not finish within its overall deadline of {self.seconds:.0f} s "
                                "(slow retrieval?); it will be resumed after a backoff",
                                code="slow_retrieval", detail={"deadline_s": self.seconds})


class Urllib3Transport:
    """The real transport: one urllib3 pool, no automatic retries (the agent's loop retries with backoff).

    ``ca_file`` pins HTTPS to the certificates that CA signed (host names checked); without it the system's
    CAs are used. A certificate that does not verify is a :class:`TransportError` with code ``tls``."""

    def __init__(self, user_agent: str = "edgepack-agent", *, ca_file: str | None = None,
                 maxsize: int = 1) -> None:
        import urllib3

        self._urllib3 = urllib3
        self.ca_file = ca_file
        if ca_file:
            self.pool = urllib3.PoolManager(retries=False, headers={"User-Agent": user_agent}, maxsize=maxsize,
                                            cert_reqs="CERT_REQUIRED", ca_certs=ca_file)
        else:
            self.pool = urllib3.PoolManager(retries=False, headers={"User-Agent": user_agent}, maxsize=maxsize)

    def _error(self, what: str, exc: Exception) -> TransportError:
        if isinstance(exc, self._urllib3.exceptions.SSLError) or "CERTIFICATE_VERIFY_FAILED" in str(exc):
            pinned = f"the CA pinned in {self.ca_file}" if self.ca_file else "the system's CAs"
            return TransportError(f"{what}: the server's TLS certificate does not verify against {pinned}: {exc}",
                                  code="tls")
        return TransportError(f"{what} failed: {exc}", code="network")

    def request(self, method: str, url: str, *, headers: Mapping[str, str] | None = None,
                body: bytes | None = None, timeout: float = 15.0) -> HttpResponse:
        try:
            r = self.pool.request(method, url, headers=dict(headers or {}), body=body,
                                  timeout=self._urllib3.Timeout(connect=timeout, read=timeout))
        except self._urllib3.exceptions.HTTPError as exc:
            raise self._error(f"{method} {url}", exc) from exc
        return HttpResponse(r.status, {k.lower(): v for k, v in r.headers.items()}, r.data)

    @contextmanager
    def stream(self, url: str, *, headers: Mapping[str, str] | None = None, timeout: float = 30.0,
               chunk_bytes: int = 256 * 1024) -> Iterator[StreamResponse]:
        urllib3 = self._urllib3
        try:
            r = self.pool.request("GET", url, headers=dict(headers or {}), preload_content=False,
                                  timeout=urllib3.Timeout(connect=timeout, read=timeout))
        except urllib3.exceptions.HTTPError as exc:
            raise self._error(f"GET {url}", exc) from exc

        done = False

        def chunks() -> Iterator[bytes]:
            nonlocal done
            # read1 returns whatever has arrived (at least one byte), so a drip-feeding server cannot hold
            # the caller inside one read past its deadline: the caller checks the deadline between chunks.
            try:
                while True:
                    data = r.read1(chunk_bytes)
                    if not data:
                        done = True
                        return
                    yield data
            except urllib3.exceptions.HTTPError as exc:
                raise TransportError(f"GET {url} broke off: {exc}", code="network") from exc

        try:
            yield StreamResponse(r.status, {k.lower(): v for k, v in r.headers.items()}, chunks())
        finally:
            if done:
                r.release_conn()
            else:  # body not read to the end: this connection cannot serve another request
                r.close()
