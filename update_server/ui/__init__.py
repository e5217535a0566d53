"""The Model Health dashboard: server-rendered pages under ``/ui`` (docs/dashboard.md).

Jinja2 templates, charts as inline SVG (``charts``), one small script and one stylesheet of our own under
``/ui/static``; nothing is loaded from another origin (a strict Content-Security-Policy says so to the
browser too). Sign-in and roles: ``auth``. Pages: ``pages``; operator actions: ``actions``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape

from update_server.errors import ServerError
from update_server.security import Role
from update_server.ui.auth import LoginRequired, User, authenticate, secret_of

HERE = Path(__file__).parent
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin",
           "Cache-Control": "no-store", "X-Frame-Options": "DENY"}


def _ago(value: datetime | None, now: datetime | None = None) -> str:
    if value is None:
        return "never"
    seconds = ((now or datetime.now(timezone.utc)) - value).total_seconds()
    if seconds < 0:
        return "just now"
    for limit, div, unit in ((90, 1, "s"), (5400, 60, "min"), (129600, 3600, "h")):
        if seconds < limit:
            return f"{seconds / div:.0f} {unit} ago"
    return f"{seconds / 86400:.0f} d ago"


def _pct(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value * 100:.{digits}f} %"


def _num(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"


ENV = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]),
                  trim_blocks=True, lstrip_blocks=True)
def _ts(value: Any) -> str:
    """UTC to the second; ISO strings (as the API views give them) too."""
    if not value:  # None, "", or a missing key (jinja2's Undefined)
        return "–"
    if isinstance(value, str):
        try:
            at = datetime.fromisoformat(value)
        except ValueError:
            return value
    else:
        at = value
    return at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


ENV.filters.update(ago=_ago, pct=_pct, num=_num, ts=_ts)


class Page:
    """One request for a page: its context, signed-in user and start time (for ``Server-Timing``)."""

    def __init__(self, request: Request, user: User, started: float) -> None:
        self.request, self.user, self.started = request, user, started
        self.ctx = request.app.state.ctx
        self.now = self.ctx.clock()

    def render(self, template: str, status: int = 200, **data: Any) -> HTMLResponse:
        html = ENV.get_template(template).render(user=self.user, now=self.now, path=self.request.url.path,
                                                 query=self.request.query_params, **data)
        ms = (time.perf_counter() - self.started) * 1000
        return HTMLResponse(html, status_code=status,
                            headers={**HEADERS, "Server-Timing": f"app;dur={ms:.1f}"})


def view(request: Request, body: Callable[[Page], Response], minimum: Role = Role.VIEWER) -> Response:
    """Authenticate, run the page body, render domain errors as an error page; no token: the sign-in form."""
    started = time.perf_counter()
    try:
        user = authenticate(request.app.state.ctx, secret_of(request), minimum)
    except LoginRequired:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/ui/login?next={quote(target)}", status_code=303)
    page = Page(request, user, started)
    try:
        return body(page)
    except ServerError as exc:
        return page.render("error.html", status=exc.status, error=exc)


def bare(template: str, status: int = 200, **data: Any) -> HTMLResponse:
    """A page without a signed-in user (sign-in form, sign-in errors)."""
    html = ENV.get_template(template).render(user=None, now=datetime.now(timezone.utc), path="", query={}, **data)
    return HTMLResponse(html, status_code=status, headers=HEADERS)


def install(app: FastAPI) -> None:
    """Mount the dashboard on the app (called by the app factory)."""
    from update_server.ui import actions, pages

    app.include_router(pages.router)
    app.include_router(actions.router)
    app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="ui-static")

    @app.get("/ui", include_in_schema=False)
    def _ui_root() -> RedirectResponse:
        return RedirectResponse("/ui/", status_code=307)
