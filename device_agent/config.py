"""The agent's configuration: one TOML file, read once into a frozen :class:`AgentConfig`.

Nothing else in the agent reads files or the environment for settings; the config object is passed down.
Every limit carries its unit in its name. Relative paths are relative to ``state_dir``.

Minimal file::

    device_id = "kiosk-0042"
    hardware_id = "x86-kiosk"
    state_dir = "/var/lib/edgepack-agent"

    [server]
    url = "http://updates.example:8080"

    [trust]
    image_root = "/etc/edgepack/root.json"
    director_root = "/etc/edgepack/director-root.json"

See docs/agent.md for every key and its default.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from device_agent.errors import ConfigError

try:  # Python 3.11+
    import tomllib
except ImportError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class ServerConfig:
    url: str
    credential: str | None = None
    """The device credential inline; normally left out and read from ``credential_file``."""
    credential_file: str = "credential"
    poll_interval_s: float = 60.0
    request_timeout_s: float = 15.0
    ca_file: str | None = None
    """PEM CA certificate(s) pinned for HTTPS (the server, the TUF repository, downloads): only certificates
    it signed are accepted. Unset: the system's CAs."""
    allow_plain: bool = False
    """Allow ``http://`` to a host that is not loopback (testing only: the credential travels in clear)."""


@dataclass(frozen=True)
class TrustConfig:
    image_root: str
    director_root: str


@dataclass(frozen=True)
class MqttConfig:
    url: str | None = None
    """Broker URL; by default the one the server gave at enrollment."""
    username: str | None = None
    """Broker account; by default the one the server gave at enrollment."""
    password: str | None = None
    """Inline password; normally left out and read from ``password_file`` (written at enrollment)."""
    password_file: str = "mqtt-password"
    client_id: str | None = None
    """MQTT client id; by default the enrollment's (the broker binds the account to it), else
    ``edgepack-dev-<device_id>``."""
    ca_file: str | None = None
    """PEM CA pinned for ``mqtts://``; unset: [server] ca_file, else the system's CAs."""
    allow_plain: bool = False
    """Allow ``mqtt://`` to a broker that is not on loopback (testing only)."""
    keepalive_s: int = 30
    protocol: str = "5"
    """MQTT protocol version: "5" (default), or "3.1.1" for brokers without MQTT 5 (e.g. amqtt)."""
    publish_timeout_s: float = 30.0
    """A message the broker has not acknowledged (PUBACK) is re-sent after this long (same message id and seq)."""
    resend_s: float = 300.0
    """A message that a check-in answer (``telemetry.committed_seq``) received at least this long after it was
    sent does not cover is sent again, same message id and seq: the broker lost it (restarted without
    persistence, or its ``max_queued_messages`` was reached). Without answers (server unreachable) nothing is
    re-sent. Keep it above the check-in interval, or committed messages are sent twice (harmless: the server
    stores each once)."""


@dataclass(frozen=True)
class ApiConfig:
    listen: str = "127.0.0.1:8711"
    """``HOST:PORT`` on loopback, or ``unix:/path/to/socket``."""
    max_request_bytes: int = 8 * 1024 * 1024
    prediction_timeout_s: float = 30.0
    feedback_memory: int = 10_000
    """How many recent prediction ids are remembered for feedback."""
    metrics: bool = False
    """Serve Prometheus metrics at ``GET /metrics`` on this API, to loopback and Unix-socket clients only
    (device_agent/metrics.py; needs prometheus-client)."""


@dataclass(frozen=True)
class LimitsConfig:
    download_deadline_s: float = 900.0
    """Overall deadline of one download attempt (all files), whatever the speed."""
    socket_timeout_s: float = 30.0
    """Connect timeout and longest silence between two received bytes."""
    max_metadata_bytes: int = 5_000_000
    max_bundle_bytes: int = 2_000_000_000
    download_attempts: int = 3
    """Corrupt downloads tolerated per file before the update is refused."""
    backoff_initial_s: float = 2.0
    backoff_max_s: float = 300.0
    outbox_max_messages: int = 10_000
    outbox_max_bytes: int = 64 * 1024 * 1024
    disk_reserve_bytes: int = 4 * 1024 * 1024
    """Kept free on the state directory's file system (state file, outbox, metadata): a bundle that does not
    fit next to it is not downloaded (``install_failed``, reason ``disk_full``) until space returns."""
    download_stalled_after: int = 3
    """Failed download attempts of one bundle (deadline, network, server errors) before ``install_failed``
    (reason ``download_stalled``) is reported; the agent keeps retrying with exponential backoff."""
    boot_loop_limit: int = 3
    """Agent boots tolerated in one state of one update (verifying, activating, ...) before the update is
    abandoned as a boot loop (the trial has its own limit, ``trial.max_restarts``)."""
    clock_tolerance_s: float = 300.0
    """How far the device clock may be behind the newest signed time the agent accepted (server skew)."""


@dataclass(frozen=True)
class TrialConfig:
    period_s: float = 300.0
    """How long a newly activated bundle must serve without a crash before it is committed."""
    max_crashes: int = 0
    """Worker crashes tolerated during the trial (0: the first one rolls back)."""
    health_interval_s: float = 5.0
    max_restarts: int = 3
    """Agent restarts (power loss) tolerated during one trial before rolling back."""


@dataclass(frozen=True)
class TelemetryConfig:
    window_s: float = 60.0
    max_input_dims: int = 128
    """Inputs with more features are summarised as one scalar (mean/std over all values)."""


@dataclass(frozen=True)
class WorkerConfig:
    threads: int = 1
    start_timeout_s: float = 60.0
    restart_backoff_max_s: float = 30.0
    memory_limit_mb: int = 0
    """Address-space limit of the worker (RLIMIT_AS); 0 means none."""


@dataclass(frozen=True)
class DebugConfig:
    step_delay_s: float = 0.0
    """Pause after each persisted step and downloaded chunk: lets fault-injection tests hit every state."""
    download_chunk_bytes: int = 256 * 1024


@dataclass(frozen=True)
class AgentConfig:
    device_id: str
    hardware_id: str
    state_dir: Path
    server: ServerConfig
    trust: TrustConfig
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    trial: TrialConfig = field(default_factory=TrialConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    source: str = "<dict>"

    def path(self, value: str) -> Path:
        """Resolve a configured path: absolute as is, relative to the state directory otherwise."""
        p = Path(value)
        return p if p.is_absolute() else self.state_dir / p

    def with_overrides(self, **changes: Any) -> AgentConfig:
        return replace(self, **changes)


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_plain(url: str, *, allow: bool, where: str) -> bool:
    """Refuse ``http://``/``mqtt://`` to a host that is not loopback unless allowed; returns whether ``url``
    is plain (the caller warns)."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "mqtt"):
        return False
    host = parsed.hostname or ""
    if not is_loopback(host) and not allow:
        secure = "https" if parsed.scheme == "http" else "mqtts"
        raise ConfigError(f"{where}: refusing plain {parsed.scheme}:// to {host} (not loopback): use {secure}:// "
                          "with a pinned ca_file, or set allow_plain = true in that section (testing only)",
                          detail={"found": url})
    return True


def _section(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"[{where}] must be a table", detail={"found": type(raw).__name__})
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"[{where}] has unknown key(s) {unknown}; known: {sorted(known)}")
    values: dict[str, Any] = {}
    for name, value in raw.items():
        default = known[name].default
        expected = type(default) if default is not None and default is not MISSING else None
        if expected is None and isinstance(value, (bool, int, float)):
            raise ConfigError(f"[{where}] {name} must be a string", detail={"found": value})
        if expected in (int, float) and isinstance(value, bool):
            raise ConfigError(f"[{where}] {name} must be a number", detail={"found": value})
        if expected is bool and not isinstance(value, bool):
            raise ConfigError(f"[{where}] {name} must be true or false", detail={"found": repr(value)[:80]})
        if expected is float and isinstance(value, int):
            value = float(value)
        if expected in (int, float, str) and not isinstance(value, expected):
            raise ConfigError(f"[{where}] {name} must be {expected.__name__}",
                              detail={"found": repr(value)[:80]})
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise ConfigError(f"[{where}] {name} must not be negative", detail={"found": value})
        values[name] = value
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"[{where}] is incomplete: {exc}") from exc


def config_from_dict(doc: Mapping[str, Any], *, source: str = "<dict>") -> AgentConfig:
    """Validate a parsed TOML document. Raises :class:`ConfigError` saying which key is wrong."""
    top = {"device_id", "hardware_id", "state_dir", "server", "trust", "mqtt", "api", "limits", "trial",
           "telemetry", "worker", "debug"}
    unknown = sorted(set(doc) - top)
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s) {unknown}; known: {sorted(top)}")
    for key in ("device_id", "hardware_id", "state_dir"):
        if not isinstance(doc.get(key), str) or not doc[key]:
            raise ConfigError(f"{source}: `{key}` is required (a string)")
    if not DEVICE_ID.match(doc["device_id"]):
        raise ConfigError(f"{source}: device_id must match {DEVICE_ID.pattern}", detail={"found": doc["device_id"]})
    for key in ("server", "trust"):
        if key not in doc:
            raise ConfigError(f"{source}: the [{key}] table is required")
    server = _section(ServerConfig, doc["server"], "server")
    if not server.url.startswith(("http://", "https://")):
        raise ConfigError("[server] url must start with http:// or https://", detail={"found": server.url})
    check_plain(server.url, allow=server.allow_plain, where="[server] url")
    api = _section(ApiConfig, doc.get("api"), "api")
    if not api.listen.startswith("unix:"):
        host, _, port = api.listen.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError("[api] listen must be HOST:PORT or unix:/path", detail={"found": api.listen})
    mqtt = _section(MqttConfig, doc.get("mqtt"), "mqtt")
    if mqtt.url is not None and not mqtt.url.startswith(("mqtt://", "mqtts://")):
        raise ConfigError("[mqtt] url must start with mqtt:// or mqtts://", detail={"found": mqtt.url})
    if mqtt.url is not None:
        check_plain(mqtt.url, allow=mqtt.allow_plain, where="[mqtt] url")
    if mqtt.protocol not in ("5", "3.1.1"):
        raise ConfigError('[mqtt] protocol must be "5" or "3.1.1"', detail={"found": mqtt.protocol})
    return AgentConfig(
        device_id=doc["device_id"], hardware_id=doc["hardware_id"], state_dir=Path(doc["state_dir"]),
        server=server, trust=_section(TrustConfig, doc["trust"], "trust"),
        mqtt=mqtt, api=api,
        limits=_section(LimitsConfig, doc.get("limits"), "limits"),
        trial=_section(TrialConfig, doc.get("trial"), "trial"),
        telemetry=_section(TelemetryConfig, doc.get("telemetry"), "telemetry"),
        worker=_section(WorkerConfig, doc.get("worker"), "worker"),
        debug=_section(DebugConfig, doc.get("debug"), "debug"),
        source=source,
    )


def load_config(path: Path) -> AgentConfig:
    """Read and validate the TOML file at ``path``."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the configuration file {path}: {exc.strerror}") from exc
    try:
        doc = tomllib.loads(data.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    return config_from_dict(doc, source=str(path))
