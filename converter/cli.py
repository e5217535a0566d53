"""``edgepack build`` and ``edgepack init``, registered on the unified typer app.

Flags override ``edgepack.toml`` by rewriting the parsed table before validation, so a flag is
checked exactly like the same value in the file. ``--set section.key=value`` reaches any key
(the value is parsed as TOML, so ``--set evaluation.budget=0.02`` is a float).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import tomllib
import typer

from converter.errors import ConverterError


def _parse_set(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"--set expects section.key=value, got {item!r}")
        try:
            out[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = raw
    return out


def build_command(
    config: Path = typer.Option(Path("edgepack.toml"), "--config", "-c", help="Build spec (file or directory)."),
    model: str | None = typer.Option(None, "--model", help="Override [model] path."),
    out: str | None = typer.Option(None, "--out", "-o", help="Override [output] dir."),
    keys: str | None = typer.Option(None, "--keys", help="Override [signing] keys (key directory)."),
    variants: str | None = typer.Option(None, "--variants", help="Comma-separated variant ids to build."),
    profiles: str | None = typer.Option(None, "--profiles", help="Comma-separated target profiles."),
    budget: float | None = typer.Option(None, "--budget", help="Override [evaluation] budget."),
    version: str | None = typer.Option(None, "--version", help="Override [bundle] version."),
    release_counter: int | None = typer.Option(None, "--release-counter", help="Override [bundle] release_counter."),
    set_: list[str] = typer.Option([], "--set", help="Override any key: section.key=value (TOML value)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Build, evaluate and report; write no bundle."),
    strict: bool = typer.Option(False, "--strict", help="Fail the build if any variant fails or is refused."),
    json_out: bool = typer.Option(False, "--json", help="Print build-report.json to stdout."),
    dump_files: Path | None = typer.Option(None, "--dump-files", help="Also write the bundle's files to DIR."),
) -> None:
    """Convert, quantize, evaluate and sign a model bundle from an edgepack.toml."""
    from converter.builder import build
    from converter.spec import load_spec
    from edgepack._console import cli_console, plain

    overrides: dict[str, Any] = {}
    for key, value in (("model.path", model), ("output.dir", out), ("signing.keys", keys),
                       ("evaluation.budget", budget), ("bundle.version", version),
                       ("bundle.release_counter", release_counter)):
        if value is not None:
            overrides[key] = str(Path(value).resolve()) if key in ("model.path", "output.dir", "signing.keys") \
                else value
    if variants:
        overrides["variants.build"] = [v.strip() for v in variants.split(",") if v.strip()]
    if profiles:
        overrides["targets.profiles"] = [p.strip() for p in profiles.split(",") if p.strip()]
    if strict:
        overrides["output.strict"] = True
    overrides.update(_parse_set(set_))
    console = cli_console(stderr=True)
    try:
        spec = load_spec(config, overrides)
    except ConverterError as exc:
        console.print(f"[red]error[/] {plain(exc)}")
        raise typer.Exit(2) from exc
    path = config / "edgepack.toml" if config.is_dir() else config
    report = build(spec, console=console, dry_run=dry_run,
                   spec_sha256=hashlib.sha256(path.read_bytes()).hexdigest(), dump_dir=dump_files)
    if json_out:
        typer.echo(json.dumps(report, indent=2, sort_keys=True, default=str))
    if report["status"] != "ok":
        raise typer.Exit(1)


def init_command(
    directory: Path = typer.Argument(Path("."), help="Where to write edgepack.toml."),
    keys: Path | None = typer.Option(None, "--keys", help="Your key directory (edgepack keys init --out DIR): "
                                     "the template's [signing] keys points at it. Default: DIRECTORY/keys."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing edgepack.toml."),
) -> None:
    """Write a commented edgepack.toml template."""
    import os

    from converter.template import TEMPLATE

    target = directory / "edgepack.toml"
    if target.exists() and not force:
        typer.echo(f"{target} exists; pass --force to overwrite", err=True)
        raise typer.Exit(2)
    directory.mkdir(parents=True, exist_ok=True)
    text = TEMPLATE
    if keys is not None:
        rel = Path(os.path.relpath(keys.resolve(), directory.resolve())).as_posix()
        text = text.replace('keys = "keys"  ', f'keys = "{rel}"  '.ljust(len('keys = "keys"  ')), 1)
        if not (keys / "trust" / "root.json").is_file():
            typer.echo(f"note: {keys} is not a key directory yet; create it with: edgepack keys init --out {keys}",
                       err=True)
    target.write_text(text, encoding="utf-8")
    typer.echo(f"wrote {target}; edit [model], [preprocessing], [calibration] and [evaluation], then "
               f"run: edgepack build -c {target}")


def register(app: typer.Typer) -> None:
    """Add ``build`` and ``init`` to the unified edgepack app."""
    app.command("build")(build_command)
    app.command("init")(init_command)


def main() -> None:
    """Standalone entry point (``python -m converter.cli``), same commands."""
    app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None)
    register(app)
    app()


if __name__ == "__main__":
    main()
