"""Liveness and readiness."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter
from sqlalchemy import text

from app.deps import SessionDep
from app.schemas.project import Health

router = APIRouter(tags=["health"])


def _version() -> str:
    try:
        return version("tessera")
    except PackageNotFoundError:
        return "unknown"


@router.get("/healthz", response_model=Health, summary="The service and its database answer")
def healthz(session: SessionDep) -> Health:
    session.execute(text("SELECT 1"))
    return Health(status="ok", database=session.get_bind().dialect.name, version=_version())
