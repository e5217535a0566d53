from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from bundles.assemble import BundleInfo
from bundles.keys import KeyStore
from tests.support.factories import make_digits_bundle


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[KeyStore, BundleInfo, BundleInfo]:
    """One key store with two validly signed versions of the digits bundle."""
    base = tmp_path_factory.mktemp("signed")
    ks = KeyStore.init(base / "keys")
    v1 = make_digits_bundle(ks, base / "digits-1.0.0.edgepack", version="1.0.0", release_counter=1)
    v2 = make_digits_bundle(ks, base / "digits-1.1.0.edgepack", version="1.1.0", release_counter=2, n_golden=6)
    return ks, v1, v2


def read_members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def write_members(path: Path, members: dict[str, bytes],
                  tweak: Callable[[zipfile.ZipInfo], None] | None = None) -> Path:
    """Write a zip with the given members; ``tweak`` may alter each ZipInfo (modes, names)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o100644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            if tweak is not None:
                tweak(info)
            zf.writestr(info, data)
    return path
