"""`edgepack keys ...`, `edgepack assemble`, `edgepack inspect`, `edgepack verify`.

Exit codes of `edgepack verify` (documented in docs/bundle-format.md):
  0 verified; 1 verification failed (signature, hash, missing/extra file, expiry, rollback, hardware);
  2 usage error; 3 malformed or unsafe archive; 4 trust root or key directory unusable.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from bundles.errors import ArchiveError, BundleError, FormatError, KeyStoreError, VerificationError
from edgepack._console import cli_console, plain

EXIT_OK, EXIT_VERIFY, EXIT_USAGE, EXIT_FORMAT, EXIT_TRUST = 0, 1, 2, 3, 4

keys_app = typer.Typer(help="Create and rotate the offline signing keys and trust roots.", no_args_is_help=True)
err = cli_console(stderr=True)
out = cli_console()


def _fail(exc: BundleError) -> None:
    if isinstance(exc, VerificationError):
        code, kind = EXIT_VERIFY, "verification failed"
    elif isinstance(exc, (ArchiveError, FormatError)):
        code, kind = EXIT_FORMAT, "malformed or unsafe bundle"
    elif isinstance(exc, KeyStoreError):
        code, kind = EXIT_TRUST, "trust/key problem"
    else:
        code, kind = EXIT_VERIFY, "error"
    err.print(f"[bold red]{kind}[/] ({type(exc).__name__}): {plain(exc)}", markup=True, highlight=False)
    raise typer.Exit(code)


@keys_app.command("init")
def keys_init(
    out_dir: Path = typer.Option(..., "--out", help="New key directory (must not exist or be empty)."),
    root_keys: int = typer.Option(3, help="Number of root keys."),
    root_threshold: int = typer.Option(2, help="Root signatures required."),
    targets_keys: int = typer.Option(1, help="Number of targets (bundle signing) keys."),
    targets_threshold: int = typer.Option(1, help="Targets signatures required."),
    expires_days: int = typer.Option(365, help="Root expiry in days."),
) -> None:
    """Create a key set and trust roots (image repository and director) with thresholds."""
    from bundles.keys import KeyStore

    try:
        ks = KeyStore.init(out_dir, root_keys=root_keys, root_threshold=root_threshold,
                           targets_keys=targets_keys, targets_threshold=targets_threshold,
                           expires=timedelta(days=expires_days))
    except BundleError as exc:
        _fail(exc)
        return
    _print_roles(ks.role_summary())
    out.print(f"\nTrust root for devices and servers: [bold]{plain(ks.root_path)}[/]")
    out.print(f"Online keys for the update server:  [bold]{plain(out_dir / 'online')}[/] (copy this folder only)")
    out.print(f"Offline keys (keep off any server):  [bold]{plain(out_dir / 'private')}[/]")


def _print_roles(summary: dict[str, dict[str, Any]]) -> None:
    table = Table(title="roles")
    for col in ("role", "threshold", "keys", "present here"):
        table.add_column(col)
    for role, info in summary.items():
        keyids = info.get("keyids", [])
        table.add_row(role, str(info.get("threshold", "-")), ", ".join(k[:12] for k in keyids),
                      str(len(info.get("present_here", keyids))))
    out.print(table)


@keys_app.command("rotate")
def keys_rotate(
    keys: Path = typer.Option(..., "--keys", help="Key directory."),
    role: str = typer.Option(..., help="root | targets | snapshot | timestamp"),
    add: int = typer.Option(1, help="New keys to generate for the role."),
    revoke: list[str] = typer.Option([], help="Key id (or unique prefix) to revoke; repeatable."),
    threshold: int | None = typer.Option(None, help="New threshold for the role."),
) -> None:
    """Rotate a role's keys: writes root N+1, signed by the old and the new root keys."""
    from bundles.keys import KeyStore

    try:
        ks = KeyStore.load(keys)
        new = ks.rotate(role, add_keys=add, revoke=revoke, threshold=threshold)
    except BundleError as exc:
        _fail(exc)
        return
    out.print(f"root is now version {new.signed.version}; publish {plain(ks.root_path)} to the update server "
              "(`edgepack bundles push` sends it with the next bundle) so devices walk the rotation")
    _print_roles(ks.role_summary())


@keys_app.command("raise-floor")
def keys_raise_floor(
    keys: Path = typer.Option(..., "--keys", help="Key directory."),
    name: str = typer.Option(..., help="Model name."),
    release_counter: int = typer.Option(..., help="Lowest release counter that may still run."),
) -> None:
    """Withdraw old versions for good: devices refuse any bundle of NAME below this release counter."""
    from bundles.keys import KeyStore

    try:
        md = KeyStore.load(keys).sign_targets(floors={name: release_counter})
    except BundleError as exc:
        _fail(exc)
        return
    out.print(f"targets version {md.signed.version}: floor of {plain(repr(name))} is {release_counter}")


@keys_app.command("show")
def keys_show(keys: Path = typer.Option(..., "--keys", help="Key directory."),
              as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Show roles, thresholds, key ids and which private keys are here."""
    from bundles.keys import KeyStore

    try:
        summary = KeyStore.load(keys).role_summary()
    except BundleError as exc:
        _fail(exc)
        return
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
        return
    _print_roles(summary)


def assemble(
    source: Path = typer.Argument(..., help="Directory with manifest.json and every file it references."),
    keys: Path = typer.Option(..., "--keys", help="Key directory (needs a threshold of targets keys)."),
    out_path: Path = typer.Option(..., "--out", help="Bundle file to write (.edgepack)."),
    expires_days: int = typer.Option(365, help="Expiry of the signed targets metadata."),
) -> None:
    """Assemble and sign a bundle from files, without the converter."""
    from bundles.assemble import assemble_bundle
    from bundles.keys import KeyStore

    try:
        manifest = json.loads((source / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        err.print(f"cannot read {plain(source / 'manifest.json')}: {plain(exc)}")
        raise typer.Exit(EXIT_FORMAT) from exc
    files = {str(p.relative_to(source)): p for p in sorted(source.rglob("*"))
             if p.is_file() and p.name != "manifest.json"}
    try:
        info = assemble_bundle(out_path, keystore=KeyStore.load(keys), manifest=manifest, files=files,
                               expires_days=expires_days)
    except BundleError as exc:
        _fail(exc)
        return
    out.print(f"wrote {plain(info.path)}: {plain(info.name)} {info.version} (release {info.release_counter}), "
              f"content digest {info.content_digest}, targets v{info.targets_version}")


def inspect(
    bundle: Path = typer.Argument(..., help="Bundle file."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show what a bundle holds. This does NOT verify it: use `edgepack verify`."""
    from bundles.inspect import inspect_bundle

    try:
        report = inspect_bundle(bundle)
    except BundleError as exc:
        _fail(exc)
        return
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2, sort_keys=True) + "\n")
        return
    m = report["manifest"]
    out.print(f"[bold]{plain(m.get('name'))} {plain(m.get('version'))}[/] release {m.get('release_counter')}  "
              f"[yellow](not verified: run `edgepack verify --trust ROOT`)[/]")
    out.print(f"content digest {report['content_digest']}   targets v{report['targets']['version']} "
              f"expires {report['targets']['expires']}   signatures {', '.join(report['targets']['signers'])}")
    compat = m.get("compatibility", {})
    out.print(plain(f"hardware {m.get('hardware_ids')}  platforms {compat.get('platforms')}  "
                    f"runtimes {compat.get('runtimes')}  min agent {compat.get('min_agent_version')}"))
    table = Table(title="variants")
    for col in ("id", "format", "precision", "metric", "delta", "size"):
        table.add_column(col)
    for v in m.get("variants", []):
        metric = v.get("metric") or {}
        table.add_row(v.get("id", "?"), v.get("format", "?"), v.get("precision", "?"),
                      f"{metric.get('name', '')} {metric.get('value', '')}", str(metric.get("delta", "")),
                      str(v.get("size_bytes", "")))
    out.print(table)
    if m.get("profiles"):
        out.print("profiles: " + plain("; ".join(f"{k} -> {', '.join(v)}" for k, v in m["profiles"].items())))
    files = Table(title="files")
    files.add_column("path")
    files.add_column("bytes", justify="right")
    files.add_column("sha256")
    for f in report["files"]:
        files.add_row(f["path"], str(f["length"]), f["sha256"][:16] + "...")
    out.print(files)


def verify(
    bundle: Path = typer.Argument(..., help="Bundle file."),
    trust: Path = typer.Option(..., "--trust", help="Trusted root.json (or a key directory)."),
    hardware_id: str | None = typer.Option(None, help="Refuse bundles not signed for this hardware id."),
    state: Path | None = typer.Option(None, help="Directory persisting trust (newest root, targets, floors)."),
    extract: Path | None = typer.Option(None, help="Extract the verified files into this new directory."),
    selftest: bool = typer.Option(False, help="Also run every variant's golden vectors with installed runtimes."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Verify every file of a bundle against the trust root. Exit codes: 0 ok, 1 refused, 3 malformed, 4 trust."""
    from bundles.trust import TrustStore
    from bundles.verify import verify_archive

    tmp = None
    try:
        store = TrustStore.open(state, initial_root=trust) if state else TrustStore.from_root_file(trust)
        if extract is None:
            tmp = Path(tempfile.mkdtemp(prefix="edgepack-verify-"))
            dest = tmp / "bundle"
        else:
            dest = extract
        vb = verify_archive(bundle, store, dest, hardware_id=hardware_id)
        store.save()
        checks: dict[str, str] = {}
        if selftest:
            from bundles.runtime import available_runtimes
            from bundles.selftest import run_golden

            installed = available_runtimes()
            for v in vb.manifest.variants:
                if v.runtime not in installed:
                    checks[v.id] = f"skipped ({v.runtime} not installed)"
                    continue
                run_golden(vb, v.id)
                checks[v.id] = "golden vectors pass"
    except BundleError as exc:
        _fail(exc)
        return
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    result = {"verified": True, "name": vb.name, "version": vb.version, "release_counter": vb.release_counter,
              "content_digest": vb.content_digest, "targets_version": vb.targets_version,
              "files": sorted(vb.files), "selftest": checks}
    if extract is not None:
        result["extracted_to"] = str(extract)
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        out.print(f"[green]verified[/] {plain(vb.name)} {plain(vb.version)} (release {vb.release_counter}): "
                  f"{len(vb.files)} files, content digest {vb.content_digest}")
        for vid, msg in checks.items():
            out.print(plain(f"  {vid}: {msg}"))


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")
    app.command("assemble")(assemble)
    app.command("inspect")(inspect)
    app.command("verify")(verify)
