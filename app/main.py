"""The FastAPI application: ``create_app(settings)``."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlencode

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry
from sqlalchemy.orm import Session, sessionmaker
from starlette.middleware.trustedhost import TrustedHostMiddleware

from app.api import api_router
from app.api import health as health_api
from app.api import metrics as metrics_api
from app.bodylimit import BodyLimitMiddleware
from app.config import Settings, get_settings
from app.db import Checkpointer, engine_for, make_session_factory
from app.deps import PICTURES_PER_TASK_REQUEST, Pictures
from app.headers import SecurityHeadersMiddleware
from app.pages import FRONTEND_DIR, templates
from app.pages import curate as curate_pages
from app.pages import curate_import as curate_import_pages
from app.pages import docs as docs_pages
from app.pages import home as home_pages
from app.pages import volunteer as volunteer_pages
from app.ratelimit import LoginLimits, RateLimiter, RateLimitExceeded
from app.security import Signer, TokenError, TokenProblem
from app.services.crowd.answer import GoneError
from app.services.crowd.fuser import Fuser
from app.services.crowd.picker import TooManyOpenTasks
from app.services.errors import (
    ConflictError,
    ForbiddenError,
    InvalidInputError,
    LengthRequiredError,
    NotFoundError,
    TooLargeError,
    UnauthorizedError,
)
from app.services.metrics import DatabaseCollector, RequestMetrics, RequestMetricsMiddleware
from app.services.project import get_project, list_project_summaries
from app.services.recompute import recompute_project
from app.services.tile import PictureCache

log = logging.getLogger(__name__)


def _wants_page(request: Request) -> bool:
    """Whether a person's browser asked for a page (not the API, not a script)."""
    accepts_html = "text/html" in request.headers.get("accept", "")
    return accepts_html and not request.url.path.startswith("/api")


ERROR_TITLES = {
    403: "Not allowed",
    404: "Not found",
    409: "Already done",
    410: "Gone",
    411: "Length required",
    413: "Too large",
    422: "That did not work",
}


def _json_safe(value: Any) -> Any:
    """FastAPI's list of what was wrong, echoing the input, made fit for JSON: a NaN, an
    infinity or a lone surrogate in a request's body was echoed back as given, and the response
    itself then failed (a 500 instead of the 422)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {_json_safe(k): _json_safe(v) for k, v in value.items()}
    return value


def _error_response(request: Request, status: int, message: str) -> Response:
    """The API's ``{"detail": ...}``, or for a page a page that says what went wrong and where
    to go on from (a curator's form must not end on raw JSON)."""
    if not _wants_page(request):
        return JSONResponse(status_code=status, content={"detail": message})
    curator = request.url.path.startswith(("/curate", "/admin"))
    return templates.TemplateResponse(
        request,
        "error.html",
        {
            "title": ERROR_TITLES.get(status, "Something went wrong"),
            "message": message,
            "back_url": "/curate" if curator else "/",
            "back_label": "Back to the curator's workspace" if curator else "Back to the start",
        },
        status_code=status,
    )


def _error_handlers(app: FastAPI) -> None:
    statuses: dict[type[Exception], int] = {
        NotFoundError: 404,
        ConflictError: 409,
        InvalidInputError: 422,
        TooLargeError: 413,
        LengthRequiredError: 411,
        ForbiddenError: 403,
        GoneError: 410,
    }
    for exc_type, status in statuses.items():

        def handler(request: Request, exc: Exception, status: int = status) -> Response:
            return _error_response(request, status, str(exc))

        app.add_exception_handler(exc_type, handler)

    async def invalid_handler(request: Request, exc: Exception) -> Response:
        """Malformed parameters: FastAPI's list for the API, a page saying which for a page."""
        assert isinstance(exc, RequestValidationError)
        if not _wants_page(request):
            return JSONResponse({"detail": _json_safe(jsonable_encoder(exc.errors()))}, 422)
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:]) or 'request'}: {e['msg']}"
            for e in exc.errors()
        )
        return _error_response(request, 422, problems)

    app.add_exception_handler(RequestValidationError, invalid_handler)

    def token_handler(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, TokenError)
        status = 410 if exc.problem == TokenProblem.EXPIRED else 400
        return JSONResponse(status_code=status, content={"detail": str(exc)})

    app.add_exception_handler(TokenError, token_handler)

    def login_handler(request: Request, exc: Exception) -> Response:
        """A page asked for without a login shows the login form (401); the API says why."""
        if not _wants_page(request):
            return JSONResponse(status_code=401, content={"detail": str(exc)})
        login_url = "/login?" + urlencode({"next": request.url.path})
        return templates.TemplateResponse(
            request,
            "unauthorized.html",
            {"message": str(exc), "login_url": login_url},
            status_code=401,
        )

    app.add_exception_handler(UnauthorizedError, login_handler)

    def rate_handler(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RateLimitExceeded | TooManyOpenTasks)
        return JSONResponse(
            status_code=429,
            content={"detail": str(exc)},
            headers={"Retry-After": str(exc.retry_after_s)},
        )

    app.add_exception_handler(RateLimitExceeded, rate_handler)
    app.add_exception_handler(TooManyOpenTasks, rate_handler)


class ConsensusTimer:
    """Runs the full EM pass over every project on a timer, in a background thread."""

    def __init__(self, settings: Settings, factory: sessionmaker[Session]) -> None:
        self.settings, self.factory = settings, factory
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="consensus-timer", daemon=True)

    def _loop(self) -> None:
        while not self.stop.wait(self.settings.consensus_interval_s):
            try:
                recompute_all(self.factory, self.settings)
            except Exception:  # keep serving; the next round tries again
                log.exception("the periodic consensus recomputation failed")


def recompute_all(factory: sessionmaker[Session], settings: Settings) -> None:
    with factory() as session:
        slugs = [p.slug for p in list_project_summaries(session)]
    for slug in slugs:
        with factory() as session:
            report = recompute_project(
                session, settings=settings, project=get_project(session, slug=slug)
            )
            session.commit()
        log.info("consensus of %s recomputed: %s", slug, report)


def _say_what_is_public(settings: Settings) -> None:
    """In production, say which read-only endpoints anyone may read, and how to close them."""
    if settings.environment != "production":
        return
    if not settings.metrics_token:
        log.warning("/metrics is public: set TESSERA_METRICS_TOKEN to ask for a bearer token")
    if settings.public_api_docs:
        log.warning(
            "/docs and /openapi.json are public: set TESSERA_PUBLIC_API_DOCS=false to close them"
        )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    # SQLite: the server's requests never checkpoint the log; a thread does (``Checkpointer``).
    engine = engine_for(settings, background_checkpoints=True)
    checkpointer = Checkpointer(engine) if settings.is_sqlite else None
    write_factory = make_session_factory(engine, writer=True)

    fuser = Fuser(settings, write_factory, reader=make_session_factory(engine))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        timer = ConsensusTimer(settings, write_factory)
        if settings.consensus_interval_s > 0:
            timer.thread.start()
        if settings.fusion == "background":
            fuser.thread.start()
            fuser.wake()  # answers a crash left unfused go first
        if checkpointer is not None:
            checkpointer.thread.start()
        yield
        timer.stop.set()
        if fuser.thread.is_alive():
            await asyncio.to_thread(fuser.close, drain=True)  # nothing left waiting
        if checkpointer is not None:
            await asyncio.to_thread(checkpointer.close)

    app = FastAPI(
        lifespan=lifespan,
        title="Tessera",
        summary="Turn tagged images into segmentation masks with a crowd in the loop.",
        version="0.1.0",
        # /docs is served from this server (app.pages.docs): the defaults load from a CDN.
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json" if settings.public_api_docs else None,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = make_session_factory(engine)
    app.state.write_session_factory = write_factory
    app.state.fuser = fuser
    app.state.checkpointer = checkpointer
    app.state.signer = Signer(settings.resolved_secret_key())
    app.state.volunteer_limiter = RateLimiter(settings.rate_limit_volunteer_per_minute, "volunteer")
    app.state.address_limiter = RateLimiter(settings.rate_limit_address_per_minute, "address")
    app.state.identity_limiter = RateLimiter(
        settings.rate_limit_new_volunteers_per_hour,
        "address",
        window_s=3600.0,
        refused="too many new volunteers from this {what}",
    )
    app.state.login_limits = LoginLimits.from_settings(settings)
    app.state.pictures = Pictures(
        PictureCache(),
        RateLimiter(
            settings.rate_limit_volunteer_per_minute * PICTURES_PER_TASK_REQUEST,
            "volunteer",
            refused="too many pictures for this {what}",
        ),
    )
    _error_handlers(app)
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(app.state.session_factory))
    app.state.metrics_registry = registry
    request_metrics = RequestMetrics(registry)

    app.add_middleware(BodyLimitMiddleware, settings=settings)  # inside: 413s are counted
    app.add_middleware(RequestMetricsMiddleware, metrics=request_metrics)
    app.add_middleware(SecurityHeadersMiddleware)
    hosts = [h.strip() for h in settings.allowed_hosts.split(",") if h.strip()]
    if hosts and hosts != ["*"]:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts)

    app.include_router(health_api.router)
    app.include_router(metrics_api.router)
    app.include_router(api_router)
    app.include_router(home_pages.router)
    app.include_router(volunteer_pages.router)
    app.include_router(curate_pages.router)
    app.include_router(curate_import_pages.router)
    if settings.public_api_docs:
        app.include_router(docs_pages.router)
    _say_what_is_public(settings)
    app.mount("/static", StaticFiles(directory=FRONTEND_DIR / "static"), name="static")
    return app
