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
                  add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)

ConfigOpt = typer.Option(None, "--config", "-c", help="TOML or env file with settings (EDGEPACK_CONFIG).")


def _settings(config: Path | None, **overrides: object) -> Settings:
    from update_server.settings import Settings

    if config is not None:
        os.environ["EDGEPACK_CONFIG"] = str(config.resolve())  # worker processes read the same file
    try:
        settings = Settings.load(config, **{k: v for k, v in overrides.items() if v is not None})
    except ValueError as exc:
        from pydantic import ValidationError

        from update_server.settings import explain

        typer.echo(f"error: {explain(exc) if isinstance(exc, ValidationError) else exc}", err=True)
        raise typer.Exit(2) from exc
    # The environment is shared with other tools (EDGEPACK_TOKEN, ...): an unknown EDGEPACK_ variable is only
    # reported, since it may be someone else's; a typo in a setting's name shows up here.
    for key in sorted(os.environ):
        name = key[len("EDGEPACK_"):].lower()
        if key.startswith("EDGEPACK_") and name not in Settings.model_fields and name not in _NOT_SETTINGS:
            typer.echo(f"warning: {key} is not a server setting and is ignored (settings: docs/server.md)",
                       err=True)
    return settings


_NOT_SETTINGS = {"config", "token", "server", "ca_file", "test_pg", "test_mqtt"}
"""EDGEPACK_ variables that are not server settings: the settings file, the operator CLI's token, URL and CA."""


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
    """Serve the HTTP API (HTTPS with tls_cert/tls_key), the TUF repository, the gate loop and the MQTT ingester."""
    settings = _settings(config, host=host, port=port, workers=workers)
    for key, value in (("EDGEPACK_HOST", settings.host), ("EDGEPACK_PORT", settings.port)):
        os.environ[key] = str(value)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.keys_dir is None:
        typer.echo("error: EDGEPACK_KEYS_DIR is not set; point it at the online/ folder of a key directory",
                   err=True)
        raise typer.Exit(2)
    try:
        settings.transport_warnings()  # refuses plain HTTP/MQTT off loopback before anything starts
        problems = settings.broker_admin_problems()
        if problems:
            raise ValueError("; ".join(problems))
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
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

    cert = str(settings.tls_cert) if settings.tls_cert else None
    tls_key = str(settings.tls_key) if settings.tls_key else None
    if settings.workers > 1:
        uvicorn.run("update_server.cli:_factory", factory=True, host=settings.host, port=settings.port,
                    workers=settings.workers, log_level=log_level, access_log=False, ssl_certfile=cert,
                    ssl_keyfile=tls_key)
    else:
        from update_server.app import create_app

        # Bind first: uvicorn would run the lifespan (which connects the ingester into the shared subscription)
        # before binding, so a port in use would leave a broker session behind taking telemetry.
        # (With several workers uvicorn binds in the parent before any worker starts.)
        config = uvicorn.Config(create_app(settings), host=settings.host, port=settings.port, log_level=log_level,
                                access_log=False, ssl_certfile=cert, ssl_keyfile=tls_key)
        try:
            sock = config.bind_socket()
        except SystemExit as exc:  # uvicorn logged why (address in use, permission)
            typer.echo(f"error: cannot listen on {settings.host}:{settings.port}; nothing was started", err=True)
            raise typer.Exit(1) from exc
        uvicorn.Server(config).run(sockets=[sock])


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
    try:
        for warning in settings.transport_warnings(http=False):
            logging.getLogger("edgepack-server").warning("%s", warning)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    ctx = build_context(settings, accounts=False)
    prepare_database(ctx)
    if ctx.db_guard is not None:
        ctx.db_guard.start()
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
        if ctx.db_guard is not None:
            ctx.db_guard.stop()
        ctx.engine.dispose()


@app.command("check-broker")
def check_broker_cmd(config: Path | None = ConfigOpt,
                     messages: int = typer.Option(1500, help="QoS 1 messages queued for the probe while it is "
                                                             "away (more than Mosquitto's default cap of 1000)."),
                     json_out: bool = typer.Option(False, "--json", help="Print the result as JSON.")) -> None:
    """Check the broker keeps the server's session and queues a large backlog for it; print what to set.

    Exit code 0 when it does, 1 when something must change in the broker's configuration."""
    import json

    from update_server.broker.check import check_broker

    settings = _settings(config)
    if not settings.mqtt_url:
        typer.echo("error: EDGEPACK_MQTT_URL is not set; there is no broker to check", err=True)
        raise typer.Exit(2)
    report = check_broker(settings, messages=messages)
    if json_out:
        typer.echo(json.dumps(report.as_dict(), indent=2))
    else:
        for line in report.lines():
            typer.echo(line)
        typer.echo("ok" if report.ok else "the broker needs changes (see the PROBLEM lines)")
    raise typer.Exit(0 if report.ok else 1)


@app.command("release-session")
def release_session_cmd(config: Path | None = ConfigOpt) -> None:
    """End the broker session of this replica's mqtt_client_id (a replica retired for good): otherwise the
    session keeps taking its share of the telemetry until it expires. Stop the replica first."""
    from update_server.broker.endpoint import Endpoint
    from update_server.mqtt_wire import MqttError, WireClient

    settings = _settings(config)
    if not settings.mqtt_url:
        typer.echo("error: EDGEPACK_MQTT_URL is not set", err=True)
        raise typer.Exit(2)
    b = Endpoint.for_server(settings, account="ingest")
    for client_id in settings.ingest_client_ids():  # one per worker
        client = WireClient(b.host, b.port, client_id, protocol=5 if settings.mqtt_protocol == "5" else 4,
                            username=b.username, password=b.password, ssl_context=b.ssl_context())
        try:
            client.release_session()
        except (MqttError, OSError) as exc:
            typer.echo(f"error: could not reach the broker at {b.host}:{b.port}: {exc}", err=True)
            raise typer.Exit(1) from exc
        typer.echo(f"ended the broker session of {client_id}")


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
    """Create an API token directly in the database (the way to get the first admin token).

    Prints only the token on stdout (a note goes to stderr): export EDGEPACK_TOKEN=$(edgepack-server create-token)
    """
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
    # Only the token goes to stdout, so `export EDGEPACK_TOKEN=$(edgepack-server create-token ...)` works.
    typer.echo(f"created {token.role} token {token.id} ({name}); it is shown only once", err=True)
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
    if any("=" not in t for t in tag):
        typer.echo(f"error: --tag must be key=value, got {tag}", err=True)
        raise typer.Exit(2)
    tags = dict(t.split("=", 1) for t in tag)
    with make_sessionmaker(engine)() as session, session.begin():
        _, secret = create_enrollment_token(session, uses=uses, ttl=timedelta(hours=ttl_hours), group=group,
                                            tags=tags, actor="edgepack-server enroll-token", now=utcnow())
    typer.echo(secret)


broker_app = typer.Typer(help="The broker's accounts: set one up, regenerate files, rotate the admin password.",
                         no_args_is_help=True)
app.add_typer(broker_app, name="broker")


@broker_app.command("init")
def broker_init(out: Path = typer.Option(..., "--out", help="Directory for mosquitto.conf, the account store and "
                                                            "the env files."),
                tls_dir: Path = typer.Option(..., "--tls-dir", help="What `edgepack tls init` wrote (ca.pem, "
                                                                    "broker.pem, broker.key)."),
                broker_host: str = typer.Option(..., "--broker-host", help="Name the server and devices use to "
                                                                          "reach the broker (in its certificate)."),
                port: int = typer.Option(8883, help="TLS listener port."),
                bind: str = typer.Option("0.0.0.0", help="TLS listener address."),
                plain_port: int | None = typer.Option(None, help="Also a plain listener on 127.0.0.1 (local tools)."),
                auth: str = typer.Option("dynsec", help="dynsec (Mosquitto dynamic security) or files."),
                topic_prefix: str = typer.Option("edgepack/v1/devices"),
                share_group: str = typer.Option("edgepack-server"),
                run_as: str | None = typer.Option(None, help="`user` of mosquitto.conf (default: mosquitto)."),
                force: bool = typer.Option(False, help="Overwrite an existing account store.")) -> None:
    """Write a broker configuration: TLS listener, accounts (dynamic security or files), server.env."""
    from update_server.broker.setup import init_broker

    try:
        made = init_broker(out, tls_dir=tls_dir, broker_host=broker_host, port=port, bind=bind, auth=auth,
                           plain_port=plain_port, topic_prefix=topic_prefix, share_group=share_group,
                           run_as=run_as, force=force)
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"mosquitto:   mosquitto -c {made.conf}")
    typer.echo(f"server:      edgepack-server serve --config {made.server_env}   (0600: holds the passwords)")
    typer.echo(f"ingest-only: edgepack-server ingest --config {made.ingest_env}")


@broker_app.command("write-files")
def broker_write_files(config: Path | None = ConfigOpt) -> None:
    """files backend: regenerate passwd and acl from the database (every device not revoked), then reload."""
    from sqlalchemy import select

    from update_server.broker import BrokerAdminError
    from update_server.broker.acl import BrokerPolicy
    from update_server.broker.files import FileAccounts
    from update_server.db import make_engine, make_sessionmaker
    from update_server.models import Device

    settings = _settings(config)
    if settings.broker_auth != "files" or settings.broker_files_dir is None:
        typer.echo("error: this needs broker_auth=files and broker_files_dir", err=True)
        raise typer.Exit(2)
    engine = make_engine(settings.effective_database_url)
    with make_sessionmaker(engine)() as session:
        rows = session.execute(select(Device.id, Device.mqtt_password_hash).where(
            Device.revoked_at.is_(None), Device.mqtt_password_hash.is_not(None))).all()
    try:
        FileAccounts(settings, BrokerPolicy.from_settings(settings)).write_all({r.id: r.mqtt_password_hash
                                                                                 for r in rows})
    except BrokerAdminError as exc:
        typer.echo(f"error: files written, but {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"wrote {len(rows)} device account(s) to {settings.broker_files_dir}")


@broker_app.command("rotate-admin-password")
def broker_rotate_admin(config: Path | None = ConfigOpt) -> None:
    """dynsec: give the admin account a new random password (printed once). Then put it in every replica's
    EDGEPACK_BROKER_ADMIN_PASSWORD and restart them (docs/runbook.md)."""
    import secrets

    from update_server.broker import BrokerAdminError
    from update_server.broker.dynsec import DynsecClient
    from update_server.broker.endpoint import Endpoint

    settings = _settings(config)
    if settings.broker_auth != "dynsec" or not settings.broker_admin_password:
        typer.echo("error: this needs broker_auth=dynsec and the current broker_admin_password", err=True)
        raise typer.Exit(2)
    new = secrets.token_urlsafe(24)
    client = DynsecClient(Endpoint.for_server(settings, account="admin"), f"rotate-{secrets.token_hex(4)}",
                          timeout_s=settings.broker_admin_timeout_s)
    client.start()
    answer: dict[str, object] = {}
    try:  # the broker disconnects the account whose password changed, us included: its answer may be lost,
        (answer,) = client.call([{"command": "setClientPassword", "username": settings.broker_admin_username,
                                  "password": new}])
    except BrokerAdminError:
        pass
    finally:
        client.stop()
    if answer.get("error"):
        typer.echo(f"error: the broker refused: {answer['error']}", err=True)
        raise typer.Exit(1)
    check = DynsecClient(Endpoint.for_server(settings.model_copy(update={"broker_admin_password": new}),
                                             account="admin"), f"rotate-check-{secrets.token_hex(4)}")
    check.start()  # ... so the new password is proven by logging in with it
    try:
        if not check.wait_ready(settings.broker_admin_timeout_s):
            typer.echo("error: the broker did not accept the new password; the old one still applies", err=True)
            raise typer.Exit(1)
    finally:
        check.stop()
    typer.echo("new broker admin password (shown once; the old one no longer works):")
    typer.echo(new)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
