"""``/docs``: the interactive API documentation, served by this server alone (no CDN).

FastAPI's default page loads Swagger UI's JavaScript and CSS from a CDN, so on a server without internet
access (or a browser behind a proxy) it is a blank page. The assets here come from the
``swagger-ui-bundle-v2`` package (Swagger UI 5, which reads OpenAPI 3.1) and are served under
``/docs-assets``. Every admin and device endpoint declares the ``bearer`` security scheme (``deps.py``),
so "Authorize" takes an API token (or a device credential) and "Try it out" sends it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

log = logging.getLogger(__name__)
ASSETS = "/docs-assets"


def swagger_ui_dir() -> Path | None:
    """Where the installed Swagger UI files are, or None when the package is missing."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return None
    path = Path(str(swagger_ui_path))
    return path if (path / "swagger-ui-bundle.js").is_file() else None


def install(app: FastAPI) -> None:
    """Serve ``/docs`` from local files; create the app with ``docs_url=None, redoc_url=None``."""
    assets = swagger_ui_dir()
    if assets is not None:
        app.mount(ASSETS, StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs(request: Request) -> HTMLResponse:
        root = str(request.scope.get("root_path", ""))
        if assets is None:
            return HTMLResponse(
                "<p>The API docs need Swagger UI's files: <code>pip install swagger-ui-bundle-v2</code> "
                f"(part of <code>edgepack[server]</code>). The API description is at "
                f"<a href='{root}{app.openapi_url}'>{app.openapi_url}</a>.</p>", status_code=503)
        params: dict[str, Any] = {"persistAuthorization": True}
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}", title=f"{app.title}: API",
            swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js", swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS}/favicon-32x32.png", swagger_ui_parameters=params)
