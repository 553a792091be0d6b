"""Accounts: creation, password checks (argon2id) and roles."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import utcnow
from app.models import Account, Role
from app.services.errors import ConflictError, InvalidInputError, NotFoundError, UnauthorizedError

MIN_PASSWORD_LENGTH = 10
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{2,80}$")
# argon2-cffi's defaults (RFC 9106's low-memory profile): 64 MiB, 3 passes.
_hasher = PasswordHasher()
# Verifying against this keeps a login for an unknown name as slow as one with a wrong password.
_DUMMY_HASH = _hasher.hash("not a password anyone has")
# One password hashed or checked at a time per process. Each takes 64 MiB and both cores for
# tens of milliseconds (4 lanes); sixteen at once left every other request without CPU (a
# volunteer's next grid took 30 s under 16 login loops), so logins queue among themselves.
_ONE_AT_A_TIME = threading.BoundedSemaphore(1)


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InvalidInputError(f"the password needs at least {MIN_PASSWORD_LENGTH} characters")
    with _ONE_AT_A_TIME:
        return _hasher.hash(password)


def find_account(session: Session, *, name: str) -> Account | None:
    return session.scalar(select(Account).where(Account.name == name))


def get_account(session: Session, *, account_id: int) -> Account:
    account = session.get(Account, account_id)
    if account is None:
        raise NotFoundError(f"no account {account_id}")
    return account


def list_accounts(session: Session) -> list[Account]:
    return list(session.scalars(select(Account).order_by(Account.name)))


def create_account(session: Session, *, name: str, password: str, role: Role) -> Account:
    if not NAME_PATTERN.match(name):
        raise InvalidInputError(
            "an account name is 2-80 letters, digits, dots, dashes or underscores"
        )
    if find_account(session, name=name) is not None:
        raise ConflictError(f"an account called {name!r} exists already")
    account = Account(name=name, password_hash=hash_password(password), role=role)
    session.add(account)
    session.flush()
    return account


def revoke_sessions(account: Account) -> None:
    """End every login session of the account issued so far (their cookies name an older
    session epoch)."""
    account.session_epoch = (account.session_epoch or 0) + 1


def update_account(
    account: Account,
    *,
    password: str | None = None,
    role: Role | None = None,
    disabled: bool | None = None,
) -> None:
    """Change an account's password, role or whether it is disabled; any change ends its
    login sessions (a stolen cookie must not outlive a new password or a lost role)."""
    if password is not None:
        account.password_hash = hash_password(password)
    if role is not None:
        account.role = role
    if disabled is not None:
        account.disabled = disabled
    if password is not None or role is not None or disabled is not None:
        revoke_sessions(account)


@dataclass(frozen=True)
class Credentials:
    """What checking a password needs of an account, read in a transaction of its own so that
    no database connection is held while argon2 runs (``check_password``)."""

    account_id: int | None  # None: no such account (checked against a dummy hash all the same)
    password_hash: str
    disabled: bool


def credentials_of(session: Session, *, name: str) -> Credentials:
    account = find_account(session, name=name)
    if account is None:
        return Credentials(None, _DUMMY_HASH, True)
    return Credentials(account.id, account.password_hash, account.disabled)


def check_password(credentials: Credentials, password: str) -> int:
    """The account id if the password is right; one message for every failure (no name
    probing). One check at a time per process (``_ONE_AT_A_TIME``); no database involved."""
    try:
        with _ONE_AT_A_TIME:
            _hasher.verify(credentials.password_hash, password)
    except (VerificationError, InvalidHashError):
        raise UnauthorizedError("wrong name or password") from None
    if credentials.account_id is None or credentials.disabled:
        raise UnauthorizedError("wrong name or password")
    return credentials.account_id


def authenticate(session: Session, *, name: str, password: str) -> Account:
    """The account with these credentials (``credentials_of`` then ``check_password``)."""
    account_id = check_password(credentials_of(session, name=name), password)
    account = session.get(Account, account_id)
    assert account is not None
    return account


def rehashed(credentials: Credentials, password: str) -> str | None:
    """The password hashed again when the account's hash has older parameters (None if not):
    computed before the write that stores it."""
    if not _hasher.check_needs_rehash(credentials.password_hash):
        return None
    with _ONE_AT_A_TIME:
        return _hasher.hash(password)


def record_login(session: Session, *, account_id: int, new_hash: str | None) -> Account:
    """Write a login: its time, and the password's new hash if it has one (``rehashed``)."""
    account = session.get(Account, account_id)
    if account is None or account.disabled:
        raise UnauthorizedError("wrong name or password")
    if new_hash is not None:
        account.password_hash = new_hash
    account.last_login_at = utcnow()
    return account


def has_role(account: Account | None, role: Role) -> bool:
    return account is not None and not account.disabled and account.role.rank >= role.rank
