"""The API's interactive documentation, served whole from this server.

FastAPI's default ``/docs`` loads Swagger UI from a CDN, so without internet (a lab network, the
demo on a laptop on a train) it is a blank page. Here the page and its two assets come from the
``swagger-ui-py`` package's copy of Swagger UI 5, the first major version that renders the
OpenAPI 3.1 that FastAPI writes (4.x lists no operations for it).
"""

from __future__ import annotations

from pathlib import Path

import swagger_ui
from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

from app.services.errors import NotFoundError

router = APIRouter(include_in_schema=False)

ASSETS = Path(swagger_ui.__file__).resolve().parent / "static"
SERVED = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css"}


@router.get("/docs", response_class=HTMLResponse)
def docs(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url=request.app.openapi_url,
        title=f"{request.app.title} API",
        swagger_js_url="/docs/assets/swagger-ui-bundle.js",
        swagger_css_url="/docs/assets/swagger-ui.css",
        swagger_favicon_url="/static/favicon.svg",
    )


@router.get("/docs/assets/{name}")
def docs_asset(name: str) -> FileResponse:
    if name not in SERVED:
        raise NotFoundError(f"no documentation asset {name!r}")
    return FileResponse(
        ASSETS / name,
        media_type=SERVED[name],
        headers={"Cache-Control": "public, max-age=86400"},
    )
