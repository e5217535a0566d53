"""The update steps that talk to repositories and check signatures, with foreign errors translated once.

* :class:`ImageRepository`: the image repository through python-tuf's updater (our deadline fetcher),
  feeding the offline-signed targets and their release-counter floors into a persisted
  :class:`bundles.trust.TrustStore`, which remembers the highest floor ever seen.
* :func:`check_assignment` + :func:`accept_assignment`: Uptane full verification: the director's signed
  assignment for this
  device must agree with the image repository on every file, and clear the floor.
* :func:`choose_variant`: the bundle's preferred variant for this device's profile among installed runtimes.
* :func:`translate`: bundle-library, python-tuf and disk errors -> agent errors (refusal vs. retry).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Root, TargetFile, Targets

from bundles.director import Assignment, match_image, verify_assignment
from bundles.errors import BundleError, UnsupportedError, VerificationError
from bundles.manifest import Manifest, Variant
from bundles.trust import TrustStore
from device_agent.clock import Clock
from device_agent.errors import (
    AgentError,
    DeadlineError,
    InstallFailed,
    StorageError,
    TransportError,
    UpdateRefused,
)
from device_agent.fetcher import DeadlineFetcher, open_updater
from device_agent.store import FileInfo
from device_agent.transport import Deadline, Transport


def translate(exc: BaseException, what: str) -> AgentError:
    """Map a foreign error to the agent's tree: what is a refusal, what deserves a retry."""
    if isinstance(exc, AgentError):
        return exc
    if isinstance(exc, tuf_exc.SlowRetrievalError):
        return DeadlineError(f"{what}: {exc}", code="slow_retrieval")
    if isinstance(exc, OSError) and StorageError.matches(exc):  # a write to the state directory, not the network
        return StorageError.from_os(exc, what)
    if isinstance(exc, tuf_exc.DownloadHTTPError):
        return TransportError(f"{what}: HTTP {exc.status_code}", code=f"http_{exc.status_code}")
    if isinstance(exc, (tuf_exc.DownloadError, OSError)):
        return TransportError(f"{what}: {exc}", code="network")
    if isinstance(exc, tuf_exc.RepositoryError):
        return UpdateRefused(f"{what}: image repository metadata refused: {exc}", code=type(exc).__name__)
    if isinstance(exc, UnsupportedError):
        return InstallFailed(f"{what}: {exc}", code=type(exc).__name__, detail=_fields(exc))
    if isinstance(exc, BundleError):
        return UpdateRefused(f"{what}: {exc}", code=type(exc).__name__, detail=_fields(exc))
    return AgentError(f"{what}: unexpected {type(exc).__name__}: {exc}", code=type(exc).__name__)


def _fields(exc: BundleError) -> dict[str, Any]:
    return {k: str(v) for k, v in (("file", exc.path), ("expected", exc.expected), ("found", exc.found))
            if v is not None}


@contextmanager
def translated(what: str) -> Iterator[None]:
    try:
        yield
    except AgentError:
        raise
    except (BundleError, tuf_exc.RepositoryError, tuf_exc.DownloadError, OSError) as exc:
        raise translate(exc, what) from exc


class ImageRepository:
    """The image repository (offline-signed targets) as this device trusts it."""

    def __init__(self, metadata_dir: Path, trust_dir: Path, url: str, pinned_root: Path, transport: Transport,
                 clock: Clock, *, socket_timeout_s: float = 30.0, deadline_s: float = 300.0,
                 max_metadata_bytes: int = 5_000_000, headers: dict[str, str] | None = None,
                 progress: Callable[[], None] | None = None) -> None:
        self.metadata_dir = metadata_dir
        self.url = url if url.endswith("/") else url + "/"
        self.pinned_root = pinned_root
        self.clock = clock
        self.deadline_s = deadline_s
        self.max_metadata_bytes = max_metadata_bytes
        self.fetcher = DeadlineFetcher(transport, clock, socket_timeout_s=socket_timeout_s, headers=headers,
                                       progress=progress)
        with translated("trusted image root"):
            self.trust = TrustStore.open(trust_dir, initial_root=pinned_root)

    @property
    def targets_url(self) -> str:
        return self.url + "targets/"

    @property
    def consistent_snapshot(self) -> bool:
        return bool(self.trust.root.signed.consistent_snapshot)

    def _bootstrap(self) -> bytes:
        """Newest root python-tuf already verified and kept (root_history/N.root.json), else the pinned root.

        python-tuf replaces its ``root.json`` symlink by delete + create; a power loss in between must not
        leave the device without a trusted root."""
        history = sorted(self.metadata_dir.glob("root_history/*.root.json"),
                         key=lambda p: int(p.name.split(".")[0]) if p.name.split(".")[0].isdigit() else -1)
        if history:
            return history[-1].read_bytes()
        return self.pinned_root.read_bytes()

    def refresh(self) -> Targets:
        """Refresh timestamp -> snapshot -> targets under the deadline; merge floors; persist trust."""
        with translated("image repository"):
            self.fetcher.deadline = Deadline(self.clock, self.deadline_s, "image metadata refresh")
            updater = open_updater(self.metadata_dir, self.url, self.fetcher, bootstrap=self._bootstrap(),
                                   max_metadata_bytes=self.max_metadata_bytes, clock=self.clock)
            updater.refresh()
            root = Metadata[Root].from_bytes((self.metadata_dir / "root.json").read_bytes())
            self.trust.root = root
            md = self.trust.update_targets((self.metadata_dir / "targets.json").read_bytes(), self.clock.now())
            self.trust.save()
            return md.signed

    @property
    def targets(self) -> Targets:
        if self.trust.targets is None:
            raise UpdateRefused("no image-repository targets trusted yet", code="no_targets")
        return self.trust.targets.signed


@dataclass(frozen=True)
class Accepted:
    assignment: Assignment
    files: dict[str, FileInfo]
    """Bundle-relative path -> signed length and sha256."""


def check_assignment(director_root: Root, data: bytes, *, device_id: str, hardware_id: str, now: Any,
                     last_version: int) -> Assignment:
    """The director's part: signature threshold, expiry, this device and hardware, no replay."""
    with translated("assignment"):
        return verify_assignment(director_root, data, device_id=device_id, hardware_id=hardware_id, now=now,
                                 last_version=last_version)


def accept_assignment(assignment: Assignment, image: ImageRepository, *, refresh: bool = True) -> Accepted:
    """Uptane full verification: every assigned file is signed offline with identical length, hashes and
    match fields, and the release counter is not below the highest floor ever seen."""
    if assignment.bundle is None:
        return Accepted(assignment, {})
    name, version = str(assignment.bundle["name"]), str(assignment.bundle["version"])
    if refresh:
        image.refresh()
    with translated(f"{name} {version}"):
        match_image(assignment, image.targets)
        rc = int(assignment.bundle.get("release_counter", -1))
        image.trust.check_release_counter(name, rc, f"{name}/{version}")
        prefix = f"{name}/{version}/"
        files: dict[str, FileInfo] = {}
        for path, target in assignment.files.items():
            if not path.startswith(prefix):
                raise VerificationError("assignment lists a file outside its bundle", path=path, expected=prefix)
            if int(target.custom.get("release_counter", -1)) != rc:
                raise VerificationError("assignment's release counter disagrees with the signed file", path=path,
                                        expected=rc, found=target.custom.get("release_counter"))
            files[path[len(prefix):]] = FileInfo(target.length, str(target.hashes.get("sha256", "")))
        if not files or any(not f.sha256 for f in files.values()):
            raise VerificationError("assignment lists no files, or a file without a sha256", path=prefix)
    return Accepted(assignment, files)


def target_file(name: str, version: str, rel: str, info: FileInfo) -> TargetFile:
    return TargetFile(info.length, {"sha256": info.sha256}, f"{name}/{version}/{rel}")


def installed_runtimes() -> dict[str, str]:
    """Runtime family -> "package version", found without importing the runtimes (cheap for the agent).

    Mirrors ``bundles.runtime.available_runtimes``, which imports numpy; the supervisor process does not.
    """
    from importlib import metadata

    found: dict[str, str] = {}
    for family, packages in (("onnxruntime", ("onnxruntime",)), ("litert", ("ai-edge-litert", "tflite-runtime"))):
        for pkg in packages:
            if importlib.util.find_spec(pkg.replace("-", "_")) is None:
                continue
            try:
                found[family] = f"{pkg} {metadata.version(pkg)}"
            except metadata.PackageNotFoundError:
                found[family] = f"{pkg} (version unknown)"
            break
    return found


def choose_variant(manifest: Manifest, hardware_id: str, installed: dict[str, str]) -> tuple[Variant, str]:
    """The first variant of this profile's preference order whose runtime is installed, and why."""
    order = manifest.profiles.get(hardware_id)
    origin = f"profile {hardware_id!r} prefers {list(order)}" if order else (
        f"the bundle has no profile {hardware_id!r}; using the manifest's variant order")
    candidates = list(order) if order else [v.id for v in manifest.variants]
    skipped: list[str] = []
    for vid in candidates:
        variant = manifest.variant(vid)
        if variant.runtime in installed:
            why = f"{origin}; picked {vid} ({variant.runtime}: {installed[variant.runtime]} installed)"
            if skipped:
                why += "; skipped " + ", ".join(skipped)
            return variant, why
        skipped.append(f"{vid} (runtime {variant.runtime} not installed)")
    raise InstallFailed(f"no variant of {manifest.name} {manifest.version} can run here: {origin}; "
                        f"installed runtimes: {installed or 'none'}; install one of "
                        f"{sorted({manifest.variant(v).runtime for v in candidates})}", code="no_runtime",
                        detail={"profile": hardware_id, "installed": sorted(installed)})
