"""The device side must stay light: importing it loads no workstation or server dependency."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("tensorflow", "fastapi", "sqlalchemy", "onnx", "pandas", "torch", "keras", "uvicorn")


@pytest.mark.parametrize("modules", [
    ["bundles", "bundles.verify", "bundles.assemble", "bundles.director", "bundles.selftest",
     "bundles.preprocessing", "bundles.runtime", "bundles.golden", "bundles.inspect"],
    ["device_agent", "*device_agent"],
])
def test_device_side_imports_no_heavy_dependency(modules: list[str]) -> None:
    # "*pkg" imports every module of the package (walk_packages), so no submodule can sneak one in.
    code = (
        "import importlib, json, pkgutil, sys\n"
        f"for m in {modules!r}:\n"
        "    if m.startswith('*'):\n"
        "        pkg = importlib.import_module(m[1:])\n"
        "        for info in pkgutil.walk_packages(pkg.__path__, m[1:] + '.'):\n"
        "            importlib.import_module(info.name)\n"
        "    else:\n"
        "        importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(json.loads(out))
    heavy = sorted(m for m in loaded if m.split(".")[0] in HEAVY)
    assert not heavy, f"device-side import pulled in {heavy}"
