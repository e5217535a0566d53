"""``edgepack bundles|devices|rollout|enroll-token|tokens``: the operator's CLI over the server's HTTP API.

Server and token come from ``--server``/``--token`` or ``EDGEPACK_SERVER``/``EDGEPACK_TOKEN``; a server with
a certificate from a private CA (``edgepack tls init``) needs ``EDGEPACK_CA_FILE=ca.pem``. Every command
is a thin call of one endpoint; errors print the server's message (what is wrong and what to do) and exit
non-zero. ``rollout status`` shows each phase's progress and every gate's value against its threshold.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer

ServerOpt = typer.Option("http://127.0.0.1:8080", "--server", envvar="EDGEPACK_SERVER", help="Update server URL.")
TokenOpt = typer.Option("", "--token", envvar="EDGEPACK_TOKEN", help="API token (edgepack-server create-token).")
JsonOpt = typer.Option(False, "--json", help="Print the raw JSON.")
ReasonOpt = typer.Option("", "--reason", "-r", help="Why (recorded in the audit log).")

bundles_app = typer.Typer(help="Bundles on the update server.", no_args_is_help=True)
devices_app = typer.Typer(help="Enrolled devices.", no_args_is_help=True)
rollout_app = typer.Typer(help="Phased rollouts.", no_args_is_help=True)
enroll_app = typer.Typer(help="Enrollment tokens for new devices.", no_args_is_help=True)
tokens_app = typer.Typer(help="API tokens (admin role).", no_args_is_help=True)


def _call(server: str, token: str, method: str, path: str, **kwargs: Any) -> Any:
    import httpx

    token = token.strip()
    if any(c.isspace() for c in token):
        typer.echo("error: the API token contains spaces or line breaks; EDGEPACK_TOKEN (or --token) must hold "
                   "the token alone (ept_...), e.g. export EDGEPACK_TOKEN=$(edgepack-server create-token ...)",
                   err=True)
        raise typer.Exit(2)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    verify: str | bool = os.environ.get("EDGEPACK_CA_FILE") or True  # a private CA (edgepack tls init)
    try:
        with httpx.Client(base_url=server.rstrip("/"), headers=headers, timeout=600, verify=verify) as client:
            r = client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        typer.echo(f"error: cannot reach the update server at {server}: {exc}", err=True)
        raise typer.Exit(3) from exc
    if r.status_code >= 400:
        try:
            err = r.json()["error"]
            detail = f"\n  {json.dumps(err['detail'])}" if err.get("detail") else ""
            typer.echo(f"error ({r.status_code} {err['code']}): {err['message']}{detail}", err=True)
        except (ValueError, KeyError, TypeError):
            typer.echo(f"error ({r.status_code}): {r.text[:500]}", err=True)
        raise typer.Exit(1)
    return r.json() if r.content else None


def _table(rows: list[list[Any]], header: list[str]) -> None:
    from rich.table import Table
    from rich.text import Text

    from edgepack._console import cli_console

    table = Table(*header)
    for row in rows:  # Text: cells hold operators' words (reasons, tags), never markup
        table.add_row(*[Text("" if v is None else str(v)) for v in row])
    cli_console().print(table)


def _json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2))


def _kv(items: list[str], what: str) -> dict[str, str]:
    try:
        return dict(i.split("=", 1) for i in items)
    except ValueError:
        typer.echo(f"error: {what} must be key=value, got {items}", err=True)
        raise typer.Exit(2) from None


# ---- bundles --------------------------------------------------------------------------------------------
@bundles_app.command("push")
def bundles_push(files: list[Path] = typer.Argument(..., exists=True, dir_okay=False),
                 server: str = ServerOpt, token: str = TokenOpt) -> None:
    """Upload signed bundles (verified by the server before they are accepted)."""
    for f in files:
        b = _call(server, token, "POST", "/api/v1/bundles", content=f.read_bytes(),
                  headers={"Content-Type": "application/octet-stream"})
        what = f"{b['name']} {b['version']}"
        if b.get("created", True):
            typer.echo(f"pushed {what} (release {b['release_counter']}, {b['content_digest'][:12]})")
        else:
            typer.echo(f"{what} is already on the server with the same signed files; nothing to do")


@bundles_app.command("push-targets")
def bundles_push_targets(targets: Path = typer.Argument(..., exists=True, dir_okay=False,
                                                        help="KEYS/repo/targets.json from the workstation."),
                         server: str = ServerOpt, token: str = TokenOpt) -> None:
    """Publish newer signed targets metadata alone, e.g. after `edgepack keys raise-floor` (no bundle needed)."""
    body = _call(server, token, "PUT", "/api/v1/admin/trust/targets", content=targets.read_bytes(),
                 headers={"Content-Type": "application/json"})
    typer.echo(f"the server publishes targets v{body['targets_version']}")


@bundles_app.command("list")
def bundles_list(name: str | None = typer.Option(None), server: str = ServerOpt, token: str = TokenOpt,
                 as_json: bool = JsonOpt) -> None:
    """Bundles on the server."""
    rows = _call(server, token, "GET", "/api/v1/bundles", params={"name": name} if name else None)
    if as_json:
        _json(rows)
        return
    _table([[b["name"], b["version"], b["release_counter"], ",".join(b["hardware_ids"]), b["archive_size"],
             b["uploaded_at"][:19]] for b in rows], ["name", "version", "release", "hardware", "bytes", "uploaded"])


@bundles_app.command("show")
def bundles_show(name: str, version: str, server: str = ServerOpt, token: str = TokenOpt,
                 as_json: bool = JsonOpt) -> None:
    """One bundle: release, hardware, variants and signed files (--json: with the whole manifest)."""
    b = _call(server, token, "GET", f"/api/v1/bundles/{name}/{version}")
    if as_json:
        _json(b)
        return
    typer.echo(f"{b['name']} {b['version']} (release {b['release_counter']}), content digest {b['content_digest']}, "
               f"uploaded {b['uploaded_at'][:19]} by {b['uploaded_by']}; hardware {', '.join(b['hardware_ids'])}")
    variants = (b.get("manifest") or {}).get("variants", [])
    _table([[v.get("id"), v.get("format"), v.get("precision"), (v.get("metric") or {}).get("value"),
             v.get("size_bytes")] for v in variants], ["variant", "format", "precision", "metric", "bytes"])
    _table([[f.get("path"), f.get("length"), str(f.get("sha256", ""))[:16]] for f in b.get("files") or []],
           ["file", "bytes", "sha256"])


@bundles_app.command("delete")
def bundles_delete(name: str, version: str, reason: str = ReasonOpt, server: str = ServerOpt,
                   token: str = TokenOpt) -> None:
    """Delete a bundle no rollout or device uses (admin)."""
    _call(server, token, "DELETE", f"/api/v1/bundles/{name}/{version}", params={"reason": reason})
    typer.echo(f"deleted {name} {version}")


# ---- devices --------------------------------------------------------------------------------------------
@devices_app.command("list")
def devices_list(group: str | None = typer.Option(None), tag: list[str] = typer.Option([], help="key=value"),
                 hardware_id: str | None = typer.Option(None), server: str = ServerOpt, token: str = TokenOpt,
                 as_json: bool = JsonOpt) -> None:
    """Devices with their inventory (active bundle, agent, last seen)."""
    params: dict[str, Any] = {"tag": tag}
    if group:
        params["group"] = group
    if hardware_id:
        params["hardware_id"] = hardware_id
    body = _call(server, token, "GET", "/api/v1/devices", params=params)
    if as_json:
        _json(body)
        return
    _table([[d["device_id"], d["hardware_id"], d["group"], ",".join(f"{k}={v}" for k, v in d["tags"].items()),
             f"{d['active']['name']} {d['active']['version']}" if d["active"] else "-",
             f"{d['assigned']['version']} ({d['assigned']['reason']})" if d["assigned"] else "-",
             d["agent_version"], d["state"], (d["last_seen_at"] or "")[:19]] for d in body["devices"]],
           ["device", "hardware", "group", "tags", "active", "assigned", "agent", "state", "last seen"])
    typer.echo(f"{body['total']} device(s)")


@devices_app.command("show")
def devices_show(device_id: str, server: str = ServerOpt, token: str = TokenOpt, as_json: bool = JsonOpt) -> None:
    """One device: inventory, assignment, runtimes, last check-in."""
    d = _call(server, token, "GET", f"/api/v1/devices/{device_id}")
    if as_json:
        _json(d)
        return
    _table([[key, json.dumps(value) if isinstance(value, (dict, list)) else value] for key, value in d.items()],
           ["field", "value"])


@devices_app.command("revoke")
def devices_revoke(device_id: str, reason: str = ReasonOpt, server: str = ServerOpt, token: str = TokenOpt) -> None:
    """Revoke a device: its credential and broker account stop working at once (it is disconnected).

    Idempotent: if the broker could not be reached, the server says so; run the same command again."""
    d = _call(server, token, "POST", f"/api/v1/devices/{device_id}/revoke", json={"reason": reason})
    typer.echo(f"revoked {d['device_id']} at {d['revoked_at']}")


# ---- rollouts -------------------------------------------------------------------------------------------
@rollout_app.command("create")
def rollout_create(
    name: str, version: str,
    group: str | None = typer.Option(None, help="Only devices of this group."),
    tag: list[str] = typer.Option([], help="Only devices with this tag (key=value); repeatable."),
    hardware: list[str] = typer.Option([], help="Only these hardware ids; repeatable."),
    device: list[str] = typer.Option([], help="Only these device ids; repeatable."),
    phases: str | None = typer.Option(None, help="Percentages, e.g. 1,10,50,100 (server default otherwise)."),
    soak: float | None = typer.Option(None, help="Minimum soak time per phase, seconds."),
    min_devices: int | None = typer.Option(None, help="Minimum reporting devices per phase."),
    gate: list[str] = typer.Option([], help="Gate threshold, e.g. max_crash_rate=0.01 or min_accuracy=0.9."),
    canary_devices: int = typer.Option(1, help="The first phase holds at least this many devices."),
    allow_unproven: list[str] = typer.Option(
        [], help="Let phases advance while this gate has no data or an undecided interval (audited); repeatable."),
    on_breach: str = typer.Option("rollback", help="rollback or halt."),
    start: bool = typer.Option(False, help="Start right away."),
    reason: str = ReasonOpt, server: str = ServerOpt, token: str = TokenOpt, as_json: bool = JsonOpt,
) -> None:
    """Create a rollout of bundle NAME VERSION to the selected devices."""
    selector: dict[str, Any] = {}
    if group:
        selector["group"] = group
    if tag:
        selector["tags"] = _kv(tag, "--tag")
    if hardware:
        selector["hardware_ids"] = hardware
    if device:
        selector["device_ids"] = device
    gates = {key: _gate_value(value) for key, value in _kv(gate, "--gate").items()}
    if allow_unproven:
        given = gates.get("allow_unproven") or []
        gates["allow_unproven"] = [*([given] if isinstance(given, str) else given),
                                   *(g.strip() for a in allow_unproven for g in a.split(",") if g.strip())]
    body: dict[str, Any] = {"bundle": {"name": name, "version": version}, "selector": selector,
                            "on_breach": on_breach, "start": start, "reason": reason, "gates": gates,
                            "canary_devices": canary_devices}
    if phases:
        body["phases"] = [float(p) for p in phases.replace("/", ",").split(",") if p.strip()]
    if soak is not None:
        body["min_soak_s"] = soak
    if min_devices is not None:
        body["min_devices"] = min_devices
    status = _call(server, token, "POST", "/api/v1/rollouts", json=body)
    if as_json:
        _json(status)
        return
    typer.echo(f"rollout {status['id']} ({status['state']}): {sum(p['devices'] for p in status['phases'])} devices")


def _gate_value(value: str) -> Any:
    """``off``/``none`` turn a gate off; numbers are numbers; ``a,b`` is a list (allow_unproven). The server
    checks names and values and lists the known gates when one is wrong."""
    if value.strip().lower() in ("off", "none"):
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return [v.strip() for v in value.split(",") if v.strip()] if "," in value else value


@rollout_app.command("list")
def rollout_list(state: str | None = typer.Option(None, help="Only rollouts in this state."),
                 server: str = ServerOpt, token: str = TokenOpt, as_json: bool = JsonOpt) -> None:
    """Rollouts, newest first."""
    rows = _call(server, token, "GET", "/api/v1/rollouts", params={"state": state} if state else None)
    if as_json:
        _json(rows)
        return
    _table([[r["id"], f"{r['bundle']['name']} {r['bundle']['version']}", r["state"], r["current_phase"],
             json.dumps(r["selector"]), r["created_at"][:19]] for r in rows],
           ["id", "bundle", "state", "phase", "selector", "created"])


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _interval(g: dict[str, Any]) -> str:
    """The gate's always-valid interval, e.g. ``[0.012, 0.081] 99.8%``; ``-`` when it has none."""
    lower, upper, alpha = g.get("lower"), g.get("upper"), g.get("alpha")
    if lower is None and upper is None:
        return "-"
    level = f" {100 * (1 - alpha):.4g}%" if alpha else ""
    return f"[{_fmt(lower)}, {_fmt(upper) if upper is not None else 'inf'}]{level}"


def print_status(status: dict[str, Any]) -> None:
    typer.echo(f"rollout {status['id']}: {status['bundle']['name']} {status['bundle']['version']}  "
               f"state={status['state']}  phase={status['current_phase']}"
               + (f"  soaked={status['phase_soaked_s']:.0f}s" if status.get("phase_soaked_s") is not None else ""))
    _table([[p["index"], f"{p['percent']:g}%", p["status"], p["devices"], p["reporting"],
             f"{p['cumulative_reporting']}/{p['cumulative_required']}", f"{p['min_soak_s']:g}s"]
            for p in status["phases"]],
           ["phase", "share", "status", "devices", "reporting", "reporting/required (cum.)", "min soak"])
    _table([[g["name"], g["status"], _fmt(g["value"]), _interval(g), f"{g['comparison']} {_fmt(g['threshold'])}",
             g["detail"]] for g in status["decision"]["gates"]],
           ["gate", "status", "value", "interval", "threshold", "detail"])
    need = status.get("devices_to_halt")
    if need and status["phases"] and status["phases"][0]["devices"] < need:
        typer.echo(f"note: the first phase has {status['phases'][0]['devices']} device(s); the crash and install "
                   f"gates can halt only from {need} (create with --canary-devices {need})")
    typer.echo(f"next: {status['decision']['verdict']} ({status['decision']['reason']})")
    if status.get("halt"):
        typer.echo(f"halted: {status['halt'].get('reason')}")
        if status["halt"].get("rollback_refused"):
            typer.echo(f"not rolled back: {status['halt']['rollback_refused']}")


@rollout_app.command("status")
def rollout_status(rollout_id: str, server: str = ServerOpt, token: str = TokenOpt, as_json: bool = JsonOpt) -> None:
    """Each phase's progress and every gate's value against its threshold."""
    status = _call(server, token, "GET", f"/api/v1/rollouts/{rollout_id}")
    if as_json:
        _json(status)
    else:
        print_status(status)


def _action(action: str) -> Any:
    def command(rollout_id: str, reason: str = ReasonOpt, server: str = ServerOpt, token: str = TokenOpt,
                as_json: bool = JsonOpt) -> None:
        status = _call(server, token, "POST", f"/api/v1/rollouts/{rollout_id}/{action}", json={"reason": reason})
        if as_json:
            _json(status)
            return
        typer.echo(f"rollout {rollout_id}: {status['state']}, phase {status['current_phase']}")

    command.__doc__ = f"{action.capitalize()} a rollout (recorded in the audit log with --reason)."
    return command


for _name in ("start", "pause", "resume", "advance", "abort", "rollback"):
    rollout_app.command(_name)(_action(_name))


@rollout_app.command("audit")
def rollout_audit(rollout_id: str, server: str = ServerOpt, token: str = TokenOpt, as_json: bool = JsonOpt) -> None:
    """Every transition with who and why."""
    rows = _call(server, token, "GET", f"/api/v1/rollouts/{rollout_id}/audit")
    if as_json:
        _json(rows)
        return
    _table([[e["at"][:19], e["actor"], e["action"], e["reason"]] for e in reversed(rows)],
           ["at", "actor", "action", "reason"])


# ---- tokens ---------------------------------------------------------------------------------------------
@enroll_app.command("create")
def enroll_create(uses: int = typer.Option(1), group: str | None = typer.Option(None),
                  tag: list[str] = typer.Option([], help="key=value"), ttl_s: int | None = typer.Option(None),
                  server: str = ServerOpt, token: str = TokenOpt, as_json: bool = JsonOpt) -> None:
    """A token devices trade for their own credential at enrollment. Prints only the token (shown once), so
    TOKEN=$(edgepack enroll-token create) captures it; --json adds its id, uses and expiry."""
    body = _call(server, token, "POST", "/api/v1/admin/enrollment-tokens",
                 json={"uses": uses, "group": group, "tags": _kv(tag, "--tag"), "ttl_s": ttl_s})
    if as_json:
        _json(body)
        return
    typer.echo(body["token"])


@tokens_app.command("create")
def tokens_create(name: str = typer.Option(..., help="A name for the token (shown in the audit log)."),
                  role: str = typer.Option("viewer", help="admin, operator or viewer."), server: str = ServerOpt,
                  token: str = TokenOpt, as_json: bool = JsonOpt) -> None:
    """Create an API token. Prints only the token (shown once); --json adds its id and role."""
    body = _call(server, token, "POST", "/api/v1/admin/tokens", json={"name": name, "role": role})
    if as_json:
        _json(body)
        return
    typer.echo(body["token"])


@tokens_app.command("list")
def tokens_list(server: str = ServerOpt, token: str = TokenOpt, as_json: bool = JsonOpt) -> None:
    """API tokens (never their secrets)."""
    rows = _call(server, token, "GET", "/api/v1/admin/tokens")
    if as_json:
        _json(rows)
        return
    _table([[t["id"], t["name"], t["role"], t["created_at"][:19], t["revoked"]] for t in rows],
           ["id", "name", "role", "created", "revoked"])


@tokens_app.command("revoke")
def tokens_revoke(token_id: str, server: str = ServerOpt, token: str = TokenOpt) -> None:
    """Revoke an API token at once."""
    _call(server, token, "DELETE", f"/api/v1/admin/tokens/{token_id}")
    typer.echo(f"revoked {token_id}")


def register(app: typer.Typer) -> None:
    """Add the admin sub-commands to the ``edgepack`` CLI."""
    app.add_typer(bundles_app, name="bundles")
    app.add_typer(devices_app, name="devices")
    app.add_typer(rollout_app, name="rollout")
    app.add_typer(enroll_app, name="enroll-token")
    app.add_typer(tokens_app, name="tokens")
