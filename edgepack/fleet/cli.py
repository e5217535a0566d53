"""``edgepack fleet-sim --scenario FILE``: run a simulated fleet against a real server and broker."""

from __future__ import annotations

from pathlib import Path

import typer


def fleet_sim(
    scenario: Path = typer.Option(..., "--scenario", "-s", help="Scenario TOML (see examples/fleet/)."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the summary as JSON here."),
    devices: int | None = typer.Option(None, "--devices", help="Override [fleet] devices."),
    database: str | None = typer.Option(None, "--database", help="Override [server] database "
                                                                 "(sqlite, postgresql or a URL)."),
    keep: bool = typer.Option(False, "--keep", help="Keep the server's and devices' directories."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log the agents' warnings."),
) -> None:
    """Simulate a fleet: real agents (in-process), real server, real Mosquitto, injected faults.

    Exits 1 when a rollout ends otherwise than the scenario expects, 2 when the scenario is invalid."""
    import dataclasses
    import logging

    from edgepack._console import cli_console, plain
    from edgepack.fleet.scenario import ScenarioError, load_scenario
    from edgepack.fleet.simulator import run_scenario
    from edgepack.fleet.summary import render

    logging.basicConfig(level=logging.WARNING if verbose else logging.ERROR,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    console = cli_console()
    try:
        scn = load_scenario(scenario)
        if devices is not None:
            scn = dataclasses.replace(scn, fleet=dataclasses.replace(scn.fleet, devices=devices))
        if database is not None:
            scn = dataclasses.replace(scn, server=dataclasses.replace(scn.server, database=database))
    except ScenarioError as exc:
        console.print(f"[red]error:[/red] {plain(exc)}")
        raise typer.Exit(2) from exc
    summary = run_scenario(scn, json_out=json_out, keep=keep,
                           progress=lambda s: console.print(plain(s), highlight=False))
    render(summary, console)
    if json_out is not None:
        console.print(f"summary written to {plain(json_out)}")
    if not summary.ok:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("fleet-sim")(fleet_sim)


def main() -> None:
    """``python -m edgepack.fleet.cli --scenario FILE`` (works before the plugin is registered)."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
    app.command()(fleet_sim)
    app()


if __name__ == "__main__":
    main()
