"""The ``files`` backend: a Mosquitto ``password_file`` and ``acl_file`` the server rewrites, for brokers
without the dynamic-security plugin (Mosquitto 1.x/2.x built without it, or a policy against plugins).

Layout of ``broker_files_dir``::

    passwd    user:$7$... lines (mosquitto_passwd format): the ingest and notify accounts, one line per device
    acl       one block per account; a device's block is its two rules (update_server/broker/acl.py)
    .lock     serializes writers (several server processes may share the directory)

Enrolling or revoking rewrites both files atomically (temp file + rename), then runs
``broker_reload_command`` (e.g. ``systemctl reload mosquitto``: mosquitto rereads both files on SIGHUP and
disconnects clients whose account is gone). If the command fails, enrollment is refused and the files are
restored; ``edgepack-server broker write-files`` regenerates them from the database at any time (e.g. after
restoring a backup, or on a new broker host).

The same files work for any broker that reads mosquitto's formats; amqtt's plugins read neither (see
docs/server.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path

from update_server.broker import BrokerAdminError, DeviceAccount
from update_server.broker.acl import BrokerPolicy, notify_password
from update_server.broker.passwords import PasswordHash
from update_server.broker.setup import write_private
from update_server.settings import Settings

log = logging.getLogger(__name__)
_ACCESS = {"publishClientSend": "write", "subscribeLiteral": "read", "subscribePattern": "read"}


def _acl_block(username: str, rules: Iterable[tuple[str, str]], comment: str) -> str:
    lines = [f"# {comment}", f"user {username}", *(f"topic {access} {topic}" for access, topic in rules)]
    return "\n".join(lines) + "\n"


def server_blocks(policy: BrokerPolicy) -> list[tuple[str, str]]:
    """(username, ACL block) of the ingest and notify accounts."""
    return [(policy.ingest_username, _acl_block(policy.ingest_username, [
                ("read", policy.ingest_subscription), ("read", f"{policy.topic_prefix}/+/telemetry/#")],
                "server: the telemetry ingester")),
            (policy.notify_username, _acl_block(policy.notify_username,
                                                [("write", a.topic) for a in policy.notify_acls()],
                                                "server: check-in notices"))]


def device_block(policy: BrokerPolicy, device_id: str) -> str:
    return _acl_block(policy.device_username(device_id),
                      [(_ACCESS[a.acltype], a.topic) for a in policy.device_acls(device_id)], f"device {device_id}")


def render(policy: BrokerPolicy, *, ingest_hash: str, notify_hash: str,
           devices: Iterable[tuple[str, str]]) -> tuple[str, str]:
    """The passwd and acl texts for the server accounts and ``devices`` ((device id, ``$7$`` hash), sorted)."""
    passwd = [f"{policy.ingest_username}:{ingest_hash}", f"{policy.notify_username}:{notify_hash}"]
    acl = ["# written by edgepack (update_server/broker/files.py); rewritten on every enrollment and revocation\n"]
    acl += [block for _, block in server_blocks(policy)]
    for device_id, hashed in sorted(devices):
        passwd.append(f"{policy.device_username(device_id)}:{hashed}")
        acl.append(device_block(policy, device_id))
    return "\n".join(passwd) + "\n", "\n".join(acl)


def write_server_accounts(directory: Path, policy: BrokerPolicy, *, admin_password: str,
                          ingest_password: str) -> tuple[Path, Path]:
    """Fresh files holding only the server's accounts (``edgepack-server broker init --auth files``)."""
    passwd, acl = render(policy, ingest_hash=PasswordHash.of(ingest_password).password_file_entry(),
                         notify_hash=PasswordHash.of(notify_password(admin_password)).password_file_entry(),
                         devices=())
    write_private(directory / "passwd", passwd)
    write_private(directory / "acl", acl)
    return directory / "passwd", directory / "acl"


def write_initial_files(directory: Path) -> tuple[Path, Path]:
    """Empty files for a broker that starts before any server wrote them (the local launcher)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("passwd", "acl"):
        if not (directory / name).exists():
            write_private(directory / name, "")
    return directory / "passwd", directory / "acl"


class FileAccounts:
    """The ``files`` backend of :class:`~update_server.broker.BrokerAccounts`."""

    kind = "files"

    def __init__(self, settings: Settings, policy: BrokerPolicy) -> None:
        assert settings.broker_files_dir is not None
        self.settings = settings
        self.policy = policy
        self.dir = settings.broker_files_dir

    def start(self) -> None:
        """Make sure the server's accounts are in the files (with the configured passwords); a failed reload
        is logged, not fatal (the broker may be restarting; enrollments report it)."""
        with self._locked():
            devices = self._devices()
            self._write(devices)
            try:
                self._reload()
            except BrokerAdminError as exc:
                log.error("broker accounts written to %s, but %s", self.dir, exc)

    def stop(self) -> None:
        pass

    def add_device(self, device_id: str, password: str) -> DeviceAccount:
        with self._locked():
            before = self._read()
            devices = self._devices()
            devices[device_id] = PasswordHash.of(password).password_file_entry()
            self._write(devices)
            try:
                self._reload()
            except BrokerAdminError:
                self._restore(before)
                raise
        return DeviceAccount(self.policy.device_username(device_id), password,
                             self.policy.device_client_id(device_id))

    def remove_device(self, device_id: str) -> None:
        with self._locked():
            devices = self._devices()
            if devices.pop(device_id, None) is not None:
                self._write(devices)
            self._reload()

    def write_all(self, devices: dict[str, str]) -> None:
        """Replace the device accounts with ``devices`` (id -> ``$7$`` hash), e.g. from the database."""
        with self._locked():
            self._write(devices)
            self._reload()

    # ---- files -----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _read(self) -> tuple[str, str]:
        def text(name: str) -> str:
            try:
                return (self.dir / name).read_text()
            except FileNotFoundError:
                return ""

        return text("passwd"), text("acl")

    def _restore(self, before: tuple[str, str]) -> None:
        write_private(self.dir / "passwd", before[0])
        write_private(self.dir / "acl", before[1])

    def _devices(self) -> dict[str, str]:
        """Device id -> hash, from the password file (device lines are those whose ACL block says so)."""
        passwd, acl = self._read()
        users = dict(line.split(":", 1) for line in passwd.splitlines() if ":" in line)
        devices: dict[str, str] = {}
        for line in acl.splitlines():
            if line.startswith("# device "):
                device_id = line[len("# device "):].strip()
                hashed = users.get(self.policy.device_username(device_id))
                if hashed:
                    devices[device_id] = hashed
        return devices

    def _write(self, devices: dict[str, str]) -> None:
        s = self.settings
        passwd, acl = render(self.policy, ingest_hash=PasswordHash.of(s.mqtt_password).password_file_entry(),
                             notify_hash=PasswordHash.of(notify_password(s.broker_admin_password))
                             .password_file_entry(), devices=devices.items())
        write_private(self.dir / "passwd", passwd)
        write_private(self.dir / "acl", acl)

    def _reload(self) -> None:
        command = self.settings.broker_reload_command
        if not command:
            log.warning("broker_reload_command is empty: the broker reads %s only when it restarts", self.dir)
            return
        try:
            done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired as exc:
            raise BrokerAdminError(f"broker_reload_command {command!r} did not finish in 30 s") from exc
        if done.returncode != 0:
            raise BrokerAdminError(f"broker_reload_command {command!r} failed ({done.returncode}): "
                                   f"{(done.stderr or done.stdout).strip()[-500:]}")
