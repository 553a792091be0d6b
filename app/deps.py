"""Request-scoped dependencies shared by the JSON API and the pages."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Annotated, TypeVar

from fastapi import Cookie, Depends, Path, Request, Response
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.models import Account, Role, Volunteer
from app.ratelimit import RateLimiter
from app.security import (
    CSRF_COOKIE,
    CSRF_FIELD,
    CSRF_HEADER,
    SESSION_COOKIE,
    VOLUNTEER_COOKIE,
    Signer,
    same_secret,
)
from app.services.account import has_role
from app.services.crowd.fuser import Fuser
from app.services.crowd.picker import Client
from app.services.errors import (
    ForbiddenError,
    LengthRequiredError,
    TooLargeError,
    UnauthorizedError,
)
from app.services.tile import PictureCache
from app.services.volunteer import find_volunteer, get_or_create_volunteer

ResponseT = TypeVar("ResponseT", bound=Response)
COOKIE_MAX_AGE_S = 400 * 24 * 3600  # browsers cap cookies at about 400 days


async def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_signer(request: Request) -> Signer:
    signer: Signer = request.app.state.signer
    return signer


def _session(factory: sessionmaker[Session]) -> Iterator[Session]:
    session = factory()
    try:
        yield session
    finally:
        session.rollback()  # handlers commit once; anything uncommitted is dropped
        session.close()


unit_of_work = contextmanager(_session)


def get_session(request: Request) -> Iterator[Session]:
    """A session for reading (and small writes)."""
    yield from _session(request.app.state.session_factory)


def get_write_session(request: Request) -> Iterator[Session]:
    """A session for read-modify-write units (leasing, submitting): serialised on SQLite."""
    yield from _session(request.app.state.write_session_factory)


# A row id in a URL, within the id columns' range (INTEGER: 32 bits on PostgreSQL); a larger
# one would fail inside the database driver instead of being refused with a 422.
RowId = Annotated[int, Path(ge=1, le=2**31 - 1, description="a row id")]


async def get_fuser(request: Request) -> Fuser:
    fuser: Fuser = request.app.state.fuser
    return fuser


SessionDep = Annotated[Session, Depends(get_session)]
FuserDep = Annotated[Fuser, Depends(get_fuser)]
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
    public_id = signer.read_volunteer_cookie(cookie)
    if public_id is None:
        limit_new_volunteers(request)
    volunteer, created = get_or_create_volunteer(session, public_id=public_id)
    if created:
        _set_volunteer_cookie(request, response, signer, volunteer)
    return volunteer


def set_private_cookie(
    request: Request, response: Response, name: str, value: str, *, max_age: int | None = None
) -> None:
    """Set one of Tessera's cookies: out of scripts' reach, same-site, HTTPS-only in
    production and whenever the request came over HTTPS."""
    settings: Settings = request.app.state.settings
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        httponly=True,
        samesite="lax",
        # Production, or any request that came over HTTPS (a TLS proxy's, with trusted_proxies).
        secure=settings.environment == "production" or request.url.scheme == "https",
    )


def _set_volunteer_cookie(
    request: Request, response: Response, signer: Signer, volunteer: Volunteer
) -> None:
    value = signer.volunteer_cookie(volunteer.public_id)
    set_private_cookie(request, response, VOLUNTEER_COOKIE, value, max_age=COOKIE_MAX_AGE_S)


VolunteerDep = Annotated[Volunteer, Depends(current_volunteer)]


def client_address(request: Request) -> str:
    """The address the request came from (its proxy's forwarded one where trusted)."""
    return request.client.host if request.client else "unknown"


def limit_new_volunteers(request: Request) -> None:
    """Count a request that will make a new anonymous volunteer against its client address."""
    limiter: RateLimiter = request.app.state.identity_limiter
    limiter.hit(client_address(request))


def limit_address(request: Request) -> None:
    """Count a task request against its client address (before any volunteer is made)."""
    limiter: RateLimiter = request.app.state.address_limiter
    limiter.hit(client_address(request))


@dataclass(frozen=True)
class TaskCaller:
    """A volunteer's task request, as far as it is known without the database: resolved on the
    event loop (no threadpool hop), its address and cookie already counted against their rate
    limits. The handler then does all of its database work in one hop (``unit``): the
    volunteer is looked up (or made) in the request's own transaction, so that on SQLite the
    writer's turn is held for one stretch of work, not across the framework's hops."""

    request: Request
    response: Response
    settings: Settings
    signer: Signer
    fuser: Fuser
    public_id: str | None  # the cookie's identity, when it carries a valid one

    def unit(self) -> AbstractContextManager[Session]:
        """A write session for the request's one transaction (uncommitted work is dropped)."""
        return unit_of_work(self.request.app.state.write_session_factory)

    def client(self) -> Client:
        """The caller's address, as a keyed hash, and its cap of open tasks."""
        address = client_address(self.request)
        return Client(self.signer.client_key(address), self.settings.open_tasks_per_address)

    def volunteer(self, session: Session) -> Volunteer:
        """The caller's volunteer, a copy of its row (the task path writes with statements); a
        first visit gets a new anonymous identity (and its cookie, and its first count against
        the volunteer limit)."""
        volunteer, created = get_or_create_volunteer(
            session, public_id=self.public_id, read_only=True
        )
        if created:
            _set_volunteer_cookie(self.request, self.response, self.signer, volunteer)
            self.request.app.state.volunteer_limiter.hit(volunteer.public_id)
        return volunteer


async def task_caller(
    request: Request,
    response: Response,
    settings: SettingsDep,
    signer: SignerDep,
    fuser: FuserDep,
    cookie: Annotated[str | None, Cookie(alias=VOLUNTEER_COOKIE)] = None,
) -> TaskCaller:
    limit_address(request)
    public_id = signer.read_volunteer_cookie(cookie)
    if public_id is not None:
        limiter: RateLimiter = request.app.state.volunteer_limiter
        limiter.hit(public_id)
    else:
        limit_new_volunteers(request)
    return TaskCaller(request, response, settings, signer, fuser, public_id)


TaskCallerDep = Annotated[TaskCaller, Depends(task_caller)]


def known_volunteer(
    session: SessionDep,
    signer: SignerDep,
    cookie: Annotated[str | None, Cookie(alias=VOLUNTEER_COOKIE)] = None,
) -> Volunteer | None:
    """The volunteer behind the cookie, if any; never creates one."""
    public_id = signer.read_volunteer_cookie(cookie)
    return find_volunteer(session, public_id=public_id) if public_id else None


KnownVolunteerDep = Annotated[Volunteer | None, Depends(known_volunteer)]

# Pictures a grid shows: nine tiles, and a context picture or two.
PICTURES_PER_TASK_REQUEST = 12


@dataclass(frozen=True)
class Pictures:
    """Tiles and context pictures: rendered once per task (``PictureCache``) and limited per
    volunteer (``PICTURES_PER_TASK_REQUEST`` times the task requests they may make), not per
    address: a class behind one address fetches far more pictures than task requests."""

    cache: PictureCache
    limiter: RateLimiter

    def limit(self, volunteer: Volunteer) -> None:
        self.limiter.hit(volunteer.public_id)


async def get_pictures(request: Request) -> Pictures:
    pictures: Pictures = request.app.state.pictures
    return pictures


PicturesDep = Annotated[Pictures, Depends(get_pictures)]


def logged_in_account(
    session: SessionDep,
    signer: SignerDep,
    cookie: Annotated[str | None, Cookie(alias=SESSION_COOKIE)] = None,
) -> Account | None:
    """The account of the login session, if any: a disabled account, or a session issued
    before the account's sessions were revoked (``revoke_sessions``), counts as logged out."""
    login = signer.read_session_cookie(cookie)
    if login is None:
        return None
    account = session.get(Account, login[0])
    if account is None or account.disabled or account.session_epoch != login[1]:
        return None
    return account


AccountDep = Annotated[Account | None, Depends(logged_in_account)]


def require_role(role: Role) -> Callable[[Account | None], Account]:
    """A dependency: the logged-in account if it has ``role`` or more; 401 or 403 if not."""

    def check(account: AccountDep) -> Account:
        if account is None:
            raise UnauthorizedError("log in first: this page is for curators")
        if not has_role(account, role):
            raise ForbiddenError(f"this needs the {role} role; you are a {account.role}")
        return account

    return check


_curator = require_role(Role.CURATOR)
CuratorDep = Annotated[Account, Depends(_curator)]
# The same check (run once per request) as a route's dependency, to run before the others
# (before a form is read).
CuratorChecked = Depends(_curator)
AdminDep = Annotated[Account, Depends(require_role(Role.ADMIN))]


def csrf_token(
    request: Request,
    signer: SignerDep,
    cookie: Annotated[str | None, Cookie(alias=CSRF_COOKIE)] = None,
) -> str:
    """The CSRF token to render into this page's forms.

    On a first visit a new one is made; ``with_csrf_cookie`` puts its cookie on the page's
    response (a dependency's ``Response`` is not merged into a response the route returns).
    """
    nonce = signer.read_csrf_cookie(cookie)
    if nonce is None:
        nonce = secrets.token_urlsafe(24)
        request.state.new_csrf_cookie = signer.csrf_cookie(nonce)
    return nonce


def with_csrf_cookie(request: Request, response: ResponseT) -> ResponseT:
    """Set the CSRF cookie that ``csrf_token`` made for this request, if it made one."""
    value = getattr(request.state, "new_csrf_cookie", None)
    if value is not None:
        set_private_cookie(request, response, CSRF_COOKIE, value)
    return response


CsrfTokenDep = Annotated[str, Depends(csrf_token)]


async def check_csrf(
    request: Request,
    signer: SignerDep,
    cookie: Annotated[str | None, Cookie(alias=CSRF_COOKIE)] = None,
) -> None:
    """Refuse a state-changing request whose token does not match its signed cookie (403)."""
    expected = signer.read_csrf_cookie(cookie)
    sent = request.headers.get(CSRF_HEADER)
    if sent is None and request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        form = await request.form()
        value = form.get(CSRF_FIELD)
        sent = value if isinstance(value, str) else None
    if expected is None or sent is None or not same_secret(expected, sent):
        raise ForbiddenError(
            "the form's security token is missing or stale: reload the page and try again"
        )


CsrfChecked = Depends(check_csrf)


def check_upload_length(request: Request, settings: SettingsDep) -> None:
    """Refuse an upload by its declared length, before a byte of its body is read or spooled."""
    length = request.headers.get("content-length")
    if length is None or not length.isdigit():
        raise LengthRequiredError("an upload must say its length (Content-Length)")
    if int(length) > settings.max_upload_bytes:
        raise TooLargeError(
            f"the upload is {int(length):,} bytes, more than {settings.max_upload_bytes:,} "
            "(TESSERA_MAX_UPLOAD_BYTES); import a larger archive with `tessera import`"
        )


UploadLengthChecked = Depends(check_upload_length)
