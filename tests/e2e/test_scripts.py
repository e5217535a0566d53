"""The README's two commands on a machine with only the system Python: ``scripts/demo`` and ``scripts/test``
create the project's virtual environment ``.venv/`` (never ``pip install`` into the system Python), reuse it,
and say what to install when Python's venv module is missing.

The full first run (creating ``.venv`` and installing every dependency) takes minutes and downloads; it is
exercised on a clean clone by ``.ci/run``. Here the scripts run in a scratch copy of the repository's
scripts and pyproject.toml.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _scratch(tmp_path: Path) -> Path:
    root = tmp_path / "clone"
    shutil.copytree(REPO / "scripts", root / "scripts")
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def _run(root: Path, script: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "EDGEPACK_PYTHON")}
    return subprocess.run([str(root / "scripts" / script), *args], capture_output=True, text=True, timeout=300,
                          cwd=root, env={**base, **env})


def test_a_python_without_venv_support_gets_the_apt_package_named(tmp_path: Path) -> None:
    root = _scratch(tmp_path)
    # A Python whose ensurepip is missing, as on Debian/Ubuntu without python3-venv: shadow the module.
    shadow = tmp_path / "shadow"
    (shadow / "ensurepip").mkdir(parents=True)
    (shadow / "ensurepip" / "__init__.py").write_text("raise ImportError('ensurepip is disabled in Debian')\n")
    python = tmp_path / "python3"
    python.write_text(f"#!/bin/sh\nPYTHONPATH={shadow} exec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    for script in ("demo", "test"):
        res = _run(root, script, EDGEPACK_PYTHON=str(python))
        assert res.returncode == 1, res.stderr
        assert "apt-get install python3-venv" in res.stderr
        assert not (root / ".venv").exists()


def test_an_existing_venv_is_reused_without_installing_again(tmp_path: Path) -> None:
    root = _scratch(tmp_path)
    venv = root / ".venv"
    (venv / "bin").mkdir(parents=True)
    # Stands for the interpreter of .venv: the one running this test, which has edgepack[dev].
    (venv / "bin" / "python").write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    (venv / "bin" / "python").chmod(0o755)
    digest = hashlib.sha256((root / "pyproject.toml").read_bytes()).hexdigest()[:16]
    (venv / ".edgepack-installed").write_text(f"dev {digest}\n")
    res = _run(root, "test", "--version")
    assert res.returncode == 0, res.stderr
    assert f"using the project virtual environment {venv}" in res.stderr
    assert "edgepack[dev] is installed in .venv (pyproject.toml unchanged)" in res.stderr
    assert "pytest -n auto" in res.stderr and "pytest" in (res.stdout + res.stderr)
    # [dev] includes [all]: the demo script does not install again either.
    res = _run(root, "demo", "--help", PYTHONPATH=str(REPO))
    assert res.returncode == 0, res.stderr
    assert "edgepack[all] is installed in .venv" in res.stderr and "--keep" in res.stdout
