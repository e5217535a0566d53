"""Dashboard sign-in: the same API tokens and roles as the API, carried in a cookie.

* Signing in posts an API token to ``/ui/login``; the server checks it (like any API call) and sets it as an
  ``HttpOnly``, ``SameSite=Strict`` cookie scoped to ``/ui`` (``Secure`` when the request came over HTTPS).
  Scripts cannot read it; other sites cannot send it. Signing out clears it; revoking the token on the
  server ends every session that uses it at the next page.
* Every page authenticates the cookie (or an ``Authorization: Bearer`` header, for tools) on each request:
  a viewer may look, only an operator may act.
* Every form that changes something carries a CSRF token, ``HMAC(API token, "edgepack-ui-csrf")``: only a
  page rendered for that token knows it, and it needs no server-side session (any replica checks it). The
  ``Origin`` header, when present, must be this server.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi import Request

from update_server.context import ServerContext
from update_server.errors import Forbidden, Unauthorized
from update_server.models import ApiToken
from update_server.security import Role
from update_server.services import tokens

COOKIE = "edgepack_ui"
CSRF_FIELD = "csrf"


class LoginRequired(Exception):
    """No valid token: the page redirects to the sign-in form."""


@dataclass(frozen=True)
class User:
    token: ApiToken
    secret: str

    @property
    def role(self) -> Role:
        return Role.parse(self.token.role)

    @property
    def can_act(self) -> bool:
        return self.role >= Role.OPERATOR

    @property
    def actor(self) -> str:
        return f"{self.token.name} ({self.token.id}) via dashboard"

    @property
    def csrf(self) -> str:
        return csrf_token(self.secret)


def csrf_token(secret: str) -> str:
    return hmac.new(secret.encode(), b"edgepack-ui-csrf", hashlib.sha256).hexdigest()


def secret_of(request: Request) -> str | None:
    cookie = request.cookies.get(COOKIE)
    if cookie:
        return cookie
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def authenticate(ctx: ServerContext, secret: str | None, minimum: Role = Role.VIEWER) -> User:
    """The signed-in user; LoginRequired without a valid token, Forbidden for a role too low."""
    if not secret:
        raise LoginRequired()
    try:
        with ctx.sessions() as session, session.begin():
            token = tokens.authenticate(session, secret)
            session.expunge(token)
    except (Unauthorized, Forbidden) as exc:
        raise LoginRequired() from exc
    tokens.require(token, minimum)
    return User(token, secret)


def check_form(request: Request, user: User, submitted: str | None) -> None:
    """Refuse a state-changing form without this user's CSRF token or from another origin (403)."""
    if not submitted or not hmac.compare_digest(submitted, user.csrf):
        raise Forbidden("the form's CSRF token is missing or wrong: reload the page and submit again")
    origin = request.headers.get("origin")
    if origin and origin != "null":
        host = request.headers.get("host", "")
        if urlsplit(origin).netloc != host:
            raise Forbidden(f"a form from another origin ({origin}) is refused")
