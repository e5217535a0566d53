"""``edgepack-server``: run the update server, migrate its database, create the first admin token.

Settings come from ``EDGEPACK_*`` environment variables and an optional TOML or env file (``--config``);
see docs/server.md.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from fastapi import FastAPI

    from update_server.settings import Settings

app = typer.Typer(name="edgepack-server", help="The edgepack update server.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)

ConfigOpt = typer.Option(None, "--config", "-c", help="TOML or env file with settings (EDGEPACK_CONFIG).")


def _settings(config: Path | None, **overrides: object) -> Settings:
    from update_server.settings import Settings

    if config is not None:
        os.environ["EDGEPACK_CONFIG"] = str(config.resolve())  # worker processes read the same file
    try:
        return Settings.load(config, **{k: v for k, v in overrides.items() if v is not None})
    except ValueError as exc:
        typer.echo(f"error: invalid settings: {exc}", err=True)
        raise typer.Exit(2) from exc


def _factory() -> FastAPI:
    """The app for uvicorn worker processes (settings from the environment and EDGEPACK_CONFIG)."""
    from update_server.app import create_app

    return create_app()


@app.command()
def serve(config: Path | None = ConfigOpt,
          host: str | None = typer.Option(None, help="Bind address (EDGEPACK_HOST)."),
          port: int | None = typer.Option(None, help="Port (EDGEPACK_PORT)."),
          workers: int | None = typer.Option(None, help="Worker processes (EDGEPACK_WORKERS)."),
          log_level: str = typer.Option("info")) -> None:
    """Serve the HTTP API, the TUF repository, the gate loop and the MQTT ingester."""
    settings = _settings(config, host=host, port=port, workers=workers)
    for key, value in (("EDGEPACK_HOST", settings.host), ("EDGEPACK_PORT", settings.port)):
        os.environ[key] = str(value)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.keys_dir is None:
        typer.echo("error: EDGEPACK_KEYS_DIR is not set; point it at the online/ folder of a key directory",
                   err=True)
        raise typer.Exit(2)
    metrics_dir = _multiprocess_metrics_dir()
    try:
        _run(settings, log_level)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _multiprocess_metrics_dir() -> Path | None:
    """A fresh, empty directory for prometheus-client's multiprocess mode, set before any worker (or
    prometheus_client) starts, so /metrics sums every worker (update_server/metrics.py). An operator's own
    PROMETHEUS_MULTIPROC_DIR is used (and emptied: stale files would count a dead process forever)."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink()
        return None
    path = Path(tempfile.mkdtemp(prefix="edgepack-metrics-"))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    return path


def _run(settings: Settings, log_level: str) -> None:
    import uvicorn

    if settings.workers > 1:
        uvicorn.run("update_server.cli:_factory", factory=True, host=settings.host, port=settings.port,
                    workers=settings.workers, log_level=log_level, access_log=False)
    else:
        from update_server.app import create_app

        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=log_level,
                    access_log=False)


@app.command()
def ingest(config: Path | None = ConfigOpt, log_level: str = typer.Option("info")) -> None:
    """Run only the MQTT telemetry ingester (no HTTP): an extra replica in the shared subscription group.

    Give each ingest process its own stable EDGEPACK_MQTT_CLIENT_ID; they split the telemetry with the servers.
    """
    import signal
    import threading

    from update_server.app import build_context, prepare_database
    from update_server.ingest import Ingester

    settings = _settings(config)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not settings.mqtt_url:
        typer.echo("error: EDGEPACK_MQTT_URL is not set; there is nothing to ingest", err=True)
        raise typer.Exit(2)
    ctx = build_context(settings)
    prepare_database(ctx)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    ingester = Ingester(ctx)
    ingester.start()
    try:
        while not stop.wait(1.0):
            pass
    finally:
        ingester.stop()
        ctx.engine.dispose()


@app.command("migrate")
def migrate_cmd(config: Path | None = ConfigOpt) -> None:
    """Create or upgrade the database schema (also done at start-up unless auto_migrate is off)."""
    from update_server.db import make_engine, migrate

    settings = _settings(config)
    migrate(make_engine(settings.effective_database_url))
    typer.echo(f"database at head: {settings.effective_database_url}")


@app.command("create-token")
def create_token(name: str = typer.Option("admin", help="A name for the token (shown in the audit log)."),
                 role: str = typer.Option("admin", help="admin, operator or viewer."),
                 config: Path | None = ConfigOpt) -> None:
    """Create an API token directly in the database (the way to get the first admin token)."""
    from update_server.context import utcnow
    from update_server.db import make_engine, make_sessionmaker, migrate
    from update_server.security import Role
    from update_server.services.tokens import create_api_token

    settings = _settings(config)
    try:
        parsed = Role.parse(role)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    engine = make_engine(settings.effective_database_url)
    migrate(engine)
    with make_sessionmaker(engine)() as session, session.begin():
        token, secret = create_api_token(session, name=name, role=parsed, actor="edgepack-server create-token",
                                         now=utcnow())
    typer.echo(f"created {token.role} token {token.id} ({name}); it is shown only once:")
    typer.echo(secret)


@app.command("enroll-token")
def enroll_token(uses: int = typer.Option(1, help="How many devices may enroll with it."),
                 group: str | None = typer.Option(None, help="Group given to enrolled devices."),
                 tag: list[str] = typer.Option([], help="key=value tags given to enrolled devices."),
                 ttl_hours: float = typer.Option(168, help="Validity in hours."),
                 config: Path | None = ConfigOpt) -> None:
    """Create an enrollment token directly in the database (provisioning scripts)."""
    from update_server.context import utcnow
    from update_server.db import make_engine, make_sessionmaker, migrate
    from update_server.services.tokens import create_enrollment_token

    settings = _settings(config)
    engine = make_engine(settings.effective_database_url)
    migrate(engine)
    tags = dict(t.split("=", 1) for t in tag)
    with make_sessionmaker(engine)() as session, session.begin():
        _, secret = create_enrollment_token(session, uses=uses, ttl=timedelta(hours=ttl_hours), group=group,
                                            tags=tags, actor="edgepack-server enroll-token", now=utcnow())
    typer.echo(secret)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
