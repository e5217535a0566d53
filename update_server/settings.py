"""Server settings: one object, built once in the app factory (or the CLI) and passed down.

Sources, highest priority first: keyword arguments, ``EDGEPACK_*`` environment variables, an optional env
file, an optional TOML file (``edgepack-server --config server.toml`` or ``EDGEPACK_CONFIG``). Nothing
else in the server reads the environment.
"""

from __future__ import annotations

import itertools
import os
import socket
from pathlib import Path
from typing import Any, Literal, cast

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

DEFAULT_PHASES = (1.0, 10.0, 50.0, 100.0)


class Settings(BaseSettings):
    """Every knob of the update server; docs/server.md lists them with their environment names."""

    # extra="forbid": a key of the settings file that is not a setting (a typo) is refused, never ignored.
    model_config = SettingsConfigDict(env_prefix="EDGEPACK_", extra="forbid", toml_file=None)

    # --- where things live
    data_dir: Path = Field(Path("edgepack-data"), description="bundle storage and the default SQLite file")
    database_url: str = Field("", description="SQLAlchemy URL; empty = sqlite:///<data_dir>/server.db")
    keys_dir: Path | None = Field(None, description="the online/ folder of a key directory (online keys only)")
    storage: str = Field("local", description="bundle storage backend (only 'local' so far)")
    auto_migrate: bool = Field(True, description="run Alembic migrations at start-up")

    # --- PostgreSQL fault handling (docs/runbook.md, "The database hangs")
    database_connect_timeout_s: float = Field(2.0, ge=2, description="a new connection gives up after this (libpq's "
                                              "minimum is 2 s)")
    database_statement_timeout_s: float = Field(30.0, ge=0, description="PostgreSQL cancels a statement of the "
                                                "server's that runs longer (0 = never); migrations are exempt")
    database_lock_timeout_s: float = Field(10.0, ge=0, description="PostgreSQL cancels a statement that waits "
                                           "longer for a lock (0 = never)")
    database_pool_timeout_s: float = Field(3.0, gt=0, description="a request waits this long for a free pooled "
                                           "connection, then gets 503")
    database_probe_interval_s: float = Field(1.0, gt=0, description="how often the server checks that PostgreSQL "
                                             "answers (SELECT 1 on a connection of its own)")
    database_probe_timeout_s: float = Field(1.5, gt=0, description="a probe unanswered this long marks the database "
                                            "down: requests get 503 at once until a probe succeeds again")

    # --- HTTP
    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str = Field("", description="URL devices use to reach this server; empty = http(s)://host:port")
    tls_cert: Path | None = Field(None, description="PEM certificate (chain) to serve HTTPS with; with tls_key")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert")
    allow_plain_http: bool = Field(False, description="serve plain HTTP on a non-loopback address (behind a "
                                                      "TLS-terminating proxy only)")
    max_upload_bytes: int = Field(1024 * 1024 * 1024, gt=0, description="largest bundle upload (bytes); a larger "
                                  "one is refused with 413 before it is read")
    max_request_bytes: int = Field(1024 * 1024, gt=0, description="largest body of any other request (bytes): "
                                   "admin JSON, dashboard forms")
    max_device_request_bytes: int = Field(64 * 1024, gt=0, description="largest enrollment or check-in body "
                                          "(bytes); enrollment needs no credential, so this stays small")
    workers: int = 1

    # --- devices and the director
    poll_interval_s: int = 60
    assignment_expiry_s: int = 24 * 3600
    enrollment_token_ttl_s: int = 7 * 24 * 3600

    # --- TUF image repository (online roles)
    timestamp_expiry_s: int = 24 * 3600
    snapshot_expiry_s: int = 7 * 24 * 3600
    repo_refresh_interval_s: float = 60.0

    # --- MQTT
    mqtt_url: str = Field("", description="broker the server subscribes to; empty disables telemetry")
    mqtt_public_url: str = Field("", description="broker URL handed to devices; empty = mqtt_url")
    mqtt_client_id: str = Field("", description="stable client id of this replica; empty = derived")
    mqtt_protocol: str = Field("5", description='"5", or "3.1.1" for brokers without MQTT 5 (amqtt): '
                                                 "then one ingesting replica, no shared subscription")
    mqtt_share_group: str = "edgepack-server"
    mqtt_ca_file: Path | None = Field(None, description="CA that signed the broker's certificate (mqtts://); "
                                                        "empty = the system's CAs")
    mqtt_username: str = Field("edgepack-ingest", description="the ingester's broker account")
    mqtt_password: str = Field("", description="its password; empty = connect without credentials")
    allow_plain_mqtt: bool = Field(False, description="mqtt:// or broker_auth=none with a non-loopback broker")

    # --- broker accounts (update_server/broker/)
    broker_auth: Literal["dynsec", "files", "none"] = Field(
        "none", description="how devices get broker accounts: dynsec (Mosquitto dynamic security), files "
                            "(password + ACL file), none (development on loopback)")
    broker_admin_username: str = Field("edgepack-server", description="the server's own broker account: "
                                       "dynamic-security administrator, publishes check-in notices")
    broker_admin_password: str = ""
    broker_account_prefix: str = Field("", description="prefix of every broker account and role this server "
                                                       "manages (several servers on one broker)")
    broker_admin_timeout_s: float = Field(10.0, description="how long enrollment and revocation wait for the "
                                                            "broker (to reconnect and to answer)")
    broker_files_dir: Path | None = Field(None, description="files backend: where passwd and acl are written")
    broker_reload_command: str = Field("", description="files backend: run after rewriting the files, e.g. "
                                                       "`systemctl reload mosquitto` (mosquitto rereads on SIGHUP)")
    mqtt_topic_prefix: str = "edgepack/v1/devices"
    max_message_bytes: int = 64 * 1024
    ingest_batch: int = 2000
    ingest_flush_s: float = 0.05
    ingest_queue: int = 200_000
    max_request_rate: float = Field(10_000.0, gt=0, description="requests per second one device can serve: a "
                                     "telemetry window claiming more for its duration is dropped (implausible_rate)")
    mqtt_session_expiry_s: int = Field(24 * 3600, ge=0, le=2**32 - 1, description="how long the broker keeps "
                                       "the ingester's session (and queues its telemetry) while it is away")
    ingest_stuck_s: float = Field(60.0, gt=0, description="/readyz fails when queued telemetry has not been "
                                  "committed for this long")
    broker_check: bool = Field(True, description="at start, probe the broker's session and queue settings and "
                                                 "log what to change (edgepack-server check-broker)")

    # --- rollouts
    default_phases: tuple[float, ...] = DEFAULT_PHASES
    default_min_soak_s: float = 3600.0
    default_min_devices: int = 5
    gate_interval_s: float = 1.0

    # --- metrics, dashboard, drift (docs/dashboard.md)
    metrics_enabled: bool = Field(True, description="/metrics and the HTTP metrics middleware")
    metrics_public: bool = Field(False, description="serve /metrics without an API token (private networks only)")
    gate_history_interval_s: float = Field(30.0, description="gate values are kept for the charts this often "
                                                                "(and at every change of a gate's status)")
    drift_threshold: float = Field(0.25, gt=0, description="input drift (PSI) that raises the fleet alert for a "
                                                             "version at 100 %")
    drift_window_s: float = Field(24 * 3600.0, gt=0, description="the drift alert looks at this recent window")
    drift_min_samples: int = Field(1000, ge=1, description="inputs a drift statistic needs before it counts")
    metrics_cache_s: float = Field(10.0, ge=0, description="fleet figures at /metrics are re-read from the database "
                                                            "at most this often")

    @field_validator("mqtt_protocol")
    @classmethod
    def _mqtt_protocol(cls, value: str) -> str:
        if value not in ("5", "3.1.1"):
            raise ValueError('mqtt_protocol must be "5" or "3.1.1"')
        return value

    @model_validator(mode="after")
    def _accounts(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together (edgepack tls init writes both)")
        return self

    def broker_admin_problems(self) -> list[str]:
        """What ``serve`` lacks to manage broker accounts (an ingest-only replica needs none of it)."""
        if not self.mqtt_url or self.broker_auth == "none":
            return []
        missing = [name for name, value in (("broker_admin_password", self.broker_admin_password),
                                            ("mqtt_password", self.mqtt_password)) if not value]
        if self.broker_auth == "files" and self.broker_files_dir is None:
            missing.append("broker_files_dir")
        return [f"broker_auth={self.broker_auth} needs {', '.join(missing)} (edgepack-server broker init writes "
                "them; see docs/server.md)"] if missing else []

    @field_validator("default_phases", mode="before")
    @classmethod
    def _phases(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(float(p) for p in value.replace("/", ",").split(",") if p.strip())
        return value

    @field_validator("default_phases")
    @classmethod
    def _phases_grow(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or any(b <= a for a, b in itertools.pairwise(value)) or value[-1] != 100 or value[0] <= 0:
            raise ValueError("phases must grow strictly, start above 0 and end at 100 (e.g. 1,10,50,100)")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings, dotenv_settings]
        if settings_cls.model_config.get("toml_file"):
            sources.append(TomlConfigSettingsSource(settings_cls))
        return tuple(sources)

    @classmethod
    def load(cls, config_file: Path | None = None, **overrides: Any) -> Settings:
        """Build settings from the environment plus an optional ``.toml`` or env file."""
        config_file = config_file or (Path(os.environ["EDGEPACK_CONFIG"]) if os.environ.get("EDGEPACK_CONFIG")
                                      else None)
        if config_file is None:
            return cls(**overrides)
        if not config_file.is_file():
            raise ValueError(f"config file {config_file} does not exist")
        try:
            if config_file.suffix == ".toml":
                file_cls = type("FileSettings", (cls,), {"model_config": {**cls.model_config,
                                                                            "toml_file": config_file}})
                return cast(Settings, file_cls(**overrides))
            _check_env_file(config_file)
            return cls(_env_file=config_file, **overrides)  # type: ignore[call-arg]
        except ValidationError as exc:
            raise ValueError(explain(exc, config_file)) from exc

    # --- derived values
    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'server.db').resolve()}"

    @property
    def effective_public_url(self) -> str:
        scheme = "https" if self.tls_cert else "http"
        return (self.public_url or f"{scheme}://{self.host}:{self.port}").rstrip("/")

    def transport_warnings(self, *, http: bool = True) -> list[str]:
        """Plain HTTP/MQTT or an open broker: refused (ValueError) off loopback unless allowed, else warnings."""
        from update_server.broker.endpoint import Endpoint, is_loopback

        warnings: list[str] = []
        if http and self.tls_cert is None:
            if not is_loopback(self.host) and not self.allow_plain_http:
                raise ValueError(f"refusing to serve plain HTTP on {self.host}: give tls_cert/tls_key (edgepack "
                                 "tls init), or set allow_plain_http=true behind a TLS-terminating proxy")
            warnings.append(f"serving plain HTTP on {self.host}:{self.port} (development only; give tls_cert/tls_key)")
        if self.mqtt_url:
            broker = Endpoint.from_url(self.mqtt_url)
            if not broker.tls:
                if not broker.loopback and not self.allow_plain_mqtt:
                    raise ValueError(f"refusing plain MQTT to {broker}: use mqtts:// with mqtt_ca_file, or set "
                                     "allow_plain_mqtt=true")
                warnings.append(f"plain MQTT to {broker} (development only; use mqtts://)")
            if self.broker_auth == "none":
                if not broker.loopback and not self.allow_plain_mqtt:
                    raise ValueError(f"refusing broker_auth=none with the broker at {broker}: anyone reaching it "
                                     "could forge telemetry; use broker_auth=dynsec (docs/server.md)")
                warnings.append("broker_auth=none: devices get no broker credentials (development only)")
        return warnings

    @property
    def mqtt_client_id_base(self) -> str:
        return self.mqtt_client_id or f"edgepack-server-{socket.gethostname()}-{self.port}"

    def ingest_client_ids(self) -> list[str]:
        """The ingester's client id of every worker: ``<base>`` with one worker, ``<base>-w<i>`` with several
        (each worker process claims slot ``i``, ``ingest.WorkerSlot``, so the ids are stable across restarts)."""
        base = self.mqtt_client_id_base
        return [base] if self.workers <= 1 else [f"{base}-w{i}" for i in range(self.workers)]

    @property
    def effective_mqtt_client_id(self) -> str:
        """Stable per replica so its persistent session survives restarts; with several worker processes
        each needs its own id (the broker would otherwise disconnect one for the other), so the pid is added."""
        base = self.mqtt_client_id_base
        return f"{base}-{os.getpid()}" if self.workers > 1 else base


def _known() -> str:
    return ", ".join(Settings.model_fields)


def _suggest(name: str) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(Settings.model_fields), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_env_file(path: Path) -> None:
    """An env file given as the settings file holds settings only: EDGEPACK_<SETTING>=value lines."""
    from dotenv import dotenv_values

    for key in dotenv_values(path):
        name = key[len("EDGEPACK_"):].lower() if key.upper().startswith("EDGEPACK_") else None
        if name not in Settings.model_fields:
            hint = _suggest(name or key.lower())
            raise ValueError(f"invalid server settings in {path}: unknown key {key!r}{hint}; an env file holds "
                             f"EDGEPACK_<SETTING> lines, the settings are: {_known()}")


def explain(exc: ValidationError, source: Path | None = None) -> str:
    """A pydantic error as an operator reads it: which key, what is wrong, the known keys when unknown."""
    where = f" in {source}" if source else ""
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(file)"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key {key!r}{_suggest(key)}")
        else:
            parts.append(f"{key}: {err['msg']} (got {err.get('input')!r}; from the file or EDGEPACK_{key.upper()})")
    unknown = any(e["type"] == "extra_forbidden" for e in exc.errors())
    return f"invalid server settings{where}: " + "; ".join(parts) + (f"; known keys: {_known()}" if unknown else "")
