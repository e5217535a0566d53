"""Where the broker is and how to reach it: host, port, TLS (with the pinned CA), an account.

Used by every MQTT connection the server opens: the ingester (``mqtt_wire``), the notifier and the
dynamic-security administrator (paho).
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    tls: bool
    ca_file: Path | None = None
    username: str | None = None
    password: str | None = None

    @classmethod
    def from_url(cls, url: str, *, ca_file: Path | None = None, username: str = "", password: str = "") -> Endpoint:
        parsed = urlparse(url if "://" in url else f"mqtt://{url}")
        if parsed.scheme not in ("mqtt", "mqtts"):
            raise ValueError(f"broker URL must be mqtt://host:port or mqtts://host:port, found {url!r}")
        tls = parsed.scheme == "mqtts"
        return cls(parsed.hostname or "127.0.0.1", parsed.port or (8883 if tls else 1883), tls,
                   ca_file if tls else None, username or None, (password or None) if username else None)

    @classmethod
    def for_server(cls, settings: Any, *, account: str) -> Endpoint:
        """The broker as ``settings`` name it, with the ``"ingest"`` account (``mqtt_username``), the server's
        ``"admin"`` account (``broker_admin_username``: dynamic security) or its ``"notify"`` account."""
        from update_server.broker.acl import notify_password

        if account == "ingest":
            user, password = settings.mqtt_username, settings.mqtt_password
        elif account == "admin" or settings.broker_auth == "none":
            user, password = settings.broker_admin_username, settings.broker_admin_password
        else:
            user = f"{settings.broker_account_prefix}edgepack-notify"
            password = notify_password(settings.broker_admin_password)
        return cls.from_url(settings.mqtt_url, ca_file=settings.mqtt_ca_file, username=user if password else "",
                            password=password)

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    @property
    def authenticated(self) -> bool:
        return bool(self.username and self.password)

    def ssl_context(self) -> ssl.SSLContext | None:
        """TLS 1.2+, the broker's certificate checked against ``ca_file`` (or the system CAs) and its name."""
        if not self.tls:
            return None
        ctx = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    def paho_client(self, client_id: str, *, v5: bool = True) -> Any:
        """A paho client with this endpoint's account and TLS set (not connected)."""
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)
        if self.username:
            client.username_pw_set(self.username, self.password)
        ctx = self.ssl_context()
        if ctx is not None:
            client.tls_set_context(ctx)
        return client

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"
