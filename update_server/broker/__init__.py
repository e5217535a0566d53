"""The broker's accounts and ACLs, managed by the server: one interface, three backends.

* ``dynsec`` (:mod:`.dynsec`): Mosquitto's dynamic-security plugin, administered over its ``$CONTROL``
  topics with the server's admin account. Changes apply at once; removing a device disconnects it.
* ``files`` (:mod:`.files`): a Mosquitto ``password_file`` + ``acl_file`` the server rewrites, then reloads
  the broker (``broker_reload_command``); for brokers without the plugin.
* ``none``: no accounts (development on loopback only): devices get no broker credentials.

Enrollment calls :meth:`BrokerAccounts.add_device` inside its database transaction, so a broker error
refuses the enrollment and nothing is left behind (the account is re-created on retry). Revocation calls
:meth:`BrokerAccounts.remove_device` after committing; it is idempotent, so a failed call is retried by
revoking again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from update_server.broker.acl import BrokerPolicy
from update_server.settings import Settings

log = logging.getLogger(__name__)


class BrokerAdminError(Exception):
    """The broker did not apply an account change: unreachable, refused, or no answer in time."""


@dataclass(frozen=True)
class DeviceAccount:
    """A device's broker account as handed to it at enrollment (the password is shown once)."""

    username: str
    password: str
    client_id: str


class BrokerAccounts(Protocol):
    kind: str
    policy: BrokerPolicy

    def start(self) -> None:
        """Connect and make sure the server's own accounts and roles exist (retries in the background)."""

    def stop(self) -> None: ...

    def add_device(self, device_id: str, password: str) -> DeviceAccount | None:
        """Create (or replace) the device's account; None when this backend manages no accounts."""

    def remove_device(self, device_id: str) -> None:
        """Delete the device's account and disconnect it. Idempotent: an unknown account is not an error."""


class NoAccounts:
    """``broker_auth = "none"``: the broker lets anyone in. Development on loopback only."""

    kind = "none"

    def __init__(self, policy: BrokerPolicy) -> None:
        self.policy = policy

    def start(self) -> None:
        log.warning("broker_auth=none: devices get no broker credentials and anyone who can reach the broker "
                    "can publish telemetry; use broker_auth=dynsec (docs/server.md)")

    def stop(self) -> None:
        pass

    def add_device(self, device_id: str, password: str) -> DeviceAccount | None:
        return None

    def remove_device(self, device_id: str) -> None:
        pass


def make_accounts(settings: Settings) -> BrokerAccounts:
    """The backend ``broker_auth`` names; ValueError when a setting it needs is missing."""
    policy = BrokerPolicy.from_settings(settings)
    if not settings.mqtt_url or settings.broker_auth == "none":
        return NoAccounts(policy)
    problems = settings.broker_admin_problems()
    if problems:
        raise ValueError("; ".join(problems))
    if settings.broker_auth == "dynsec":
        from update_server.broker.dynsec import DynsecAccounts

        return DynsecAccounts(settings, policy)
    from update_server.broker.files import FileAccounts

    return FileAccounts(settings, policy)
