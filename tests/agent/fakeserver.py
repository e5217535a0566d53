"""A small stand-in for the update server's device side (docs/protocol.md), for agent unit tests.

It serves a real TUF image repository (roots and targets from a real key store, snapshot and timestamp
signed with the real online keys), real bundle files with ``Range`` support, and check-ins answered with
real director-signed assignments. It can also misbehave like an attacker on the path would: tamper with a
file, drip-feed bytes, send more than the signed length, hand out another device's assignment. The
end-to-end tests use the real server (update_server); this one exists for those attacks and for speed.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tuf.api.metadata import Metadata, MetaFile, Snapshot, Timestamp

from bundles.archive import TARGETS_PREFIX, BundleArchive
from bundles.assemble import BundleInfo
from bundles.director import sign_assignment
from bundles.keys import KeyStore, OnlineKeys, dump_metadata
from bundles.verify import bundle_targets, target_prefix

_HASH = re.compile(r"^([0-9a-f]{64})\.(.+)$")


class FakeUpdateServer:
    def __init__(self, keystore: KeyStore, *, credential: str = "secret-credential") -> None:
        self.keys = keystore
        self.online = OnlineKeys.load(keystore.directory)
        self.credential = credential
        self.files: dict[str, bytes] = {}
        self.snapshot_version = 0
        self.metadata: dict[str, bytes] = {}
        self.assignments: dict[str, bytes | None] = {}
        self.assignment_versions: dict[str, int] = {}
        self.tamper: dict[str, Callable[[bytes], bytes]] = {}
        self.drip_s: float | None = None
        self.requests: list[tuple[str, str]] = []
        self.fail_targets = 0
        self.poll_interval_s = 3600.0
        self.last_checkin: dict[str, Any] = {}
        self.committed: Any = None
        """``device_id -> committed seq``: the telemetry mark this server reports at check-in (None: none)."""
        self.checkin_delay_s = 0.0
        """A hung server: each check-in is answered only after this long."""
        self.lock = threading.Lock()
        self._sign_repo()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # ---- repository ----------------------------------------------------------------------------------
    def _sign_repo(self, timestamp_expires: timedelta = timedelta(days=1)) -> None:
        now = datetime.now(timezone.utc).replace(microsecond=0)
        targets = self.keys.targets()
        self.snapshot_version += 1
        v = self.snapshot_version
        snap = Metadata(Snapshot(version=v, expires=now + timedelta(days=7),
                                 meta={"targets.json": MetaFile(version=targets.signed.version)}))
        snap.sign(self.online.snapshot)
        ts = Metadata(Timestamp(version=v, expires=now + timestamp_expires, snapshot_meta=MetaFile(version=v)))
        ts.sign(self.online.timestamp)
        with self.lock:
            for data in self.keys.root_chain():
                self.metadata[f"{Metadata.from_bytes(data).signed.version}.root.json"] = data
            self.metadata[f"{targets.signed.version}.targets.json"] = dump_metadata(targets)
            self.metadata[f"{v}.snapshot.json"] = dump_metadata(snap)
            self.metadata["timestamp.json"] = dump_metadata(ts)

    def publish(self, info: BundleInfo) -> None:
        """Make a signed bundle's files downloadable and its targets current (as an upload would)."""
        with BundleArchive(info.path) as arc:
            for member in arc.names(TARGETS_PREFIX):
                self.files[member[len(TARGETS_PREFIX):]] = arc.read_bounded(member, 1 << 30)
        self._sign_repo()

    def resign(self, **kw: Any) -> None:
        self._sign_repo(**kw)

    def assign(self, device_id: str, hardware_id: str, name: str | None, version: str | None = None, *,
               rollout_id: str | None = None, reason: str = "rollout", for_device: str | None = None,
               for_hardware: str | None = None, expires: timedelta = timedelta(hours=24),
               files_from: tuple[str, str] | None = None) -> bytes | None:
        """Sign an assignment for ``device_id`` (``for_*`` forge another binding, ``files_from`` another file list)."""
        self.assignment_versions[device_id] = self.assignment_versions.get(device_id, 0) + 1
        targets = self.keys.targets().signed
        bundle = None
        files = {}
        if name is not None:
            assert version is not None
            src = files_from or (name, version)
            signed = bundle_targets(targets, *src)
            files = {target_prefix(name, version) + rel: t for rel, t in signed.items()}
            for path, t in files.items():
                t.path = path
            rc = next(iter(signed.values())).custom["release_counter"]
            bundle = {"name": name, "version": version, "release_counter": rc}
        data = sign_assignment(self.online.director, device_id=for_device or device_id,
                               hardware_id=for_hardware or hardware_id,
                               version=self.assignment_versions[device_id], files=files, bundle=bundle,
                               now=datetime.now(timezone.utc), expires=expires,
                               extra={"rollout_id": rollout_id, "reason": reason})
        self.assignments[device_id] = data
        return data

    # ---- HTTP ----------------------------------------------------------------------------------------
    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                server.requests.append(("GET", self.path))
                if self.path.startswith("/tuf/image/targets/"):
                    return self._target(self.path[len("/tuf/image/targets/"):])
                if self.path.startswith("/tuf/image/"):
                    data = server.metadata.get(self.path[len("/tuf/image/"):])
                    return self._send(200, data) if data is not None else self._send(404, b"{}")
                self._send(404, b"{}")

            def _target(self, path: str) -> None:
                head, _, base = path.rpartition("/")
                m = _HASH.match(base)
                if m:
                    path = f"{head}/{m.group(2)}"
                data = server.files.get(path)
                if data is None:
                    return self._send(404, b"{}")
                if server.fail_targets:
                    server.fail_targets -= 1
                    return self._send(503, b"{}")
                if path in server.tamper:
                    data = server.tamper[path](data)
                start = 0
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes=") and rng.endswith("-"):
                    start = int(rng[6:-1])
                    if start >= len(data):
                        return self._send(416, b"")
                body = data[start:]
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body)))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if server.drip_s:
                    for i in range(len(body)):
                        try:
                            self.wfile.write(body[i:i + 1])
                            self.wfile.flush()
                        except OSError:
                            return
                        time.sleep(server.drip_s)
                else:
                    self.wfile.write(body)

            def do_POST(self) -> None:
                server.requests.append(("POST", self.path))
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                m = re.match(r"^/api/v1/devices/([^/]+)/checkin$", self.path)
                if not m:
                    return self._send(404, b"{}")
                if self.headers.get("Authorization") != f"Bearer {server.credential}":
                    return self._send(401, json.dumps({"error": {"code": "unauthorized", "message": "bad"}}).encode())
                server.last_checkin = json.loads(body)
                if server.checkin_delay_s:
                    time.sleep(server.checkin_delay_s)
                data = server.assignments.get(m.group(1))
                answer = {"assignment": data.decode() if data else None, "poll_interval_s": server.poll_interval_s,
                          "server_time": datetime.now(timezone.utc).isoformat()}
                if server.committed is not None:
                    answer["telemetry"] = {"committed_seq": server.committed(m.group(1))}
                self._send(200, json.dumps(answer).encode(), {"Content-Type": "application/json"})

        return Handler
