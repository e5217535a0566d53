"""The `edgepack` command: workstation (keys, build, inspect, verify) and admin (bundles, devices, rollouts).

Subcommands live next to the code they drive and register themselves here; each imports its heavy
dependencies inside the command, so `edgepack --help` stays fast and works on a bare install.
"""

from __future__ import annotations

import importlib

import typer

from edgepack import __version__

app = typer.Typer(
    name="edgepack",
    help="Build, sign, roll out and serve ML models on a fleet of edge devices.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help: rich markup would eat the [section] names that help texts and messages quote.
    rich_markup_mode=None,
)

# (module, attribute): each exposes register(app). Missing optional parts (not installed) are skipped.
_PLUGINS = (
    ("edgepack.cli_bundles", "register"),
    ("edgepack.cli_tls", "register"),
    ("converter.cli", "register"),
    ("update_server.admin_cli", "register"),
    ("edgepack.demo", "register"),
    ("edgepack.fleet.cli", "register"),
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"edgepack {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """edgepack: signed model bundles, phased rollouts, a device agent."""


def _register_all() -> None:
    for module, attr in _PLUGINS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            # Only skip when the plugin module itself is absent; a broken import inside it is a bug.
            if exc.name in (module, module.rsplit(".", 1)[0]):
                continue
            raise
        getattr(mod, attr)(app)


def main() -> None:
    _register_all()
    app()


if __name__ == "__main__":
    main()
