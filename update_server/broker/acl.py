"""Who may do what on the broker: the accounts the server manages and their topic permissions. Pure.

One :class:`BrokerPolicy` (built from the server settings) describes every account, so the dynamic-security
backend, the password/ACL-file backend and the docs say the same thing:

=================  ===============================================  ==========================================
account            publish                                          subscribe
=================  ===============================================  ==========================================
device ``<id>``    ``<prefix>/<id>/telemetry/#``                    ``<prefix>/<id>/notify`` (exactly)
ingest             nothing                                          the ingester's subscription (exactly)
notify             ``<prefix>/+/notify``                            nothing
admin              the dynamic-security control topic               its response topic
anonymous          refused at connect
=================  ===============================================  ==========================================

Device ids match ``^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`` (enforced at enrollment), so they can never contain
the MQTT wildcards ``+``/``#`` or a ``/`` that would widen a topic. A device's username is bound to its
client id (``edgepack-dev-<id>``), so valid credentials cannot take over another device's session.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

from update_server.settings import Settings

DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
CONTROL_RESPONSE = "$CONTROL/dynamic-security/v1/response"


@dataclass(frozen=True)
class Acl:
    """One permission, in dynamic-security terms (``acltype`` is publishClientSend, subscribeLiteral, ...)."""

    acltype: str
    topic: str


@dataclass(frozen=True)
class BrokerPolicy:
    topic_prefix: str
    ingest_subscription: str
    """The exact filter the ingester subscribes to (``$share/<group>/<prefix>/+/telemetry/#`` with MQTT 5)."""
    account_prefix: str = ""
    """Prepended to every account and role name this server manages (several servers on one broker)."""
    admin_username: str = "edgepack-server"
    ingest_username: str = "edgepack-ingest"

    @property
    def notify_username(self) -> str:
        """The notifier's account: its password is derived from the admin password (:func:`notify_password`),
        so every replica knows it without one more setting. A separate account because dynamic security
        disconnects a client whose own roles change: the admin never changes its own permissions."""
        return f"{self.account_prefix}edgepack-notify"

    @classmethod
    def from_settings(cls, s: Settings) -> BrokerPolicy:
        plain = f"{s.mqtt_topic_prefix}/+/telemetry/#"
        sub = f"$share/{s.mqtt_share_group}/{plain}" if s.mqtt_protocol == "5" else plain
        return cls(topic_prefix=s.mqtt_topic_prefix, ingest_subscription=sub, account_prefix=s.broker_account_prefix,
                   admin_username=s.broker_admin_username, ingest_username=s.mqtt_username)

    # ---- devices --------------------------------------------------------------------------------------
    def device_username(self, device_id: str) -> str:
        return f"{self.account_prefix}{device_id}"

    @staticmethod
    def device_client_id(device_id: str) -> str:
        """The MQTT client id an agent uses (docs/protocol.md); the broker binds the device's account to it."""
        return f"edgepack-dev-{device_id}"

    def device_role(self, device_id: str) -> str:
        return f"{self.account_prefix}edgepack-device-{device_id}"

    def device_acls(self, device_id: str) -> tuple[Acl, ...]:
        if not DEVICE_ID.match(device_id):
            raise ValueError(f"device id {device_id!r} is not a valid device id")
        return (Acl("publishClientSend", f"{self.topic_prefix}/{device_id}/telemetry/#"),
                Acl("subscribeLiteral", f"{self.topic_prefix}/{device_id}/notify"))

    # ---- the server's own accounts -------------------------------------------------------------------
    @property
    def ingest_role(self) -> str:
        return f"{self.account_prefix}edgepack-ingest"

    def ingest_acls(self) -> tuple[Acl, ...]:
        return (Acl("subscribeLiteral", self.ingest_subscription),)

    @property
    def notify_role(self) -> str:
        return f"{self.account_prefix}edgepack-notify"

    def notify_acls(self) -> tuple[Acl, ...]:
        return (Acl("publishClientSend", f"{self.topic_prefix}/+/notify"),)


def notify_password(admin_password: str) -> str:
    """The notify account's password, derived from the admin password (HMAC-SHA256)."""
    return hmac.new(admin_password.encode(), b"edgepack notify account", hashlib.sha256).hexdigest()


ADMIN_ROLE = "edgepack-broker-admin"
ADMIN_ACLS = (Acl("publishClientSend", f"{CONTROL_TOPIC}/#"), Acl("subscribeLiteral", CONTROL_RESPONSE),
              Acl("publishClientReceive", CONTROL_RESPONSE))
"""The administrator's own role, written by ``edgepack-server broker init``: the control topics only (the
server adds its notify role at start-up)."""
