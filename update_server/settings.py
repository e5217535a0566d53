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
from typing import Any, cast

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

DEFAULT_PHASES = (1.0, 10.0, 50.0, 100.0)


class Settings(BaseSettings):
    """Every knob of the update server; docs/server.md lists them with their environment names."""

    model_config = SettingsConfigDict(env_prefix="EDGEPACK_", extra="ignore", toml_file=None)

    # --- where things live
    data_dir: Path = Field(Path("edgepack-data"), description="bundle storage and the default SQLite file")
    database_url: str = Field("", description="SQLAlchemy URL; empty = sqlite:///<data_dir>/server.db")
    keys_dir: Path | None = Field(None, description="the online/ folder of a key directory (online keys only)")
    storage: str = Field("local", description="bundle storage backend (only 'local' so far)")
    auto_migrate: bool = Field(True, description="run Alembic migrations at start-up")

    # --- HTTP
    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str = Field("", description="URL devices use to reach this server; empty = http://host:port")
    max_upload_bytes: int = 1024 * 1024 * 1024
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
    mqtt_topic_prefix: str = "edgepack/v1/devices"
    max_message_bytes: int = 64 * 1024
    ingest_batch: int = 2000
    ingest_flush_s: float = 0.05
    ingest_queue: int = 200_000

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
        if config_file.suffix == ".toml":
            file_cls = type("FileSettings", (cls,), {"model_config": {**cls.model_config,
                                                                        "toml_file": config_file}})
            return cast(Settings, file_cls(**overrides))
        return cls(_env_file=config_file, **overrides)  # type: ignore[call-arg]

    # --- derived values
    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'server.db').resolve()}"

    @property
    def effective_public_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")

    @property
    def effective_mqtt_client_id(self) -> str:
        """Stable per replica so its persistent session survives restarts; with several worker processes
        each needs its own id (the broker would otherwise disconnect one for the other), so the pid is added."""
        base = self.mqtt_client_id or f"edgepack-server-{socket.gethostname()}-{self.port}"
        return f"{base}-{os.getpid()}" if self.workers > 1 else base
