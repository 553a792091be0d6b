"""Security headers on every response, and the hosts the server answers to.

- ``Content-Security-Policy``: scripts, styles, images and connections from this server only
  (styles may be inline: the curator's target view places cells with ``style`` attributes;
  images may be ``data:`` or ``blob:`` URLs, which the curator's mask painter makes); no
  plugins, no ``<base>``, forms post here only, and no page may frame ours
  (``frame-ancestors 'none'``: a volunteer cannot be tricked into clicking through an
  invisible frame). ``/docs`` (Swagger UI) also runs its one inline script.
- ``X-Content-Type-Options: nosniff``, ``Referrer-Policy: same-origin``,
  ``X-Frame-Options: DENY`` (older browsers' ``frame-ancestors``).
- ``Strict-Transport-Security`` when the request came over HTTPS (behind a proxy, only when
  ``trusted_proxies`` lets the server believe the proxy's ``X-Forwarded-Proto``).

``allowed_hosts`` (not ``*``) refuses a request for any other Host with a 400, as Starlette's
``TrustedHostMiddleware`` does. Pages build their links as paths, never from the Host header.
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
DOCS_CSP = CSP.replace("script-src 'self'", "script-src 'self' 'unsafe-inline'")
HSTS = "max-age=31536000"


class SecurityHeadersMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = DOCS_CSP if scope["path"].startswith("/docs") else CSP
        secure = scope.get("scheme") == "https"

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("Content-Security-Policy", policy)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("X-Frame-Options", "DENY")
                headers.setdefault("Referrer-Policy", "same-origin")
                if secure:
                    headers.setdefault("Strict-Transport-Security", HSTS)
            await send(message)

        await self.app(scope, receive, with_headers)
