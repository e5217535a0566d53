"""`edgepack init` writes a template that parses; `edgepack build` reports and exits by status."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from typer.testing import CliRunner

from converter.cli import register
from converter.spec import load_spec


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """Test app."""

    register(app)
    return app


def test_init_writes_a_template_that_parses(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(_app(), ["init", str(tmp_path)])
    assert result.exit_code == 0, result.output
    spec = load_spec(tmp_path / "edgepack.toml")
    assert spec.name == "my-model" and spec.variants == ("onnx-fp32", "onnx-int8")
    assert [p.name for p in spec.profiles] == ["rpi4", "rpi5", "x86-kiosk"]
    again = runner.invoke(_app(), ["init", str(tmp_path)])
    assert again.exit_code == 2  # refuses to overwrite


def test_build_flags_override_the_file(mlp_project) -> None:
    spec = mlp_project()
    result = CliRunner().invoke(_app(), ["build", "-c", str(spec), "--variants", "onnx-fp32", "--dry-run",
                                         "--set", "evaluation.budget=0.02", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert [v["id"] for v in report["variants"]] == ["onnx-fp32"]
    assert report["metric"]["budget"] == 0.02
    assert report["bundle"] is None  # dry run
    assert not list((spec.parent / "out").glob("*.edgepack"))


def test_build_with_a_bad_spec_exits_2(mlp_project) -> None:
    result = CliRunner().invoke(_app(), ["build", "-c", str(mlp_project()), "--variants", "onnx-int4"])
    assert result.exit_code == 2


def test_a_signed_version_cannot_be_built_again(mlp_project) -> None:
    """Every build signs new bytes (measurements.json holds this build's timings), so building a version the
    key directory already signed is refused before the long steps, naming the metadata file and the fix;
    the published bundle stays valid. A bumped version builds."""
    spec = mlp_project(variants='["onnx-fp32"]')
    keys_targets = spec.parent / "keys" / "repo" / "targets.json"
    first = CliRunner().invoke(_app(), ["build", "-c", str(spec)])
    assert first.exit_code == 0, first.output
    (bundle,) = (spec.parent / "out").glob("*.edgepack")
    published, signed = bundle.read_bytes(), keys_targets.read_bytes()
    (spec.parent / "recipe.py").write_text((spec.parent / "recipe.py").read_text() + "\n# a changed file\n")
    again = CliRunner().invoke(_app(), ["build", "-c", str(spec), "--json"])
    assert again.exit_code != 0
    report = json.loads(again.stdout[again.stdout.index("{"):])
    error = report["errors"][0]
    assert "digits-mlp 1.0.0 is already signed in" in error["message"], error
    assert str(keys_targets) in error["message"] and "immutable" in error["message"]
    assert "--version" in error["fix"] and "--release-counter" in error["fix"]
    assert report["variants"] == []  # refused before converting anything
    assert keys_targets.read_bytes() == signed and bundle.read_bytes() == published
    bumped = CliRunner().invoke(_app(), ["build", "-c", str(spec), "--version", "1.0.1", "--release-counter", "2"])
    assert bumped.exit_code == 0, bumped.output
    assert bundle.read_bytes() == published  # the new version is a new file
