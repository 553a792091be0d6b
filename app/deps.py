"""Request-scoped dependencies shared by the JSON API and the pages."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Cookie, Depends, Request, Response
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.models import Volunteer
from app.security import VOLUNTEER_COOKIE, Signer
from app.services.volunteer import find_volunteer, get_or_create_volunteer

COOKIE_MAX_AGE_S = 400 * 24 * 3600  # browsers cap cookies at about 400 days


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_signer(request: Request) -> Signer:
    signer: Signer = request.app.state.signer
    return signer


def _session(factory: sessionmaker[Session]) -> Iterator[Session]:
    session = factory()
    try:
        yield session
    finally:
        session.rollback()  # handlers commit once; anything uncommitted is dropped
        session.close()


def get_session(request: Request) -> Iterator[Session]:
    """A session for reading (and small writes)."""
    yield from _session(request.app.state.session_factory)


def get_write_session(request: Request) -> Iterator[Session]:
    """A session for read-modify-write units (leasing, submitting): serialised on SQLite."""
    yield from _session(request.app.state.write_session_factory)


SessionDep = Annotated[Session, Depends(get_session)]
WriteSessionDep = Annotated[Session, Depends(get_write_session)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SignerDep = Annotated[Signer, Depends(get_signer)]


def current_volunteer(
    request: Request,
    response: Response,
    session: WriteSessionDep,
    signer: SignerDep,
    cookie: Annotated[str | None, Cookie(alias=VOLUNTEER_COOKIE)] = None,
) -> Volunteer:
    """The volunteer behind the signed cookie; a first visit gets a new anonymous identity."""
    volunteer, created = get_or_create_volunteer(
        session, public_id=signer.read_volunteer_cookie(cookie)
    )
    if created:
        settings: Settings = request.app.state.settings
        response.set_cookie(
            VOLUNTEER_COOKIE,
            signer.volunteer_cookie(volunteer.public_id),
            max_age=COOKIE_MAX_AGE_S,
            httponly=True,
            samesite="lax",
            secure=settings.environment == "production",
        )
    return volunteer


VolunteerDep = Annotated[Volunteer, Depends(current_volunteer)]


def known_volunteer(
    session: SessionDep,
    signer: SignerDep,
    cookie: Annotated[str | None, Cookie(alias=VOLUNTEER_COOKIE)] = None,
) -> Volunteer | None:
    """The volunteer behind the cookie, if any; never creates one."""
    public_id = signer.read_volunteer_cookie(cookie)
    return find_volunteer(session, public_id=public_id) if public_id else None


KnownVolunteerDep = Annotated[Volunteer | None, Depends(known_volunteer)]
