"""`edgepack demo`: the whole system on one machine, on embedded defaults.

It starts a broker (mosquitto, or amqtt when mosquitto is not installed) and the update server (SQLite,
local files), builds the digits example with the converter, enrolls a fleet of simulated devices running
the real agent (each with its own state directory, credential, worker process and local API), sends them
predictions and feedback, and runs four rollouts:

1. ``1.0.0`` to the whole fleet (the starting point: its error and accuracy gates, which have no traffic
   and no previous version to compare with, are waived explicitly with ``allow_unproven``);
2. ``1.1.0`` through 1 → 10 → 50 → 100 % (the first phase holds 3 devices, the fewest on which the crash
   gate can act), advancing on its own as each gate's interval shows it within its limit;
3. ``1.2.0``, a model that is much less accurate: the accuracy gate halts it in the first phase and the
   fleet is rolled back;
4. ``1.3.0``, a model that kills its worker: the install-failure and crash gates halt it in the first
   phase and the fleet is rolled back.

Then it prints where to look and cleans up (``--keep`` leaves everything running until Ctrl-C).
"""

from __future__ import annotations

import random
import shutil
import signal
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table

HARDWARE = "x86-kiosk"
FINAL = {"completed", "halted", "rolled_back", "aborted"}


@dataclass
class Outcome:
    version: str
    rollout_id: str
    state: str
    phase_reached: int
    seconds: float
    reason: str
    gates: list[dict[str, Any]] = field(default_factory=list)


class Traffic(threading.Thread):
    """Sends predictions to every serving device through its local API, and the true label as feedback."""

    def __init__(self, devices: list[Any], rate_per_s: float) -> None:
        """Not started until the fleet serves a model: call ``start()``."""
        super().__init__(name="demo-traffic", daemon=True)
        from sklearn.datasets import load_digits

        digits = load_digits()
        self.images, self.labels = digits.images, digits.target
        self.devices = devices
        self.interval = 1.0 / rate_per_s
        self.stop_flag = threading.Event()
        self.sent = self.errors = 0
        self._rng = random.Random(7)

    def run(self) -> None:
        from device_agent.client import AgentClient

        clients: dict[str, AgentClient] = {}
        while not self.stop_flag.wait(self.interval):
            device = self._rng.choice(self.devices)
            i = self._rng.randrange(len(self.images))
            try:
                client = clients.setdefault(device.device_id, AgentClient(device.api_address, timeout=10))
                answer = client.predict(self.images[i:i + 1].tolist())
                client.feedback(answer["prediction_id"], str(self.labels[i]))
                self.sent += 1
            except Exception:  # a device without a model, or restarting its worker: it shows in telemetry
                self.errors += 1
                clients.pop(device.device_id, None)
        for client in clients.values():
            client.close()


def _fleet_versions(devices: list[Any]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for d in devices:
        serving = d.status().get("serving")
        counts[serving["version"] if serving else "-"] += 1
    return counts


def _render(title: str, rollout: dict[str, Any], devices: list[Any], traffic: Traffic) -> Group:
    phases = Table(title=title, expand=False)
    for col in ("phase", "share", "status", "devices", "reporting"):
        phases.add_column(col)
    for p in rollout.get("phases", []):
        phases.add_row(str(p["index"]), f"{p['percent']:g}%", p["status"], str(p["devices"]), str(p["reporting"]))
    gates = Table(title=f"gates: {rollout.get('decision', {}).get('reason', '')}", expand=False)
    for col in ("gate", "status", "value", "threshold"):
        gates.add_column(col)
    for g in rollout.get("decision", {}).get("gates", []):
        value = g["value"] if g["value"] is None else f"{g['value']:.4g}"
        gates.add_row(g["name"], g["status"], str(value), f"{g['comparison']} {g['threshold']}")
    fleet = ", ".join(f"{v}: {n}" for v, n in sorted(_fleet_versions(devices).items()))
    footer = Table.grid()
    footer.add_row(f"rollout {rollout.get('id')} is [bold]{rollout.get('state')}[/]; fleet serving {fleet}; "
                   f"{traffic.sent} predictions with feedback sent")
    return Group(phases, gates, footer)


def run_rollout(console: Console, admin: Any, devices: list[Any], traffic: Traffic, *, version: str,
                phases: list[float],
                soak: float, title: str, timeout: float, gates: dict[str, Any], canary_devices: int = 1) -> Outcome:
    t0 = time.monotonic()
    r = admin.post("/api/v1/rollouts", json={
        "bundle": {"name": "digits-cnn", "version": version}, "selector": {"hardware_ids": [HARDWARE]},
        "phases": phases, "min_soak_s": soak, "min_devices": 1, "gates": gates, "start": True,
        "canary_devices": canary_devices, "reason": f"edgepack demo: {title}"})
    if r.status_code != 201:
        raise RuntimeError(f"creating the rollout of {version} failed: {r.status_code} {r.text}")
    rid = r.json()["id"]
    body: dict[str, Any] = r.json()
    with Live(console=console, refresh_per_second=4, transient=False) as live:
        while time.monotonic() - t0 < timeout:
            body = admin.get(f"/api/v1/rollouts/{rid}").json()
            live.update(_render(title, body, devices, traffic))
            if body["state"] in FINAL:
                break
            time.sleep(0.5)
    halt = body.get("halt") or {}
    reason = halt.get("reason") or body.get("decision", {}).get("reason", "")
    return Outcome(version, rid, body["state"], int(body.get("current_phase") or 0), time.monotonic() - t0,
                   str(reason), body.get("decision", {}).get("gates", []))


def _wait_fleet(devices: list[Any], version: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _fleet_versions(devices) == Counter({version: len(devices)}):
            return True
        time.sleep(0.5)
    return False


def demo(
    devices: int = typer.Option(20, help="Simulated devices (each runs the real agent and a worker process)."),
    soak: float = typer.Option(8.0, help="Minimum soak time of each phase, in seconds."),
    workdir: Path | None = typer.Option(None, help="Where to put everything (default: a temporary directory)."),
    keep: bool = typer.Option(False, help="Keep the server, broker and devices running until Ctrl-C."),
    rate: float = typer.Option(40.0, help="Predictions per second across the fleet."),
    broker_kind: str = typer.Option("auto", "--broker",
                                    help="auto (mosquitto if installed, else amqtt), mosquitto or amqtt."),
) -> None:
    """Run the whole system on this machine: build, sign, enroll a fleet, roll out good and bad versions."""
    import logging

    from bundles.keys import KeyStore
    from bundles.trust import TrustStore
    from bundles.verify import verify_archive
    from edgepack import _local, tls
    from edgepack._console import cli_console
    from edgepack.demo_bundles import add_memory_bomb, build_digits, confuse_classes, derive_bundle

    logging.basicConfig(level=logging.WARNING)
    signal.signal(signal.SIGTERM, _terminate)  # `kill`, `timeout`, a closed terminal: clean up as on Ctrl-C
    console = cli_console()
    own = workdir is None
    failed = interrupted = kept = False
    work = Path(tempfile.mkdtemp(prefix="edgepack-demo-")) if workdir is None else workdir
    work.mkdir(parents=True, exist_ok=True)
    broker = server = None
    fleet: list[Any] = []
    traffic: Traffic | None = None
    outcomes: list[Outcome] = []
    t_start = time.monotonic()
    try:
        console.rule("[bold]1. keys, local CA, broker, update server")
        console.print(f"working directory: {escape(str(work))}"
                      + (" (temporary: removed at the end, also on Ctrl-C)" if own else ""))
        keys = KeyStore.init(work / "keys")
        tls_files = tls.init(work / "tls", hosts=["127.0.0.1", "localhost"])
        console.print(f"local CA: {tls_files.ca_cert} (the server's HTTPS and the broker's TLS; devices pin it)")
        broker = _local.start_broker(work, broker_kind, tls_files=tls_files)
        if broker.auth == "none":
            console.print("[bold yellow]warning:[/] amqtt runs plain MQTT on loopback WITHOUT accounts: any local "
                          "process can publish telemetry and notices (use mosquitto for the authenticated setup)")
        console.print(f"broker: {broker.kind} at {broker.url} (MQTT {broker.protocol}, accounts: {broker.auth})")
        server = _local.start_server(data_dir=work / "server", keys_dir=keys.directory, broker=broker,
                                     tls_files=tls_files, poll_interval_s=2, gate_interval_s=0.5,
                                     default_min_soak_s=soak, default_min_devices=1, gate_history_interval_s=2.0)
        console.print(f"update server: {server.url} (SQLite in {work / 'server'}); API docs {server.url}/docs")
        console.print(f"[bold]dashboard: {server.url}/ui/[/]  (sign in with the admin token {server.token}; "
                      "the rollouts below halt there live; the certificate is from the demo's local CA "
                      f"{tls_files.ca_cert}, which your browser does not know: accept it or import the CA)")

        console.rule("[bold]2. edgepack build: the digits CNN (Keras -> ONNX fp32 / int8), signed")
        base_path = build_digits(keys_dir=keys.directory, out_dir=work / "build", profiles=[HARDWARE],
                                 console=console)
        base = verify_archive(base_path, TrustStore.from_root_file(keys.root_path), work / "base")
        releases = {"1.0.0": base_path}
        releases["1.1.0"] = derive_bundle(base, keys, work / "build" / "digits-cnn-1.1.0.edgepack", version="1.1.0",
                                          release_counter=2, note="same model, new release").path
        releases["1.2.0"] = derive_bundle(base, keys, work / "build" / "digits-cnn-1.2.0.edgepack", version="1.2.0",
                                          release_counter=3, transform=confuse_classes,
                                          note="deliberately bad: three pairs of classes swapped").path
        releases["1.3.0"] = derive_bundle(base, keys, work / "build" / "digits-cnn-1.3.0.edgepack", version="1.3.0",
                                          release_counter=4, transform=add_memory_bomb, golden_from_base=True,
                                          note="deliberately bad: cannot allocate its memory, kills its worker").path
        with server.admin() as admin:
            for version, path in releases.items():
                r = admin.post("/api/v1/bundles", content=path.read_bytes())
                if r.status_code != 201:
                    raise RuntimeError(f"upload of {version} refused: {r.status_code} {r.text}")
                console.print(f"pushed digits-cnn {version} ({path.stat().st_size} bytes)")

            console.rule(f"[bold]3. enroll {devices} simulated devices (real agents, one worker process each)")
            token = admin.post("/api/v1/admin/enrollment-tokens", json={"uses": devices}).json()["token"]
            for i in range(devices):
                device = _local.make_device(
                    device_id=f"kiosk-{i:03d}", hardware_id=HARDWARE, workdir=work / "devices", server=server,
                    keys_dir=keys.directory, token=token, broker=broker,
                    agent_settings={"trial": {"period_s": 4.0, "health_interval_s": 0.5},
                                    "telemetry": {"window_s": 2.0}, "worker": {"memory_limit_mb": 2048}})
                fleet.append(device.start())
            console.print(f"{len(fleet)} devices enrolled and checking in every 2 s")
            traffic = Traffic(fleet, rate)
            # Gates decide on always-valid intervals, so a few unlucky labels do not halt a good release; 20
            # labels (and requests) are the least a gate needs before it may pass. A phase waits while a gate
            # lacks data. The first version has nothing to compare with and no traffic yet: its rollout waives
            # the error and accuracy gates explicitly (allow_unproven, recorded in the audit trail).
            gates = {"min_requests": 20, "min_feedback": 20, "max_accuracy_drop": 0.1,
                     "max_p95_latency_regression": None, "max_error_rate": 0.2}
            first = {**gates, "allow_unproven": ["error_rate", "accuracy_drop"]}
            # the crash and install gates need 3 devices failing to be sure (a 1-device canary cannot tell a
            # crashing build from bad luck), so the first phase of each phased rollout holds 3 devices
            canary = 3

            console.rule("[bold]4. roll out 1.0.0 to the whole fleet")
            outcomes.append(run_rollout(console, admin, fleet, traffic, version="1.0.0", phases=[100], soak=soak,
                                        title="1.0.0 to everyone", timeout=300, gates=first))
            if not _wait_fleet(fleet, "1.0.0", 120):
                raise RuntimeError(f"the fleet did not install 1.0.0: {dict(_fleet_versions(fleet))}")
            traffic.start()  # predictions and feedback from now on: the gates of the next rollouts read them
            console.rule("[bold]5. roll out 1.1.0 in phases 1 -> 10 -> 50 -> 100 %")
            outcomes.append(run_rollout(console, admin, fleet, traffic, version="1.1.0", phases=[1, 10, 50, 100],
                                        soak=soak, title="1.1.0 phased", timeout=600, gates=gates,
                                        canary_devices=canary))
            _wait_fleet(fleet, "1.1.0", 120)
            console.rule("[bold]6. roll out 1.2.0 (much less accurate)")
            outcomes.append(run_rollout(console, admin, fleet, traffic, version="1.2.0", phases=[1, 10, 50, 100],
                                        soak=max(soak, 30.0), title="1.2.0 (bad accuracy)", timeout=300,
                                        gates=gates, canary_devices=canary))
            _wait_fleet(fleet, "1.1.0", 120)
            console.rule("[bold]7. roll out 1.3.0 (kills its worker)")
            outcomes.append(run_rollout(console, admin, fleet, traffic, version="1.3.0", phases=[1, 10, 50, 100],
                                        soak=max(soak, 30.0), title="1.3.0 (crashes)", timeout=300, gates=gates,
                                        canary_devices=canary))
            rolled_back = _wait_fleet(fleet, "1.1.0", 120)

        _summary(console, outcomes, fleet, server, rolled_back, time.monotonic() - t_start)
        _check_dashboard(console, server, outcomes)
        expected = [("1.0.0", "completed"), ("1.1.0", "completed"), ("1.2.0", "rolled_back"),
                    ("1.3.0", "rolled_back")]
        got = [(o.version, o.state) for o in outcomes]
        failed = got != expected or not rolled_back or any(o.phase_reached != 0 for o in outcomes[2:])
        if failed:
            console.print(f"[bold red]the demo did not end as expected[/]: {escape(str(got))}")
        if keep:
            kept = True  # from here on Ctrl-C is the way to end the demo, not an interruption
            _keep(console, work, own, fleet, server, broker)
        if failed:
            raise typer.Exit(1)
    except KeyboardInterrupt:
        console.print("stopping (Ctrl-C)")
        interrupted = True
    except RuntimeError as exc:  # a step that cannot go on (a refused upload, a broker that will not start)
        console.print(f"[bold red]error:[/] {escape(str(exc))}")
        failed = True
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not leave half a cleanup
            signal.signal(sig, signal.SIG_IGN)
        if traffic is not None:
            traffic.stop_flag.set()
        for device in fleet:
            device.stop()
        if server is not None:
            server.stop()
        if broker is not None:
            broker.stop()
        if own:
            shutil.rmtree(work, ignore_errors=True)
            console.print(f"removed the demo's temporary directory {escape(str(work))}")
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if failed:
        raise typer.Exit(1)
    if interrupted and not kept:
        raise typer.Exit(130)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _keep(console: Console, work: Path, own: bool, fleet: list[Any], server: Any, broker: Any) -> None:
    """Write each device's agent.toml and addresses, print how to reach them, run until Ctrl-C."""
    from edgepack.demo_keep import predict_and_feedback_command, sample_input, write_device_files

    table = write_device_files(work, fleet, server.url, broker.url)
    sample, label = sample_input(work)
    first = fleet[0]
    toml = Path(first.extra["config"]["state_dir"]) / "agent.toml"
    console.rule("[bold]--keep: everything keeps running")
    console.print(f"each device's agent.toml and addresses: {escape(str(work / 'devices'))}/<device>/ "
                  f"(all of them: {escape(str(table))})")
    console.print(f"device {first.device_id}'s state:  edgepack-agent status --config {escape(str(toml))}")
    console.print(f"a prediction on {first.device_id} (a digit {label}):")
    console.print(escape(f"  curl -s -X POST http://{first.api_address}/v1/predict -d @{sample}"), soft_wrap=True)
    console.print("a prediction and its feedback (the true label), in one line:")
    console.print("  " + escape(predict_and_feedback_command(first.api_address, sample, label)), soft_wrap=True)
    where = "the temporary directory is removed" if own else f"{escape(str(work))} stays"
    console.print(f"[bold]press Ctrl-C to stop the devices, server and broker[/] ({where})")
    while True:
        time.sleep(3600)


def _summary(console: Console, outcomes: list[Outcome], fleet: list[Any], server: Any, rolled_back: bool,
             seconds: float) -> None:
    console.rule("[bold]summary")
    table = Table()
    for col in ("version", "rollout", "ended", "phase reached", "seconds", "why"):
        table.add_column(col)
    for o in outcomes:
        table.add_row(o.version, o.rollout_id, o.state, str(o.phase_reached), f"{o.seconds:.0f}", escape(o.reason[:90]))
    console.print(table)
    versions = _fleet_versions(fleet)
    console.print(f"fleet now serves {escape(str(dict(versions)))}; bad versions rolled back: {rolled_back}; "
                  f"demo took {seconds:.0f} s")
    console.print("\nWhere to look (while it runs, with --keep):")
    console.print(f"  dashboard:      {server.url}/ui/     (sign in with the admin token below)")
    console.print(f"  metrics:        {server.url}/metrics (Prometheus; Bearer token)")
    console.print(f"  API and docs:   {server.url}/docs     (admin token: {server.token}; CA {server.ca_file})")
    ca = f"EDGEPACK_CA_FILE={server.ca_file} " if server.ca_file else ""
    console.print(f"  devices:        {ca}edgepack devices list --server {server.url} --token {server.token}")
    for o in outcomes:
        console.print(f"  rollout {o.version}: {ca}edgepack rollout status {o.rollout_id} --server {server.url} "
                      f"--token {server.token}")


def _check_dashboard(console: Console, server: Any, outcomes: list[Outcome]) -> None:
    """The dashboard's rollout pages show each halted rollout with the gate that halted it."""
    import httpx

    shown = []
    for o in outcomes:
        breached = [g["name"] for g in o.gates if g.get("status") == "breached"]
        if o.state not in ("halted", "rolled_back") or not breached:
            continue
        page = httpx.get(f"{server.url}/ui/rollouts/{o.rollout_id}", timeout=30,
                         headers={"Authorization": f"Bearer {server.token}"},
                         verify=str(server.ca_file) if server.ca_file else True)
        shown.append(page.status_code == 200 and all(f'<td class="gate-name">{g}</td>' in page.text for g in breached))
    console.print(f"dashboard pages show the halted rollouts and their gates: {'ok' if all(shown) else 'NO'}")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
