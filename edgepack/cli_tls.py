"""``edgepack tls init|issue|show``: the local CA for the update server's HTTPS and the broker's TLS listener.

See :mod:`edgepack.tls` for what is written where, and docs/server.md (production setup) and docs/runbook.md
(certificate renewal).
"""

from __future__ import annotations

from pathlib import Path

import typer

tls_app = typer.Typer(help="A local CA and certificates for HTTPS and MQTT over TLS.", no_args_is_help=True)

HostOpt = typer.Option(..., "--host", help="DNS name or IP address clients use (repeatable; the first is the "
                                           "certificate's common name).")


@tls_app.command("init")
def init(out: Path = typer.Option(..., "--out", help="Directory for ca.pem/ca.key and the certificates."),
         host: list[str] = HostOpt,
         broker_host: list[str] = typer.Option([], "--broker-host",
                                               help="Names of the broker, if not the same as --host (repeatable)."),
         days: int = typer.Option(365, help="Validity of the server and broker certificates, in days.")) -> None:
    """Create a CA, a server certificate (edgepack-server) and a broker certificate (mosquitto)."""
    from edgepack import tls

    try:
        files = tls.init(out, hosts=host, broker_hosts=broker_host or None, days=days)
    except tls.TlsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"CA:      {files.ca_cert}  (install on every device: [server] ca_file; keep {files.ca_key} offline)")
    typer.echo(f"server:  {files.cert('server')} {files.key('server')}  (EDGEPACK_TLS_CERT / EDGEPACK_TLS_KEY)")
    typer.echo(f"broker:  {files.cert('broker')} {files.key('broker')}  (mosquitto certfile / keyfile)")


@tls_app.command("issue")
def issue(directory: Path = typer.Option(..., "--dir", help="The directory `edgepack tls init` wrote."),
          name: str = typer.Option(..., "--name", help="server, broker, or a new name."),
          host: list[str] = HostOpt,
          days: int = typer.Option(365, help="Validity in days.")) -> None:
    """Issue (or renew) one certificate from the existing CA; devices keep trusting it."""
    from edgepack import tls

    try:
        cert, key = tls.issue(tls.TlsFiles(directory), name, host, days=days)
    except tls.TlsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"{cert} {key} (valid until {tls.expires(cert):%Y-%m-%d}); reload the service that uses it")


@tls_app.command("show")
def show(directory: Path = typer.Option(..., "--dir", help="The directory `edgepack tls init` wrote.")) -> None:
    """When each certificate in the directory expires."""
    from edgepack import tls

    for cert in sorted(directory.glob("*.pem")):
        typer.echo(f"{cert.name:16} expires {tls.expires(cert):%Y-%m-%d %H:%M} UTC")


def register(app: typer.Typer) -> None:
    app.add_typer(tls_app, name="tls")
