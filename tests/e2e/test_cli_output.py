"""What the command-line tools print when a script, a log or ``$(...)`` reads them (not a terminal): lines
and paths are not wrapped at 80 columns, tables are not squeezed, and ``[section]`` names in help texts and
error messages survive (rich would take them for markup and drop them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def edgepack(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "80", "LINES": "24"}  # as pytest-xdist exports them
    return subprocess.run([sys.executable, "-m", "edgepack.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=cwd)


def test_long_paths_and_tables_are_not_cut_when_not_a_terminal(tmp_path: Path) -> None:
    keys = tmp_path / ("a-rather-long-directory-name-" * 4) / "keys"
    res = edgepack("keys", "init", "--out", str(keys))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert any(line.endswith(f" {keys / 'trust' / 'root.json'}") for line in lines), res.stdout
    assert any(line.endswith(f" {keys / 'private'}") for line in lines), res.stdout
    # the roles table keeps full rows: the header and each role on one line
    assert any("role" in line and "threshold" in line and "present here" in line for line in lines)


def test_section_names_survive_in_help_and_errors(tmp_path: Path) -> None:
    res = edgepack("build", "--help")
    assert res.returncode == 0 and "Override [model] path." in res.stdout
    (tmp_path / "edgepack.toml").write_text('[bundle]\nname = "m"\n[model]\npath = "model.onnx"\n')
    res = edgepack("build", "-c", str(tmp_path / "edgepack.toml"))
    assert res.returncode == 2
    assert "[calibration]" in res.stderr and "[step spec]" in res.stderr, res.stderr
    scenario = tmp_path / "bad.toml"
    scenario.write_text('[fleet]\ndevices = "many"\n[bundles."1.0.0"]\nrelease_counter = 1\n'
                        '[[rollout]]\nbundle = "1.0.0"\n')
    res = edgepack("fleet-sim", "--scenario", str(scenario))
    assert res.returncode == 2 and "[fleet] devices must be a number" in res.stdout + res.stderr
