#!/usr/bin/env python3
"""Screenshots for docs/dashboard.md: the dashboard's main pages, and the Grafana board's panels.

A live server with simulated devices (tests/server/dashboard_scenario.py: a rollout halted by its crash gate, one
running), plus six hours of back-dated telemetry so the charts have a history, a version at 100 % whose inputs
drift (the fleet alert) and a real Prometheus (Debian's package) scraping the server every second.

Grafana itself is not installed here (it is not in Debian, and its own packages are outside the registries this
project uses), so the board is not screenshotted in Grafana: each panel of deploy/monitoring/grafana-dashboard.json
is laid out by its gridPos, its queries are evaluated by that real Prometheus (query_range over the run) and the
results are drawn with the dashboard's own SVG charts. The image says so in its title.

    python scripts/dashboard_screenshots.py          # writes docs/img/dashboard-*.png and docs/img/grafana-*.png
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

OUT = ROOT / "docs" / "img"
LIVE_S = 420
"""Live traffic before the screenshots: more than the board's 5-minute rate windows."""
SHOWN_S = 150
"""The board shows the last this many seconds (every rate window full by then)."""


def backfill(live: Any, devices: list[Any], broker: Any, hours: int = 6) -> None:
    """Windows every 10 minutes over the last hours, sent now with their original sent_at."""
    from tests.server.dashboard_scenario import input_stats
    from tests.server.sim import Publisher
    from tests.support.factories import digits_data, reference_profile

    images, _ = digits_data()
    x = images.reshape(-1, 64) / 16.0
    rng = np.random.default_rng(11)
    pub = Publisher(broker, live.prefix, devices)
    now = datetime.now(timezone.utc)
    try:
        for k in range(hours * 6, 0, -1):
            at = (now - timedelta(minutes=10 * k)).isoformat()
            for d in devices:
                if d.active is None:
                    continue
                rows = x[rng.choice(len(x), 60)]
                msg = pub.envelope(d, "window", d.active)
                msg["sent_at"] = at
                n = int(rng.integers(80, 140))
                slow = 0
                msg["window"] = {"start": at, "end": at, "requests": n, "errors": int(rng.random() < 0.2),
                                 "crashes": 0, "latency_ms": {"bounds": [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000],
                                                              "counts": [0, n // 3, n // 2 - slow * 5,
                                                                         n // 6 + slow * 5,
                                                                         n - n // 3 - n // 2 - n // 6,
                                                                         0, 0, 0, 0, 0, 0]},
                                 "feedback": {"count": 20, "correct": 19 - int(rng.random() < 0.3)},
                                 "predicted_classes": {str(c): int(v) for c, v in
                                                       enumerate(np.bincount(rng.integers(0, 10, n), minlength=10))},
                                 "input_stats": input_stats(rows, reference_profile())}
                pub.publish(f"{pub.prefix}/{d.device_id}/telemetry/window", json.dumps(msg).encode(), d)
    finally:
        pub.close()


def drift_story(live: Any, keys: Any, bundles: dict[str, Any], broker: Any) -> None:
    """digits 1.0.0 at 100 % on a third group, whose cameras then get smudged: the fleet drift alert."""
    from tests.server.conftest import enrollment_token
    from tests.server.dashboard_scenario import publish_window
    from tests.server.sim import Publisher, SimDevice
    from tests.support.factories import digits_data

    token = enrollment_token(live, uses=4, group="c")
    fleet = [SimDevice(live.url, f"kiosk-c{i:02d}") for i in range(4)]
    off = {g: None for g in ("max_install_failure_rate", "max_crash_rate", "max_error_rate", "max_accuracy_drop",
                             "max_p95_latency_regression")}
    for d in fleet:
        d.enroll(token)
    with live.admin as c:
        rid = c.post("/api/v1/rollouts", json={"bundle": {"name": "digits", "version": "1.0.0"},
                                               "selector": {"group": "c"}, "phases": [100], "min_soak_s": 0,
                                               "min_devices": 1, "gates": off, "start": True,
                                               "reason": "site C to 1.0.0"}).json()["id"]
    root = (keys.directory / "online" / "director-root.json").read_bytes()
    images, _ = digits_data()
    faint = np.round(images.reshape(-1, 64) * 0.6) / 16.0
    rng = np.random.default_rng(2)
    pub = Publisher(broker, live.prefix, fleet)
    try:
        for d in fleet:
            d.sync(root)
            d.checkin()
        time.sleep(1.0)  # the ingester re-reads rollout membership at most every 0.5 s
        for _ in range(12):  # most of 1.0.0's recent inputs now come through smudged lenses
            for d in fleet:
                publish_window(pub, d, faint[rng.choice(len(faint), 1000)], correct=31)
        deadline = time.monotonic() + 30
        while live.admin.get(f"/api/v1/rollouts/{rid}").json()["state"] != "completed":
            assert time.monotonic() < deadline
            time.sleep(0.3)
    finally:
        pub.close()


def shoot_pages(url: str, token: str, scenario: Any) -> None:
    from playwright.sync_api import sync_playwright

    from tests.server.test_dashboard import CHROMIUM_ARGS, chromium_path

    pages = {"overview": "/ui/", "rollout-halted": f"/ui/rollouts/{scenario.halted}",
             "rollout-running": f"/ui/rollouts/{scenario.running}", "models": "/ui/models",
             "version": "/ui/models/digits/1.1.0?range=6h", "drift": "/ui/models/digits/1.0.0?range=6h",
             "devices": "/ui/devices", "device": "/ui/devices/kiosk-c00", "audit": "/ui/audit"}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        ctx = browser.new_context(viewport={"width": 1280, "height": 900})
        page = ctx.new_page()
        page.goto(url + "/ui/login")
        page.fill("#token", token)
        page.click("#sign-in")
        page.wait_for_load_state()
        for name, path in pages.items():
            page.goto(url + path)
            page.screenshot(path=str(OUT / f"dashboard-{name}.png"), full_page=True)
            print(f"docs/img/dashboard-{name}.png", flush=True)
        browser.close()


def grafana_panels(prom: str, url: str, token: str, minutes: float) -> str:
    """An HTML page with each panel of the board drawn from Prometheus query_range results."""
    from html import escape

    from update_server.ui.charts import PALETTE, Series, line_chart

    board = json.loads((ROOT / "deploy" / "monitoring" / "grafana-dashboard.json").read_text())
    end = time.time()
    start = end - minutes * 60
    cells = []
    for panel in board["panels"]:
        g = panel["gridPos"]
        style = f"grid-column: {g['x'] + 1} / span {g['w']}; grid-row: {g['y'] + 1} / span {g['h']};"
        if panel["type"] == "row":
            cells.append(f'<div class="row" style="{style}">{escape(panel["title"])}</div>')
            continue
        series = []
        for t in panel["targets"]:
            expr = t["expr"].replace("$model", ".*")
            r = httpx.get(f"{prom}/api/v1/query_range", params={"query": expr, "start": start, "end": end,
                                                                "step": max(2, int(minutes * 60 / 120))}).json()
            for res in r.get("data", {}).get("result", []):
                legend = t.get("legendFormat") or ""
                for k, v in res["metric"].items():
                    legend = legend.replace("{{" + k + "}}", v)
                legend = re.sub(r"\{\{\w+\}\}", "–", legend)  # a label Prometheus dropped (empty)
                points = [(datetime.fromtimestamp(float(ts), timezone.utc),
                           None if v in ("NaN", "+Inf", "-Inf") else float(v)) for ts, v in res["values"]]
                series.append(Series(legend or expr[:40], points, PALETTE[len(series) % len(PALETTE)]))
        width = 48 * g["w"] - 12
        chart = line_chart(series[:8], title=panel["title"], width=width, height=8 * 26, y_min=None)
        cells.append(f'<div class="panel" style="{style}">{chart}</div>')
    css = (ROOT / "update_server" / "ui" / "static" / "app.css").read_text()
    return (f"<!doctype html><html><head><meta charset='utf-8'><style>{css}\n"
            "body{background:#f3f4f6;padding:12px}.board{display:grid;grid-template-columns:repeat(24,40px);"
            "grid-auto-rows:26px;gap:8px}.row{font-weight:600;padding-top:4px}.panel svg{width:100%;height:100%}"
            f"</style></head><body><h1>edgepack model health — panels of deploy/monitoring/grafana-dashboard.json</h1>"
            "<p class='muted'>Not a Grafana screenshot: Grafana is not installed on this machine. Each panel's "
            "queries were evaluated by a real Prometheus (Debian's 2.42) scraping a live edgepack server fed by "
            f"simulated devices for {LIVE_S / 60:.0f} minutes (the last {minutes * 60:.0f} s shown), and drawn "
            "with the dashboard's own SVG charts, laid out by the panels' gridPos.</p>"
            f"<div class='board'>{''.join(cells)}</div></body></html>")


def main() -> None:
    from bundles.keys import KeyStore
    from tests.server.dashboard_scenario import build
    from tests.support import services
    from tests.support.factories import make_digits_bundle

    OUT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="edgepack-shots-"))
    keys = KeyStore.init(work / "keys")
    bundles = {v: make_digits_bundle(keys, work / f"digits-{v}.edgepack", version=v, release_counter=rc,
                                     quality="bad" if v == "1.2.0" else "good")
               for v, rc in (("1.0.0", 1), ("1.1.0", 2), ("1.2.0", 3))}
    broker_ctx = services.mosquitto()
    broker = broker_ctx.__enter__()
    scenario = build(keys, bundles, work, broker)
    live = scenario.live
    prom_proc = None
    try:
        binary = shutil.which("prometheus")
        assert binary, "apt-get install -y prometheus"
        port = services.free_port()
        (work / "token").write_text(scenario.viewer)
        (work / "prom.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "2s"},
            "scrape_configs": [{"job_name": "edgepack-server", "authorization": {
                "type": "Bearer", "credentials_file": str(work / "token")},
                "static_configs": [{"targets": [live.url.split("://", 1)[1]]}]}]}))
        prom_proc = subprocess.Popen([binary, f"--config.file={work / 'prom.yml'}",
                                      f"--storage.tsdb.path={work / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.monotonic()
        backfill(live, scenario.devices, broker)
        drift_story(live, keys, bundles, broker)
        from tests.server.dashboard_scenario import publish_window
        from tests.server.sim import Publisher
        from tests.support.factories import digits_data

        images, _ = digits_data()
        x = images.reshape(-1, 64) / 16.0
        rng = np.random.default_rng(5)
        pub = Publisher(broker, live.prefix, scenario.devices)
        try:  # a few minutes of live traffic, so rates in Prometheus have something to show
            while time.monotonic() - t0 < LIVE_S:
                for d in scenario.devices:
                    publish_window(pub, d, x[rng.choice(len(x), 40)])
                for _ in range(5):
                    httpx.get(f"{live.url}/healthz")
                time.sleep(2)
        finally:
            pub.close()
        shoot_pages(live.url, scenario.operator, scenario)
        html = grafana_panels(f"http://127.0.0.1:{port}", live.url, scenario.viewer, SHOWN_S / 60)
        (work / "board.html").write_text(html)
        from playwright.sync_api import sync_playwright

        from tests.server.test_dashboard import CHROMIUM_ARGS, chromium_path

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto((work / "board.html").as_uri())
            page.screenshot(path=str(OUT / "grafana-board-panels.png"), full_page=True)
            browser.close()
        print("docs/img/grafana-board-panels.png")
    finally:
        if prom_proc is not None:
            prom_proc.terminate()
            prom_proc.wait(30)
        for d in scenario.devices:
            d.close()
        live.stop()
        broker_ctx.__exit__(None, None, None)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
