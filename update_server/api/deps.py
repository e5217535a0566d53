"""Shared dependencies: the server context, bearer secrets, role checks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from update_server.context import ServerContext
from update_server.errors import Unauthorized
from update_server.models import ApiToken
from update_server.security import Role
from update_server.services import tokens


def get_ctx(request: Request) -> ServerContext:
    ctx: ServerContext = request.app.state.ctx
    return ctx


CtxDep = Annotated[ServerContext, Depends(get_ctx)]


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


# Declares the "bearer" security scheme in the OpenAPI description (the docs page's "Authorize" button);
# the header itself is read by bearer() below, which also gives our own 401 message.
_scheme = HTTPBearer(auto_error=False, scheme_name="bearer",
                     description="An API token (`edgepack-server create-token`, `edgepack tokens create`) for the "
                     "admin API; a device's credential (from enrollment) for the device API.")
SchemeDep = Annotated[HTTPAuthorizationCredentials | None, Security(_scheme)]


def device_credential(request: Request, _: SchemeDep) -> str:
    secret = bearer(request)
    if secret is None:
        raise Unauthorized("missing device credential: send `Authorization: Bearer <credential>`")
    return secret


CredentialDep = Annotated[str, Depends(device_credential)]


def role(minimum: Role) -> Callable[..., ApiToken]:
    def check(request: Request, ctx: CtxDep, _: SchemeDep) -> ApiToken:
        with ctx.sessions() as session, session.begin():
            token = tokens.authenticate(session, bearer(request))
        tokens.require(token, minimum)
        return token

    return check


Viewer = Annotated[ApiToken, Depends(role(Role.VIEWER))]
Operator = Annotated[ApiToken, Depends(role(Role.OPERATOR))]
Admin = Annotated[ApiToken, Depends(role(Role.ADMIN))]


def actor(token: ApiToken) -> str:
    return f"{token.name} ({token.id})"
