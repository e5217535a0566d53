"""The dashboard in a real headless browser (Debian's chromium driven by Playwright), against a live server fed
by simulated devices over the real broker (``dashboard_scenario``). Screenshots go to the test artifacts
(``test-artifacts/dashboard/``, or ``$EDGEPACK_TEST_ARTIFACTS/dashboard``)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.server.dashboard_scenario import Scenario
from tests.support import services

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("EDGEPACK_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "dashboard"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]


def chromium_path() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if path is None:
        services.service_missing("Debian's chromium (apt-get install -y chromium)")
    assert path is not None
    return path


@pytest.fixture
def scenario(dashboard_scenario: Scenario) -> Scenario:
    return dashboard_scenario


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = chromium_path()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


class Tab:
    """One browser context: records every URL the pages request."""

    def __init__(self, browser: Any, base: str) -> None:
        self.base = base
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.requests: list[str] = []
        self.context.on("request", lambda req: self.requests.append(req.url))
        self.page = self.context.new_page()

    def sign_in(self, token: str, path: str = "/ui/") -> None:
        self.page.goto(self.base + path)
        assert urlsplit(self.page.url).path == "/ui/login"
        self.page.fill("#token", token)
        self.page.click("#sign-in")
        self.page.wait_for_load_state()
        assert urlsplit(self.page.url).path == path, self.page.url

    def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def tab(browser: Any, scenario: Scenario) -> Iterator[Tab]:
    t = Tab(browser, scenario.live.url)
    try:
        yield t
    finally:
        t.close()


@pytest.mark.mqtt
def test_sign_in_and_see_the_rollout_halted_by_its_gate(tab: Tab, scenario: Scenario) -> None:
    page = tab.page
    page.goto(tab.base + "/ui/rollouts")
    assert urlsplit(page.url).path == "/ui/login"  # nothing without a token
    page.fill("#token", "ept_not-a-real-token")
    page.click("#sign-in")
    assert "not valid" in page.inner_text("#login-error")
    tab.sign_in(scenario.viewer)
    alert = page.inner_text(f"#alert-halted-{scenario.halted}")
    assert "halted" in alert and "crash_rate" in alert
    page.click(f"#alert-halted-{scenario.halted} a")
    page.wait_for_load_state()
    assert page.inner_text("h1").endswith("halted")
    assert page.inner_text("#halt-gates .gate-name") == "crash_rate"
    row = page.locator("#gates tr", has_text="crash_rate")
    assert "breached" in row.inner_text()
    assert page.locator("#act").count() == 0  # a viewer looks, never acts
    assert "operator token" in page.inner_text("main")
    tab.shot("rollout-halted")


@pytest.mark.mqtt
def test_pause_from_the_dashboard_lands_in_the_audit_log(tab: Tab, scenario: Scenario) -> None:
    rid = scenario.running
    tab.sign_in(scenario.operator, f"/ui/rollouts/{rid}")
    page = tab.page
    page.select_option("#action", "pause")
    page.click("#act-submit")  # no reason: the browser refuses (required) and nothing happens
    assert scenario.live.admin.get(f"/api/v1/rollouts/{rid}").json()["state"] == "running"
    page.select_option("#action", "pause")
    page.fill("#reason", "pausing from the browser test: checking the kiosks in hall B")
    page.click("#act-submit")
    page.wait_for_load_state()
    assert page.inner_text("#flash") == "done: pause"
    assert page.inner_text("h1").endswith("paused")
    first = page.locator("#audit tbody tr").first.inner_text()
    assert "rollout.pause" in first and "checking the kiosks in hall B" in first
    assert "otto-operator" in first and "via dashboard" in first
    tab.shot("rollout-paused")
    page.goto(tab.base + "/ui/audit")
    assert "checking the kiosks in hall B" in page.locator("#audit tbody tr").first.inner_text()
    tab.shot("audit")
    with scenario.live.admin as client:  # the same audit log the API and CLI read
        entry = client.get(f"/api/v1/rollouts/{rid}/audit").json()[0]
        assert client.get(f"/api/v1/rollouts/{rid}").json()["state"] == "paused"
    assert entry["action"] == "rollout.pause" and entry["reason"].startswith("pausing from the browser test")
    page.goto(tab.base + f"/ui/rollouts/{rid}")
    page.select_option("#action", "resume")
    page.fill("#reason", "hall B is fine")
    page.click("#act-submit")
    page.wait_for_load_state()
    assert page.inner_text("h1").endswith("running")


@pytest.mark.mqtt
def test_every_page_loads_only_from_this_server(tab: Tab, scenario: Scenario) -> None:
    """Screenshots each page; fails if any page requests anything but this server (CDN, fonts, analytics)."""
    tab.sign_in(scenario.viewer)
    device = scenario.devices[0].device_id
    pages = {"overview": "/ui/", "rollouts": "/ui/rollouts", "rollout": f"/ui/rollouts/{scenario.running}",
             "models": "/ui/models", "version": "/ui/models/digits/1.0.0?range=6h", "devices": "/ui/devices",
             "device": f"/ui/devices/{device}", "audit-log": "/ui/audit"}
    for name, path in pages.items():
        response = tab.page.goto(tab.base + path)
        assert response is not None and response.status == 200, (path, response and response.status)
        assert response.headers["content-security-policy"].startswith("default-src 'none'; script-src 'self'")
        assert tab.page.locator("main h1").count() == 1
        tab.shot(name)
    tab.page.goto(tab.base + "/ui/models/digits/1.0.0?range=6h")
    assert tab.page.locator("svg.chart").count() >= 6  # server-rendered charts
    foreign = [u for u in tab.requests if not (u.startswith(tab.base + "/") or u.startswith("data:"))]
    assert not foreign, f"pages requested non-local URLs: {foreign}"
    assert any(u.endswith("/ui/static/app.js") for u in tab.requests)
    tab.context.clear_cookies()
    tab.page.goto(tab.base + "/ui/login")
    tab.shot("login")


def test_forms_need_csrf_and_the_operator_role(scenario: Scenario) -> None:
    """Without the page's CSRF token, from another origin, as a viewer, or without a reason: refused, nothing done."""
    from update_server.ui.auth import COOKIE, csrf_token

    live, rid = scenario.live, scenario.running
    url = f"{live.url}/ui/rollouts/{rid}/action"

    def post(token: str, **form: str) -> httpx.Response:
        with httpx.Client(cookies={COOKIE: token}, timeout=30) as c:
            headers = {"Origin": form.pop("origin")} if "origin" in form else {}
            return c.post(url, data=form, headers=headers)

    def state() -> str:
        return str(live.admin.get(f"/api/v1/rollouts/{rid}").json()["state"])

    op = scenario.operator
    assert post(op, action="pause", reason="no csrf").status_code == 403
    assert post(op, action="pause", reason="forged", csrf=csrf_token(scenario.viewer)).status_code == 403
    assert post(op, action="pause", reason="elsewhere", csrf=csrf_token(op),
                origin="http://evil.example").status_code == 403
    assert post(scenario.viewer, action="pause", reason="viewer", csrf=csrf_token(scenario.viewer)).status_code == 403
    r = post(op, action="pause", reason="   ", csrf=csrf_token(op))
    assert r.status_code == 303 and "reason%20is%20required" in r.headers["location"]
    assert state() == "running"
    with httpx.Client(timeout=30) as c:  # the sign-in cookie is HttpOnly, SameSite=Strict, scoped to /ui
        r = c.post(f"{live.url}/ui/login", data={"token": op, "next": "https://evil.example/"})
        assert r.status_code == 303 and r.headers["location"] == "/ui/"
        cookie = r.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "path=/ui" in cookie
        assert "max-age=43200" in cookie


def test_revoking_a_token_ends_its_dashboard_sessions(scenario: Scenario) -> None:
    from update_server.ui.auth import COOKIE

    live = scenario.live
    with live.admin as admin:
        created = admin.post("/api/v1/admin/tokens", json={"name": "temp", "role": "viewer"}).json()
    with httpx.Client(base_url=live.url, cookies={COOKIE: created["token"]}, timeout=30) as c:
        assert c.get("/ui/rollouts").status_code == 200
        with live.admin as admin:
            assert admin.delete(f"/api/v1/admin/tokens/{created['id']}").status_code == 204
        r = c.get("/ui/rollouts")
        assert r.status_code == 303 and r.headers["location"] == "/ui/login?next=/ui/rollouts"


@pytest.mark.mqtt
def test_live_pages_reload_unless_someone_types(tab: Tab, scenario: Scenario) -> None:
    """'live' reloads every 10 s (the browser's clock is fast-forwarded), never while a form field has focus."""
    page = tab.page
    page.clock.install()
    tab.sign_in(scenario.viewer, "/ui/devices")
    assert page.is_checked("#live")
    page.evaluate("window.__marker = 1")
    with page.expect_navigation():
        page.clock.fast_forward("00:11")
    assert page.evaluate("window.__marker") is None  # a fresh page
    page.focus("input[name=q]")
    page.evaluate("window.__marker = 2")
    page.clock.fast_forward("00:31")
    assert page.evaluate("window.__marker") == 2  # still the same page: someone is typing
    page.uncheck("#live")
    page.evaluate("document.activeElement.blur()")
    page.clock.fast_forward("00:31")
    assert page.evaluate("window.__marker") == 2  # live off: no reload
