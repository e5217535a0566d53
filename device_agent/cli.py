"""``edgepack-agent``: run the daemon, enroll a device, show its status, or act as a TUF client.

::

    edgepack-agent run --config /etc/edgepack/agent.toml
    edgepack-agent enroll --config /etc/edgepack/agent.toml --token TOKEN [--tag site=berlin]
    edgepack-agent status --config /etc/edgepack/agent.toml
    edgepack-agent tuf --metadata-dir DIR ... (init | refresh | download)    # see docs/tuf-client.md

Exit codes: 0 success, 1 failure (with the reason on stderr), 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from device_agent import AGENT_VERSION
from device_agent.config import AgentConfig, load_config
from device_agent.errors import AgentError, ConfigError

log = logging.getLogger("edgepack-agent")

#: Optional cloud-KMS signer backends that securesystemslib imports eagerly when they are installed. The
#: agent only verifies signatures, never signs: blocking them keeps ~10 MB of boto3 out of the daemon.
UNUSED_SIGNER_BACKENDS = ("boto3", "botocore", "google.cloud.kms", "azure.identity", "azure.keyvault", "hvac",
                          "PyKCS11", "sigstore")


def _block_unused_imports() -> None:
    for name in UNUSED_SIGNER_BACKENDS:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]  # None in sys.modules makes import raise


def _sd_notify(message: str) -> None:
    """systemd notification (READY=1, WATCHDOG=1, STOPPING=1); a no-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.connect(addr)
            s.sendall(message.encode())
        except OSError:
            pass


def _watchdog(agent: object, stop: threading.Event) -> None:
    """Ping systemd's watchdog at half its interval while the acting thread shows progress."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec or not usec.isdigit():
        return
    interval = int(usec) / 1e6
    while not stop.wait(interval / 2):
        beat = getattr(agent, "heartbeat", time.monotonic())
        if time.monotonic() - beat < interval:
            _sd_notify("WATCHDOG=1")


def cmd_run(config: AgentConfig) -> int:
    from device_agent.api import LocalApi
    from device_agent.machine import Agent

    agent = Agent(config)
    agent.boot()
    metrics = None
    if config.api.metrics:
        from device_agent.metrics import renderer

        metrics = renderer(agent)
    api = LocalApi(agent, config.api.listen, max_body=config.api.max_request_bytes, metrics=metrics).start()
    log.info("local API on %s", api.address)

    def on_signal(signum: int, frame: object) -> None:
        log.info("signal %s: stopping", signum)
        agent.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stop_watchdog = threading.Event()
    threading.Thread(target=_watchdog, args=(agent, stop_watchdog), daemon=True).start()
    _sd_notify("READY=1")
    try:
        agent.run()
    finally:
        _sd_notify("STOPPING=1")
        stop_watchdog.set()
        api.close()
        agent.close()
    return 0


def cmd_enroll(config: AgentConfig, token: str, tags: list[str]) -> int:
    from device_agent.connection import http_transport, save_enrollment
    from device_agent.server import ServerClient
    from device_agent.steps import platform_name
    from device_agent.update import installed_runtimes

    tag_map = dict(t.split("=", 1) for t in tags)
    client = ServerClient(config.server.url, http_transport(config), timeout_s=config.server.request_timeout_s)
    answer = client.enroll(token, {"device_id": config.device_id, "hardware_id": config.hardware_id,
                                   "platform": platform_name(), "agent_version": AGENT_VERSION,
                                   "runtimes": {k: v.split(" ")[-1] for k, v in installed_runtimes().items()},
                                   "tags": tag_map})
    save_enrollment(config, answer)
    broker = " and broker password" if (answer.get("mqtt") or {}).get("password") else ""
    print(f"enrolled {config.device_id}; credential{broker} stored in {config.state_dir}")
    return 0


def cmd_status(config: AgentConfig) -> int:
    from device_agent.store import Store

    record = Store(config.state_dir).load()
    doc = record.to_dict()
    try:
        from device_agent.client import AgentClient

        with AgentClient(config.api.listen, timeout=2) as client:
            doc["live"] = client.status()
    except OSError:
        doc["live"] = None
    print(json.dumps(doc, indent=1, sort_keys=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from device_agent import tuf_client

    p = argparse.ArgumentParser(prog="edgepack-agent", description="edgepack device agent")
    p.add_argument("--version", action="version", version=f"edgepack-agent {AGENT_VERSION}")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", required=True, type=Path)
    enroll = sub.add_parser("enroll", help="enroll this device with an operator's one-time token")
    enroll.add_argument("--config", required=True, type=Path)
    enroll.add_argument("--token", required=True)
    enroll.add_argument("--tag", action="append", default=[], help="KEY=VALUE, repeatable")
    status = sub.add_parser("status", help="print the persisted state (and the live status if running)")
    status.add_argument("--config", required=True, type=Path)
    tuf = sub.add_parser("tuf", help="TUF client for the tuf-conformance suite (docs/tuf-client.md)")
    tuf_client.build_parser(tuf)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    _block_unused_imports()  # before anything imports TUF (the parser imports the TUF client)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.command == "tuf":
        from device_agent import tuf_client

        return tuf_client.run(args)
    try:
        config = load_config(args.config)
        if args.command == "run":
            return cmd_run(config)
        if args.command == "enroll":
            return cmd_enroll(config, args.token, args.tag)
        if args.command == "status":
            return cmd_status(config)
    except ConfigError as exc:
        print(f"edgepack-agent: configuration error: {exc}", file=sys.stderr)
        return 2
    except AgentError as exc:
        print(f"edgepack-agent {args.command}: {exc.code}: {exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
