"""The update server under faults: oversize request bodies, a large upload next to live traffic, a hung database.

Everything is real: the server runs as `edgepack-server serve` in a subprocess (from the code tree given with
``--tree``, so the same script measures an older checkout for the "before" figures), bodies go over raw
sockets, the bundle is a real signed bundle padded to ``--upload-mib``, and the hung database is a private
PostgreSQL cluster frozen with SIGSTOP (postmaster and every backend).

* body limits: server RSS before and at most during a 300 MiB chunked body to the unauthenticated
  enrollment route, and how long a bundle upload announcing ``Content-Length: 5000000000`` waits for an answer;
* upload: ``/healthz`` and SQLite check-in latency (median, max) idle, and while a large bundle is uploaded
  (full speed) and verified; the ratio max-during / median-idle is what to compare across machines;
* hung database: time from the freeze to the answer of ``/readyz``, a check-in and an admin request, and from
  the thaw to the first 200 of each.

    python bench/bench_faults.py                        # this tree
    git archive <old commit> | tar -x -C /tmp/old && python bench/bench_faults.py --tree /tmp/old --label before
    python bench/bench_faults.py --write-docs           # replaces "## Faults" in docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support import services  # noqa: E402

MiB = 1024 * 1024


class Server:
    """`edgepack-server serve` from ``tree`` in a subprocess, with an admin token."""

    def __init__(self, tree: Path, work: Path, keys_dir: Path, db_url: str, **env: str) -> None:
        self.port = services.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "PYTHONPATH": str(tree), "EDGEPACK_DATA_DIR": str(work / f"data-{self.port}"),
                    "EDGEPACK_KEYS_DIR": str(keys_dir / "online"), "EDGEPACK_DATABASE_URL": db_url,
                    "EDGEPACK_PORT": str(self.port), "EDGEPACK_GATE_INTERVAL_S": "1", **env}
        out = subprocess.run([sys.executable, "-m", "update_server.cli", "create-token", "--name", "bench"],
                             env=self.env, check=True, capture_output=True, text=True, cwd=tree, timeout=300)
        self.token = out.stdout.strip().splitlines()[-1]
        self.proc = subprocess.Popen([sys.executable, "-m", "update_server.cli", "serve", "--log-level", "warning"],
                                     env=self.env, cwd=tree)
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("server did not start")
            time.sleep(0.1)
        self.admin = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=300)

    def rss_mib(self) -> float:
        return psutil.Process(self.proc.pid).memory_info().rss / MiB

    def enroll(self, device_id: str) -> str:
        token = self.admin.post("/api/v1/admin/enrollment-tokens", json={"uses": 1}).json()["token"]
        r = httpx.post(f"{self.url}/api/v1/devices/enroll", timeout=60, json={
            "enrollment_token": token, "device_id": device_id, "hardware_id": "x86-kiosk"})
        r.raise_for_status()
        return str(r.json()["credential"])

    def stop(self) -> None:
        if hasattr(self, "admin"):
            self.admin.close()
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)


def _status_of(sock: socket.socket, timeout: float) -> int | None:
    sock.settimeout(timeout)
    try:
        data = sock.recv(4096)
    except (TimeoutError, ConnectionResetError):
        return None
    return int(data.split()[1]) if data.startswith(b"HTTP/1.1 ") else None


# ---- body limits ----------------------------------------------------------------------------------------
def bench_body_limits(server: Server, body_mib: int) -> dict[str, Any]:
    rss_before = server.rss_mib()
    peak = [rss_before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            with contextlib.suppress(psutil.Error):
                peak[0] = max(peak[0], server.rss_mib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    head = (b"POST /api/v1/devices/enroll HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    frame = f"{MiB:x}\r\n".encode() + b" " * MiB + b"\r\n"
    sent = 0
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=120) as sock:
        sock.sendall(head)
        while sent < body_mib * MiB:
            if select.select([sock], [], [], 0)[0]:
                break
            try:
                sock.sendall(frame)
            except OSError:
                break
            sent += MiB
        else:
            with contextlib.suppress(OSError):
                sock.sendall(b"0\r\n\r\n")
        chunked_status = _status_of(sock, 120)
    chunked_s = time.monotonic() - t0
    time.sleep(0.5)
    stop.set()
    sampler.join(5)
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall((f"POST /api/v1/bundles HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {server.token}\r\n"
                      "Content-Length: 5000000000\r\n\r\n").encode())
        declared_status = _status_of(sock, 10)
    return {"rss_before_mib": round(rss_before, 1), "rss_peak_mib": round(peak[0], 1),
            "chunked_body_mib": body_mib, "chunked_sent_mib": round(sent / MiB, 1), "chunked_status": chunked_status,
            "chunked_s": round(chunked_s, 2), "declared_status": declared_status,
            "declared_answer_s": round(time.monotonic() - t0, 3) if declared_status else None}


# ---- healthz and check-ins during a large upload ---------------------------------------------------------
def _probe_loop(server: Server, credential: str, stop: threading.Event) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"healthz": [], "checkin": []}
    body = {"state": "idle", "agent_version": "0.1.0"}
    with httpx.Client(base_url=server.url, timeout=120) as client:
        while not stop.is_set():
            t0 = time.monotonic()
            client.get("/healthz").raise_for_status()
            out["healthz"].append(time.monotonic() - t0)
            t0 = time.monotonic()
            client.post("/api/v1/devices/bench-1/checkin", json=body,
                        headers={"Authorization": f"Bearer {credential}"}).raise_for_status()
            out["checkin"].append(time.monotonic() - t0)
            time.sleep(0.02)
    return out


def _summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "median_ms": round(statistics.median(values) * 1000, 1),
            "max_ms": round(max(values) * 1000, 1)}


def bench_upload(server: Server, bundle: Path) -> dict[str, Any]:
    credential = server.enroll("bench-1")
    results: dict[str, Any] = {}
    for phase in ("idle", "upload"):
        stop = threading.Event()
        box: dict[str, Any] = {}
        prober = threading.Thread(target=lambda: box.update(_probe_loop(server, credential, stop)))  # noqa: B023
        prober.start()
        t0 = time.monotonic()
        if phase == "idle":
            time.sleep(3)
        else:
            with bundle.open("rb") as fh:
                r = server.admin.post("/api/v1/bundles", content=fh.read())
            results["upload_status"] = r.status_code
        results[f"{phase}_s"] = round(time.monotonic() - t0, 2)
        stop.set()
        prober.join(300)
        results[phase] = {k: _summary(v) for k, v in box.items()}
    results["bundle_mib"] = round(bundle.stat().st_size / MiB, 1)
    return results


# ---- hung database ---------------------------------------------------------------------------------------
def _time_until(request: Callable[[], httpx.Response], want: Callable[[int], bool], limit: float) -> dict[str, Any]:
    t0 = time.monotonic()
    deadline = t0 + limit
    while True:
        try:
            status: int | str = request().status_code
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        if isinstance(status, int) and want(status):
            return {"status": status, "s": round(time.monotonic() - t0, 2)}
        if time.monotonic() > deadline:
            return {"status": status, "s": None}
        time.sleep(0.1)


def bench_hung_db(tree: Path, work: Path, keys_dir: Path) -> dict[str, Any]:
    from tests.server.conftest import PrivatePostgres

    pg = PrivatePostgres()
    pg.start()
    server = None
    try:
        server = Server(tree, work, keys_dir, pg.url)
        credential = server.enroll("hang-1")
        plain = httpx.Client(base_url=server.url, timeout=30)
        admin = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.token}"}, timeout=30)
        device = {"Authorization": f"Bearer {credential}"}
        requests: dict[str, Callable[[], httpx.Response]] = {
            "readyz": lambda: plain.get("/readyz"),
            "checkin": lambda: plain.post("/api/v1/devices/hang-1/checkin", json={"state": "idle"}, headers=device),
            "admin": lambda: admin.get("/api/v1/devices"),
        }
        for request in requests.values():
            request()  # connections pooled: the freeze catches them open
        out: dict[str, Any] = {"frozen": {}, "thawed": {}}
        def timed(name: str, request: Callable[[], httpx.Response]) -> None:
            t0 = time.monotonic()
            try:
                r = request()
                out["frozen"][name] = {"status": r.status_code, "retry_after": r.headers.get("retry-after"),
                                       "s": round(time.monotonic() - t0, 2)}
            except httpx.HTTPError as exc:
                out["frozen"][name] = {"status": type(exc).__name__, "s": round(time.monotonic() - t0, 2)}

        try:
            pg.freeze()
            threads = [threading.Thread(target=timed, args=item) for item in requests.items()]  # all at once,
            for t in threads:  # each on a connection pooled before the freeze
                t.start()
            for t in threads:
                t.join(120)
        finally:
            pg.thaw()
        for name, request in requests.items():
            out["thawed"][name] = _time_until(request, lambda s: s == 200, 60)
        plain.close()
        admin.close()
        return out
    finally:
        if server is not None:
            server.stop()
        with contextlib.suppress(Exception):
            pg.thaw()
            pg.stop()
        import shutil

        shutil.rmtree(pg.root, ignore_errors=True)


# ---- report ----------------------------------------------------------------------------------------------
def render(runs: dict[str, dict[str, Any]], command: str) -> str:
    lines = ["## Faults (request bodies, large uploads, hung database)", "",
             f"Command: `{command}` (both code trees in one run; the \"before\" tree is the commit before issue 11's "
             "fixes, unpacked with `git archive`); `python bench/bench_faults.py --write-docs` rewrites this section.",
             "",
             "### Oversize request bodies", "",
             "| tree | server RSS before MiB | peak during a 300 MiB chunked enrollment body MiB | answer | MiB sent "
             "before it | `Content-Length: 5000000000` upload: answer | after s |",
             "|---|---|---|---|---|---|---|"]
    for label, r in runs.items():
        b = r.get("body_limits")
        if b:
            lines.append(f"| {label} | {b['rss_before_mib']} | {b['rss_peak_mib']} | {b['chunked_status']} | "
                         f"{b['chunked_sent_mib']} | {b['declared_status'] or 'none in 10 s'} | "
                         f"{b['declared_answer_s'] if b['declared_answer_s'] is not None else '-'} |")
    lines += ["", "### `/healthz` and check-ins (SQLite) while a large bundle is uploaded and verified", "",
              "| tree | bundle MiB | upload s | `/healthz` idle median / max ms | during upload median / max ms | "
              "check-in idle median / max ms | during upload median / max ms | max during / idle median |",
              "|---|---|---|---|---|---|---|---|"]
    for label, r in runs.items():
        u = r.get("upload")
        if u:
            hi, hu, ci, cu = u["idle"]["healthz"], u["upload"]["healthz"], u["idle"]["checkin"], u["upload"]["checkin"]
            lines.append(f"| {label} | {u['bundle_mib']} | {u['upload_s']} | {hi['median_ms']} / {hi['max_ms']} | "
                         f"{hu['median_ms']} / {hu['max_ms']} | {ci['median_ms']} / {ci['max_ms']} | "
                         f"{cu['median_ms']} / {cu['max_ms']} | {round(hu['max_ms'] / max(hi['median_ms'], 0.1))} |")
    lines += ["", "### PostgreSQL frozen with SIGSTOP (postmaster and backends)", "",
              "| tree | `/readyz` answer, s | check-in answer, s | admin request answer, s | after SIGCONT: "
              "first 200 of `/readyz` / check-in / admin, s |", "|---|---|---|---|---|"]
    for label, r in runs.items():
        h = r.get("hung_db")
        if h:
            cells = []
            for name in ("readyz", "checkin", "admin"):
                f = h["frozen"][name]
                retry = f" (Retry-After {f['retry_after']})" if f.get("retry_after") else ""
                cells.append(f"{f['status']}{retry} after {f['s']}")
            thawed = " / ".join(str(h["thawed"][n]["s"]) for n in ("readyz", "checkin", "admin"))
            lines.append(f"| {label} | {' | '.join(cells)} | {thawed} |")
    load = os.getloadavg()[0]
    machine = f"{os.cpu_count()} cores shared with other work, 1-minute load average {load:.2f} at the end"
    lines += ["", f"Host: {machine}. The three requests are sent together right after the freeze, each on a "
              "connection the server pooled before it (so each waits on a database that hangs); with the fix they "
              "are released when the server's probe notices (at most `database_probe_interval_s` + "
              "`database_probe_timeout_s`, 2.5 s with the defaults), and later requests are refused at once. "
              "Before, they waited for libpq to give up on the connection (or for the thaw)."]
    return "\n".join(lines) + "\n"


def write_docs(section: str) -> None:
    path = ROOT / "docs" / "benchmarks.md"
    text = path.read_text()
    start = text.find("## Faults")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        nxt = text.find("\n## ", start + 3)
        text = text[:start] + section + ("\n" + text[nxt + 1:] if nxt >= 0 else "")
    path.write_text(text.rstrip("\n") + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, action="append", help="code tree to run the server from "
                        "(repeatable; default: this one)")
    parser.add_argument("--label", action="append", help="a name for each --tree")
    parser.add_argument("--only", choices=["body", "upload", "hung"], action="append")
    parser.add_argument("--upload-mib", type=int, default=256)
    parser.add_argument("--body-mib", type=int, default=300)
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    trees = args.tree or [ROOT]
    labels = args.label or [("this tree" if t == ROOT else t.name) for t in trees]
    only = set(args.only or ["body", "upload", "hung"])
    from bundles.keys import KeyStore
    from tests.support.factories import make_digits_bundle

    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="edgepack-bench-faults-") as tmp:
        work = Path(tmp)
        keys = KeyStore.init(work / "keys")
        bundle = None
        if "upload" in only:
            padding = {"padding.bin": os.urandom(args.upload_mib * MiB)}
            bundle = make_digits_bundle(keys, work / "big.edgepack", name="digits-big", version="1.0.0",
                                        release_counter=1, extra_files=padding).path
        for tree, label in zip(trees, labels, strict=True):
            run: dict[str, Any] = {}
            if only & {"body", "upload"}:
                db_url = f"sqlite:///{work / label.replace(' ', '-')}.db"
                server = Server(tree.resolve(), work, keys.directory, db_url)
                try:
                    if "body" in only:
                        run["body_limits"] = bench_body_limits(server, args.body_mib)
                        print(label, "body limits", json.dumps(run["body_limits"]), flush=True)
                    if "upload" in only and bundle is not None:
                        run["upload"] = bench_upload(server, bundle)
                        print(label, "upload", json.dumps(run["upload"]), flush=True)
                finally:
                    server.stop()
            if "hung" in only:
                run["hung_db"] = bench_hung_db(tree.resolve(), work, keys.directory)
                print(label, "hung db", json.dumps(run["hung_db"]), flush=True)
            runs[label] = run
    command = "python bench/bench_faults.py " + " ".join(sys.argv[1:])
    section = render(runs, command.strip())
    print(section)
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2))
    if args.write_docs:
        write_docs(section)


if __name__ == "__main__":
    main()
