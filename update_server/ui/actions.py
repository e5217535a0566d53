"""Dashboard forms: sign in, sign out, and an operator's rollout actions (with a required reason, audited).

Forms are ``application/x-www-form-urlencoded`` (parsed with the standard library: three short forms do not
need another dependency). Every action goes through ``services.rollouts.act``, the same code as the API
and the CLI, so the audit log records who did what and why, whichever way it was done.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response

from update_server.errors import BadRequest, Conflict, Forbidden, NotFound, ServerError
from update_server.security import Role
from update_server.services import rollouts
from update_server.ui import bare
from update_server.ui.auth import COOKIE, CSRF_FIELD, LoginRequired, authenticate, check_form, secret_of
from update_server.ui.pages import MANUAL

router = APIRouter(prefix="/ui", include_in_schema=False)
MAX_FORM_BYTES = 16 * 1024
MAX_REASON = 2000


async def _form(request: Request) -> dict[str, str]:
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise BadRequest(f"form too large ({len(body)} bytes > {MAX_FORM_BYTES})")
    return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))


def _safe_next(target: str | None) -> str:
    """Only a path of this dashboard (never another site) after signing in."""
    if not target:
        return "/ui/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not parts.path.startswith("/ui/") or "\\" in target:
        return "/ui/"
    return target


@router.get("/login")
def login_form(request: Request, next: str = "/ui/") -> Response:
    return bare("login.html", next=_safe_next(next), error=None)


@router.post("/login")
async def login(request: Request) -> Response:
    form = await _form(request)
    secret = form.get("token", "").strip()
    target = _safe_next(form.get("next"))
    ctx = request.app.state.ctx
    try:
        await run_in_threadpool(authenticate, ctx, secret, Role.VIEWER)
    except LoginRequired:
        return bare("login.html", status=401, next=target,
                    error="That token is not valid (or was revoked). Use an API token: "
                          "`edgepack-server create-token --role viewer` or `edgepack tokens create`.")
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(COOKIE, secret, httponly=True, samesite="strict", path="/ui",
                        secure=request.url.scheme == "https", max_age=12 * 3600)
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(COOKIE, path="/ui")
    return response


@router.post("/rollouts/{rollout_id}/action")
async def rollout_action(request: Request, rollout_id: str) -> Response:
    """pause | resume | advance | abort | rollback | start, with a reason (required) for the audit log."""
    ctx = request.app.state.ctx
    form = await _form(request)
    back = f"/ui/rollouts/{rollout_id}"
    try:
        user = await run_in_threadpool(authenticate, ctx, secret_of(request), Role.VIEWER)
    except LoginRequired:
        return RedirectResponse(f"/ui/login?next={back}", status_code=303)
    try:
        check_form(request, user, form.get(CSRF_FIELD))
        if not user.can_act:
            raise Forbidden(f"acting on a rollout needs the operator role; token {user.token.name!r} is "
                            f"{user.token.role}")
        manual = {a.value: a for a in MANUAL}
        action = form.get("action", "")
        if action not in manual:
            raise BadRequest(f"unknown action {action!r}; use {', '.join(manual)}")
        reason = " ".join(form.get("reason", "").split())
        if not reason:
            raise BadRequest("a reason is required: it goes into the audit log with your name")
        if len(reason) > MAX_REASON:
            raise BadRequest(f"the reason is too long ({len(reason)} characters > {MAX_REASON})")
        await run_in_threadpool(rollouts.act, ctx, rollout_id, manual[action], actor=user.actor, reason=reason)
    except (BadRequest, Conflict, NotFound) as exc:
        return RedirectResponse(f"{back}?error={_q(exc.message)}", status_code=303)
    except ServerError as exc:
        return bare("error.html", status=exc.status, error=exc)
    return RedirectResponse(f"{back}?done={_q(action)}", status_code=303)


def _q(text: str) -> str:
    from urllib.parse import quote

    return quote(text[:500])

