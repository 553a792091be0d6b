"""Accounts: creation, password checks (argon2id) and roles."""

from __future__ import annotations

import re

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


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InvalidInputError(f"the password needs at least {MIN_PASSWORD_LENGTH} characters")
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


def authenticate(session: Session, *, name: str, password: str) -> Account:
    """The account with these credentials; one message for every failure (no name probing).
    Reads only: the password check (argon2, tens of ms and 64 MiB) holds no write lock;
    ``record_login`` then writes what a login changes."""
    account = find_account(session, name=name)
    try:
        _hasher.verify(account.password_hash if account else _DUMMY_HASH, password)
    except (VerificationError, InvalidHashError):
        account = None
    if account is None or account.disabled:
        raise UnauthorizedError("wrong name or password")
    return account


def rehashed(account: Account, password: str) -> str | None:
    """The password hashed again when the account's hash has older parameters (None if not):
    computed before the write that stores it."""
    return _hasher.hash(password) if _hasher.check_needs_rehash(account.password_hash) else None


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
