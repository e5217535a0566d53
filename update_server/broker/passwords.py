"""Mosquitto's password hash (PBKDF2-HMAC-SHA512, 101 iterations, 12-byte salt), in its two spellings.

Mosquitto 2.0 stores passwords this way both in a ``password_file`` (``$7$<iterations>$<salt>$<hash>``,
what ``mosquitto_passwd`` writes) and in the dynamic-security plugin's JSON (``password``, ``salt``,
``iterations`` fields, what ``mosquitto_ctrl dynsec init`` writes). The server keeps the hash of each
device's broker password in this form, so it can regenerate either file from its database. The primitive
is :func:`hashlib.pbkdf2_hmac`; nothing here is hand-written cryptography, only the storage format
(checked against ``mosquitto_passwd`` output in tests/server/test_broker_files.py).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass

ITERATIONS = 101
"""Mosquitto 2.0's default for both mosquitto_passwd and dynamic security."""
SALT_BYTES = 12


@dataclass(frozen=True)
class PasswordHash:
    salt: bytes
    digest: bytes
    iterations: int = ITERATIONS

    @classmethod
    def of(cls, password: str, *, salt: bytes | None = None, iterations: int = ITERATIONS) -> PasswordHash:
        salt = os.urandom(SALT_BYTES) if salt is None else salt
        return cls(salt, hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations), iterations)

    @classmethod
    def parse(cls, text: str) -> PasswordHash:
        """Read the ``$7$...`` spelling (a line of a mosquitto password file, after ``user:``)."""
        parts = text.strip().split("$")
        if len(parts) != 5 or parts[0] or parts[1] != "7" or not parts[2].isdigit():
            raise ValueError("not a mosquitto $7$ (PBKDF2-SHA512) password hash")
        return cls(base64.b64decode(parts[3]), base64.b64decode(parts[4]), int(parts[2]))

    def password_file_entry(self) -> str:
        """``$7$101$<salt b64>$<hash b64>``, as mosquitto_passwd writes it."""
        return f"$7${self.iterations}${_b64(self.salt)}${_b64(self.digest)}"

    def dynsec_fields(self) -> dict[str, object]:
        """The ``password``/``salt``/``iterations`` fields of a client in dynamic-security.json."""
        return {"password": _b64(self.digest), "salt": _b64(self.salt), "iterations": self.iterations}

    def verify(self, password: str) -> bool:
        candidate = hashlib.pbkdf2_hmac("sha512", password.encode(), self.salt, self.iterations)
        return hmac.compare_digest(candidate, self.digest)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
