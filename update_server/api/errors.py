"""The one place that maps errors to HTTP: domain errors, validation errors, database outages."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc

from update_server.db import is_unavailable
from update_server.errors import ServerError

log = logging.getLogger(__name__)


def error_body(code: str, message: str, detail: object = None) -> dict[str, object]:
    return {"error": {"code": code, "message": message, "detail": detail or {}}}


def install(app: FastAPI) -> None:
    @app.exception_handler(ServerError)
    async def _domain(_request: Request, error: ServerError) -> JSONResponse:
        headers = {"Retry-After": "2"} if error.status == 503 else None
        return JSONResponse(error_body(error.code, error.message, error.detail), status_code=error.status,
                            headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, error: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in error.errors()]
        return JSONResponse(error_body("invalid_request", "the request body or parameters are invalid",
                                       {"errors": errors}), status_code=422)

    @app.exception_handler(sa_exc.SQLAlchemyError)
    async def _database(_request: Request, error: sa_exc.SQLAlchemyError) -> JSONResponse:
        if is_unavailable(error):
            log.warning("database unavailable: %s", str(error).splitlines()[0])
            return JSONResponse(error_body("database_unavailable", "the database is unavailable; retry later"),
                                status_code=503, headers={"Retry-After": "2"})
        if isinstance(error, sa_exc.IntegrityError):
            return JSONResponse(error_body("conflict", "the change conflicts with existing data; retry"),
                                status_code=409)
        log.exception("database error")
        return JSONResponse(error_body("internal", "internal database error"), status_code=500)
