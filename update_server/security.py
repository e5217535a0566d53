"""Secrets: API tokens, enrollment tokens and device credentials.

All three are 256-bit random secrets with a readable prefix (``ept_`` API token, ``epe_`` enrollment
token, ``epd_`` device credential). The server stores only their sha256: a random 256-bit secret needs no
slow password hash, and a plain digest lets a check-in find its device with one indexed lookup. The prefix
tells a device credential sent to an admin endpoint apart from a wrong token (403, not 401).

A device's broker password (``epm_``, issued with its credential at enrollment) is the broker's to check:
the server keeps it only as mosquitto's salted PBKDF2 hash (``update_server/broker/passwords.py``), in the
format the broker's password and dynamic-security files use.
"""

from __future__ import annotations

import enum
import hashlib
import secrets

API_PREFIX, ENROLL_PREFIX, DEVICE_PREFIX = "ept_", "epe_", "epd_"
MQTT_PREFIX = "epm_"
"""A device's broker password (the broker, not this server, checks it)."""


class Role(enum.IntEnum):
    """Roles, each including the ones below it."""

    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3

    @classmethod
    def parse(cls, name: str) -> Role:
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(f"unknown role {name!r}; choose admin, operator or viewer") from None


def new_secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def new_id(prefix: str, nbytes: int = 6) -> str:
    return prefix + secrets.token_hex(nbytes)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
