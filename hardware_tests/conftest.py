"""Options and shared fixtures of the hardware suites (``pytest hardware_tests ...``; never part of ``tests/``).

On a device::

    pytest hardware_tests --server http://updates.lab:8080 --admin-token TOKEN --trust /etc/edgepack/trust -v -s

Without ``--server`` the tests that only need *an* update server start one here (``edgepack-server serve``
on SQLite, when ``edgepack[server]`` is installed) with the digits example's key set; the tests that need
the fleet's server skip and say so.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hardware_tests.harness import DIGITS_BUNDLE, DIGITS_KEYS, Fleet, LocalServer, bundle_manifest, resign_bundle


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("edgepack hardware", "edgepack hardware suites (hardware_tests/)")
    g.addoption("--server", default=None,
                help="URL of an update server this device reaches; the suite pushes bundles, enrolls test devices "
                     "and starts one-device rollouts there (use a test server, not production)")
    g.addoption("--admin-token", default=os.environ.get("EDGEPACK_ADMIN_TOKEN"),
                help="admin API token of --server (default: $EDGEPACK_ADMIN_TOKEN)")
    g.addoption("--device-id", default=None,
                help="prefix of the device ids the suite enrolls (default hwtest-<hostname>); a random suffix "
                     "is added so reruns never collide")
    g.addoption("--hardware-id", default=None,
                help="this device's hardware id / bundle profile: rpi4, rpi5, x86-kiosk (default: detected)")
    g.addoption("--keys", type=Path, default=DIGITS_KEYS,
                help="key directory (edgepack keys init): online keys for a local server, the targets key to sign "
                     "the update used by the power-loss test (default: examples/digits/keys)")
    g.addoption("--trust", type=Path, default=None,
                help="folder with the root.json and director-root.json the agent trusts (default: KEYS/trust)")
    g.addoption("--bundle", type=Path, action="append", default=None,
                help="signed bundle; give it twice for install + update (default: the digits example, and a "
                     "copy re-signed from it with --keys as a newer version)")


def detect_hardware_id() -> str | None:
    """rpi4 / rpi5 from the device tree, x86-kiosk on x86-64; None when unsure."""
    try:
        model = Path("/proc/device-tree/model").read_bytes().decode(errors="replace").strip("\0 \n")
    except OSError:
        model = ""
    for number in ("5", "4"):
        if model.startswith(f"Raspberry Pi {number}") or model.startswith(f"Raspberry Pi Compute Module {number}"):
            return f"rpi{number}"
    return "x86-kiosk" if platform.machine() in ("x86_64", "AMD64") else None


@dataclass(frozen=True)
class Device:
    """Who this device is for the suite, and what it trusts."""

    hardware_id: str
    device_prefix: str
    keys: Path
    """A private copy of --keys (signing writes to it)."""
    trust: Path
    remote: bool

    def new_device_id(self, role: str) -> str:
        return f"{self.device_prefix}-{role}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Device:
    opt = request.config.getoption
    hardware_id = opt("--hardware-id") or detect_hardware_id()
    if hardware_id is None:
        pytest.fail(f"cannot tell this device's hardware id ({platform.machine()}, no Raspberry Pi model in "
                    "/proc/device-tree/model): pass --hardware-id (rpi4, rpi5, x86-kiosk, ...)", pytrace=False)
    keys_src: Path = opt("--keys")
    keys = tmp_path_factory.mktemp("keys") / "keys"
    if keys_src.is_dir():
        shutil.copytree(keys_src, keys)
    trust = opt("--trust") or keys / "trust"
    prefix = opt("--device-id") or f"hwtest-{socket.gethostname().split('.')[0]}"
    return Device(hardware_id, prefix, keys, trust, remote=opt("--server") is not None)


@pytest.fixture(scope="session")
def fleet(request: pytest.FixtureRequest, device: Device, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """The fleet's server with --server; otherwise one started here, when edgepack[server] is installed."""
    url = request.config.getoption("--server")
    if url:
        token = request.config.getoption("--admin-token")
        if not token:
            pytest.fail("--server needs an admin token to push bundles and start rollouts: pass --admin-token "
                        "or set EDGEPACK_ADMIN_TOKEN (edgepack-server create-token makes one)", pytrace=False)
        yield Fleet(url, token)
        return
    missing = [m for m in ("fastapi", "uvicorn", "sqlalchemy") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"no --server given and no update server can start here ({', '.join(missing)} missing): "
                    "pass --server URL --admin-token TOKEN, or pip install 'edgepack[server]'")
    if not (device.keys / "online").is_dir():
        pytest.fail(f"a local server needs the online keys of --keys ({request.config.getoption('--keys')}/online)",
                    pytrace=False)
    server = LocalServer(device.keys, tmp_path_factory.mktemp("server"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def bundle(request: pytest.FixtureRequest) -> Path:
    """The signed bundle the suite installs (the first --bundle, or the digits example)."""
    given: list[Path] = request.config.getoption("--bundle") or []
    first = given[0] if given else DIGITS_BUNDLE
    if not first.is_file():
        pytest.skip(f"no bundle at {first}: build it on a workstation (edgepack build -c "
                    "examples/digits/edgepack.toml) and pass it with --bundle")
    return first


@pytest.fixture(scope="session")
def update_bundle(request: pytest.FixtureRequest, bundle: Path, device: Device,
                  tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A newer version of ``bundle``: the second --bundle, or ``bundle`` re-signed with --keys."""
    given: list[Path] = request.config.getoption("--bundle") or []
    if len(given) > 1:
        return given[1]
    if not (device.keys / "private").is_dir():
        pytest.skip("the power-loss update needs a second, newer version: pass --bundle twice, or --keys with the "
                    "private/ targets key to re-sign one")
    m = bundle_manifest(bundle)
    version = f"{m['version'].split('-')[0].split('+')[0]}-hwtest.{uuid.uuid4().hex[:8]}"
    return resign_bundle(bundle, device.keys, tmp_path_factory.mktemp("bundles") / f"{m['name']}-{version}.edgepack",
                         version=version, release_counter=int(m["release_counter"]) + 1)
