"""``/metrics`` in the Prometheus text format (optionally behind a bearer token)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.deps import SettingsDep
from app.security import same_secret
from app.services.errors import UnauthorizedError

router = APIRouter(include_in_schema=False)


@router.get("/metrics")
def metrics(request: Request, settings: SettingsDep) -> Response:
    if settings.metrics_token:
        sent = request.headers.get("authorization", "").removeprefix("Bearer ")
        if not same_secret(sent, settings.metrics_token):
            raise UnauthorizedError("/metrics needs the TESSERA_METRICS_TOKEN as a bearer token")
    body = generate_latest(request.app.state.metrics_registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
