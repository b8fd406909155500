"""The service's ``/docs`` page without the internet: Swagger UI's files served by the service itself.

FastAPI's default ``/docs`` page loads Swagger UI's JavaScript and CSS from a CDN, so on a machine
without internet access (a factory floor, an air-gapped cluster, a laptop on a train) it is a blank
page. The ``swagger-ui-bundle`` package (in the ``serve`` extra) ships those files; this module
serves them under ``/docs/assets`` and points the page at them. Without the package the page falls
back to FastAPI's CDN version, so an older install keeps working where it is online.

The Swagger UI that package ships (3.x) refuses an OpenAPI 3.1 document ("does not specify a valid
version field"), and FastAPI writes 3.1; the page therefore reads ``/docs/openapi.json``, the same
document labelled 3.0.3 (what it uses of 3.1 renders the same), while ``/openapi.json`` stays as it is.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("signscale.serving.serve")

ASSETS = "/docs/assets"


def bundle_path() -> str | None:
    """The folder holding swagger-ui-bundle.js and swagger-ui.css, or None without the package."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return None
    return str(swagger_ui_path)


def add_docs(app: Any, *, title: str) -> bool:
    """Add ``/docs`` (and its assets) to a FastAPI app built with ``docs_url=None``; True if offline."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from starlette.responses import HTMLResponse

    path = bundle_path()
    if path is None:
        log.warning("/docs loads Swagger UI from a CDN: pip install swagger-ui-bundle (the 'serve' extra) "
                    "to serve it offline")
        assets: dict[str, str] = {}
    else:
        from starlette.staticfiles import StaticFiles

        app.mount(ASSETS, StaticFiles(directory=path), name="docs-assets")
        assets = {"swagger_js_url": f"{ASSETS}/swagger-ui-bundle.js", "swagger_css_url": f"{ASSETS}/swagger-ui.css",
                  "swagger_favicon_url": f"{ASSETS}/favicon-32x32.png"}

    spec_url = app.openapi_url
    if path is not None:
        spec_url = f"{ASSETS.rsplit('/', 1)[0]}/openapi.json"

        @app.get(spec_url, include_in_schema=False)
        async def docs_spec() -> dict[str, Any]:
            return {**app.openapi(), "openapi": "3.0.3"}

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=spec_url, title=f"{title} - API", **assets)

    return path is not None
