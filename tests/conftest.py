"""Fixtures shared by every test package. Package-specific fixtures live in tests/<package>/conftest.py."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from bundles.keys import KeyStore
from tests.support import services


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow tests first. With pytest-xdist (./scripts/test) the longest tests then start side by side on the
    workers and the many short ones fill in around them, instead of one long test running alone at the end.
    The sort is stable and the same on every worker (xdist requires identical collections)."""
    items.sort(key=lambda item: 0 if item.get_closest_marker("slow") else 1)


@pytest.fixture(autouse=True)
def _restore_environment() -> Iterator[None]:
    """Every test leaves ``os.environ`` as it found it. Commands run in-process (typer's CliRunner) set
    EDGEPACK_CONFIG, EDGEPACK_HOST/PORT and PROMETHEUS_MULTIPROC_DIR for their worker processes, as they must in
    a real process; in a test worker those leaked into later tests (a later ``serve`` that should have refused
    to start read an earlier test's config file and served until CI's deadline)."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="session")
def session_keys(tmp_path_factory: pytest.TempPathFactory) -> KeyStore:
    """One key directory for the session (root 2-of-3, targets 1-of-1)."""
    return KeyStore.init(tmp_path_factory.mktemp("keys") / "keys")


@pytest.fixture
def keys(tmp_path: Path) -> KeyStore:
    """A fresh key directory for one test (its targets metadata starts empty)."""
    return KeyStore.init(tmp_path / "keys")


@pytest.fixture(scope="session")
def system_broker() -> str:
    """URL of the Mosquitto that runs on the machine (127.0.0.1:1883). Fails in CI when absent."""
    return services.system_broker_url()


@pytest.fixture(scope="session")
def session_broker() -> Iterator[services.Mosquitto]:
    """This worker's mosquitto: dynamic security + TLS (local CA), shared by its tests. Servers on it get an
    account prefix and a topic prefix of their own; never stop it (use ``private_broker``)."""
    with services.mosquitto() as broker:
        yield broker


@pytest.fixture
def private_broker() -> Iterator[services.Mosquitto]:
    """A mosquitto of this test's own (dynamic security + TLS), on free ports, that it may stop and restart."""
    with services.mosquitto() as broker:
        yield broker


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database (SQLAlchemy URL) for one test module."""
    with services.postgres_database() as url:
        yield url
