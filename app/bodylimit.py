"""Every request body capped before it is read: small for the JSON API and forms, the upload
limit for the archive import, the painted-mask limit for a curator's mask.

A body whose ``Content-Length`` is over its route's cap is refused with a 413 before a byte of
it is read; a body without one (chunked) is counted as it is read and refused at the cap
(Starlette's ``RequestBodyLimitMiddleware``). Without this, a 200 MB JSON answer was read whole
before the schema refused it.
"""

from __future__ import annotations

import re

from starlette.datastructures import Headers
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from app.config import Settings
from app.services.curation.mask_edit import MAX_MASK_BYTES

FORM_OVERHEAD = 64 * 1024  # a multipart form's other fields and boundaries
MASK_ROUTE = re.compile(r"^/curate/targets/\d+/mask$")
IMPORT_ROUTE = "/curate/import"


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.default = settings.max_body_bytes
        self.upload = settings.max_upload_bytes + FORM_OVERHEAD
        self.mask = MAX_MASK_BYTES + FORM_OVERHEAD
        # One limiter per cap, built once.
        self.limited = {
            cap: RequestBodyLimitMiddleware(app, cap)
            for cap in {self.default, self.upload, self.mask}
        }

    def cap_for(self, path: str) -> int:
        if path == IMPORT_ROUTE:
            return self.upload
        if MASK_ROUTE.match(path):
            return self.mask
        return self.default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cap = self.cap_for(scope["path"])
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > cap:
            refused = JSONResponse(
                {"detail": f"the request body is {int(length):,} bytes, more than {cap:,}"},
                status_code=413,
            )
            await refused(scope, receive, send)
            return
        await self.limited[cap](scope, receive, send)
