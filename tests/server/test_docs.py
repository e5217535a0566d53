"""``/docs`` works without internet access (Swagger UI from a local package, no CDN) and declares the bearer
scheme, so "Authorize" with an API token and "Try it out" reach the API."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.server.conftest import LiveServer


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_docs_page_is_served_offline_and_declares_the_bearer_scheme(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        page = client.get("/docs")
        assert page.status_code == 200 and "swagger-ui" in page.text
        urls = re.findall(r"""(?:src|href|url)\s*[:=]\s*['"]([^'"]+)['"]""", page.text)
        assert urls and all(u.startswith("/") for u in urls), urls  # everything from this server: no CDN
        for url in urls:
            asset = client.get(url)
            assert asset.status_code == 200 and asset.content, url
        assert client.get("/docs-assets/swagger-ui-bundle.js").headers["content-type"].startswith(
            ("application/javascript", "text/javascript"))
        spec = client.get("/openapi.json").json()
        assert spec["components"]["securitySchemes"]["bearer"] == {
            "type": "http", "scheme": "bearer", "description": spec["components"]["securitySchemes"]["bearer"][
                "description"]}
        assert spec["paths"]["/api/v1/bundles"]["get"]["security"] == [{"bearer": []}]
        assert {"bearer": []} in spec["paths"]["/api/v1/devices/{device_id}/checkin"]["post"]["security"]
        # what "Try it out" sends after "Authorize": the same request with the token as a bearer header
        assert client.get("/api/v1/bundles").status_code == 401
        assert client.get("/api/v1/bundles", headers={"Authorization": f"Bearer {server.token}"}).status_code == 200
        assert client.get("/redoc").status_code == 404  # ReDoc would need a CDN: not offered
