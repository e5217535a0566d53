"""``GET /metrics``: Prometheus text format, summed over this server's worker processes (update_server/metrics.py)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool

from update_server.api.deps import CtxDep, bearer
from update_server.metrics import CONTENT_TYPE
from update_server.security import Role
from update_server.services import tokens

router = APIRouter(tags=["health"])


@router.get("/metrics")
async def metrics(request: Request, ctx: CtxDep) -> Response:
    """Prometheus metrics; needs a viewer API token (Bearer) unless ``metrics_public`` is set."""
    if not ctx.settings.metrics_public:
        secret = bearer(request)

        def check() -> None:
            with ctx.sessions() as session, session.begin():
                tokens.require(tokens.authenticate(session, secret), Role.VIEWER)

        await run_in_threadpool(check)
    body = await run_in_threadpool(ctx.metrics.exposition)
    return Response(body, media_type=CONTENT_TYPE)
