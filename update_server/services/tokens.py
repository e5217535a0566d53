"""API tokens (operators, CI) and enrollment tokens (devices)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from update_server.errors import BadRequest, Forbidden, NotFound, Unauthorized
from update_server.models import ApiToken, EnrollmentToken
from update_server.security import API_PREFIX, DEVICE_PREFIX, ENROLL_PREFIX, Role, digest, new_id, new_secret
from update_server.services.common import audit


def create_api_token(session: Session, *, name: str, role: Role, actor: str, now: datetime) -> tuple[ApiToken, str]:
    secret = new_secret(API_PREFIX)
    token = ApiToken(id=new_id("tok-"), name=name, role=role.name.lower(), token_hash=digest(secret),
                     created_at=now, created_by=actor)
    session.add(token)
    audit(session, now=now, actor=actor, action="token.create", subject=token.id, detail={"name": name,
                                                                                        "role": token.role})
    return token, secret


def authenticate(session: Session, secret: str | None) -> ApiToken:
    """The API token for ``secret``; a device credential here is refused with 403."""
    if not secret:
        raise Unauthorized("missing API token: send `Authorization: Bearer <token>`")
    if secret.startswith(DEVICE_PREFIX):
        raise Forbidden("a device credential cannot reach admin endpoints")
    token = session.scalar(select(ApiToken).where(ApiToken.token_hash == digest(secret)))
    if token is None or token.revoked_at is not None:
        raise Unauthorized("invalid or revoked API token; create one with `edgepack-server create-token`")
    return token


def require(token: ApiToken, role: Role) -> None:
    if Role.parse(token.role) < role:
        raise Forbidden(f"this needs the {role.name.lower()} role; token {token.name!r} is {token.role}")


def list_tokens(session: Session) -> list[ApiToken]:
    return list(session.scalars(select(ApiToken).order_by(ApiToken.created_at)))


def revoke_token(session: Session, token_id: str, *, actor: str, now: datetime) -> ApiToken:
    token = session.get(ApiToken, token_id)
    if token is None:
        raise NotFound(f"no API token {token_id!r}")
    token.revoked_at = token.revoked_at or now
    audit(session, now=now, actor=actor, action="token.revoke", subject=token_id)
    return token


def create_enrollment_token(session: Session, *, uses: int, ttl: timedelta, group: str | None,
                            tags: dict[str, Any], actor: str, now: datetime) -> tuple[EnrollmentToken, str]:
    if uses < 1:
        raise BadRequest("uses must be at least 1")
    secret = new_secret(ENROLL_PREFIX)
    token = EnrollmentToken(id=new_id("enr-"), token_hash=digest(secret), uses_left=uses, expires_at=now + ttl,
                            group_name=group, tags=dict(tags), created_at=now, created_by=actor)
    session.add(token)
    audit(session, now=now, actor=actor, action="enrollment_token.create", subject=token.id,
          detail={"uses": uses, "group": group, "tags": tags, "expires_at": token.expires_at.isoformat()})
    return token, secret
