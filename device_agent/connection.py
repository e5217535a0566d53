"""How the agent reaches the update server and the broker, and what enrollment leaves on disk.

* HTTPS pinned to ``[server] ca_file`` for every request (check-in, the TUF repository, downloads): they all
  go through one :class:`~device_agent.transport.Urllib3Transport`.
* MQTT over TLS pinned to ``[mqtt] ca_file`` (default: the server's), with the broker account the server
  issued at enrollment (username, client id in ``enrollment.json``; password in ``mqtt-password``, 0600).
* Plain ``http://``/``mqtt://`` works only to loopback (development), with a warning; anything else is
  refused unless the section says ``allow_plain = true``.

Files written by :func:`save_enrollment` (in the state directory, all 0600)::

    credential          the device credential (HTTP)
    mqtt-password       the broker password
    enrollment.json     the rest of the answer (broker URL, username, client id, image repository URL)
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from device_agent.config import AgentConfig, check_plain
from device_agent.errors import ConfigError
from device_agent.telemetry import MqttPublisher
from device_agent.transport import Urllib3Transport

log = logging.getLogger(__name__)


def http_transport(config: AgentConfig, user_agent: str = "edgepack-agent") -> Urllib3Transport:
    """The agent's HTTP(S) transport, pinned to ``[server] ca_file`` when set."""
    if check_plain(config.server.url, allow=config.server.allow_plain, where="[server] url"):
        log.warning("plain HTTP to %s: the credential travels in clear (development only; use https://)",
                    config.server.url)
    ca = str(config.path(config.server.ca_file)) if config.server.ca_file else None
    return Urllib3Transport(user_agent, ca_file=ca)


@dataclass(frozen=True)
class MqttSettings:
    url: str
    client_id: str
    username: str | None
    password: str | None
    ca_file: str | None


def mqtt_settings(config: AgentConfig, enrollment: dict[str, Any]) -> MqttSettings | None:
    """The broker connection from the config, falling back on what enrollment gave; None without a broker."""
    given = enrollment.get("mqtt") if isinstance(enrollment.get("mqtt"), dict) else {}
    assert isinstance(given, dict)
    url = config.mqtt.url or given.get("url")
    if not url:
        return None
    if not str(url).startswith(("mqtt://", "mqtts://")):
        raise ConfigError("the broker URL must start with mqtt:// or mqtts://", detail={"found": url})
    if check_plain(url, allow=config.mqtt.allow_plain, where="broker url"):
        log.warning("plain MQTT to %s: the broker password travels in clear (development only; use mqtts://)", url)
    username = config.mqtt.username or given.get("username")
    password = config.mqtt.password
    if password is None and username:
        path = config.path(config.mqtt.password_file)
        try:
            password = path.read_text().strip() or None
        except OSError:
            raise ConfigError(f"the broker account {username!r} has no password: {path} is missing "
                              "(written by `edgepack-agent enroll`); set [mqtt] password_file") from None
    ca = config.mqtt.ca_file or config.server.ca_file
    return MqttSettings(url=str(url), client_id=config.mqtt.client_id or given.get("client_id")
                        or f"edgepack-dev-{config.device_id}", username=username, password=password,
                        ca_file=str(config.path(ca)) if ca else None)


def mqtt_publisher(config: AgentConfig, enrollment: dict[str, Any]) -> MqttPublisher | None:
    m = mqtt_settings(config, enrollment)
    if m is None:
        return None
    return MqttPublisher(m.url, config.device_id, username=m.username, password=m.password, ca_file=m.ca_file,
                         client_id=m.client_id, keepalive_s=config.mqtt.keepalive_s, protocol=config.mqtt.protocol)


def save_enrollment(config: AgentConfig, answer: dict[str, Any]) -> None:
    """Store the enrollment answer: secrets in their own 0600 files, the rest in ``enrollment.json``."""
    from bundles._util import atomic_write

    config.state_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(config.path(config.server.credential_file), answer["credential"].encode() + b"\n", mode=0o600)
    info = {k: v for k, v in answer.items() if k != "credential"}
    mqtt = dict(info.get("mqtt") or {})
    password = mqtt.pop("password", None)
    if password:
        atomic_write(config.path(config.mqtt.password_file), str(password).encode() + b"\n", mode=0o600)
    info["mqtt"] = mqtt
    atomic_write(config.state_dir / "enrollment.json", json.dumps(info, indent=1).encode(), mode=0o600)
