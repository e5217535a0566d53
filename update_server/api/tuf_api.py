"""The TUF image repository (read by python-tuf's ngclient) and bundle file targets."""

from __future__ import annotations

import re

from fastapi import APIRouter, Response

from update_server.api.deps import CtxDep
from update_server.api.files import blob_response
from update_server.errors import NotFound
from update_server.services.bundles import target_key

router = APIRouter(prefix="/tuf/image", tags=["tuf"])
_VERSIONED = re.compile(r"^(\d+)\.(root|snapshot|targets)\.json$")
_HASH_PREFIX = re.compile(r"^([0-9a-f]{64})\.(.+)$")


def _json(data: bytes | None, what: str) -> Response:
    if data is None:
        raise NotFound(f"no {what} in this repository yet")
    return Response(data, media_type="application/json", headers={"Cache-Control": "no-cache"})


@router.get("/targets/{path:path}")
def target_file(path: str, ctx: CtxDep) -> Response:
    """A bundle file, by plain or hash-prefixed (consistent snapshot) target path; supports Range."""
    with ctx.sessions() as session, session.begin():
        targets = ctx.repo.targets(session)
    if targets is None:
        raise NotFound("no targets in this repository yet")
    head, _, name = path.rpartition("/")
    match = _HASH_PREFIX.match(name)
    if match and f"{head}/{match.group(2)}".lstrip("/") in targets.signed.targets:
        real = f"{head}/{match.group(2)}".lstrip("/")
        if targets.signed.targets[real].hashes.get("sha256") != match.group(1):
            raise NotFound(f"no target {path!r} with that hash")
        path = real
    elif path not in targets.signed.targets:
        raise NotFound(f"no target {path!r}")
    return blob_response(ctx.storage, target_key(path))


@router.get("/{name}")
def metadata(name: str, ctx: CtxDep) -> Response:
    """``N.root.json``, ``root.json``, ``timestamp.json``, ``V.snapshot.json``, ``V.targets.json``."""
    with ctx.sessions() as session, session.begin():
        if name in ("root.json", "timestamp.json", "snapshot.json", "targets.json"):
            return _json(ctx.repo.get(session, name[:-5]), name)
        match = _VERSIONED.match(name)
        if match is None:
            raise NotFound(f"no metadata {name!r}")
        return _json(ctx.repo.get(session, match.group(2), int(match.group(1))), name)
