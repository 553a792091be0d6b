"""Signed values: the anonymous volunteer cookie, the task tokens, the login session and CSRF.

All are signed with the project's secret key (itsdangerous, HMAC-SHA1 over a salted key
derivation), with a different salt each, so that a cookie can never pass as a token.

CSRF: the signed double-submit pattern. Every page that has a form sets a ``tessera_csrf``
cookie (HttpOnly, SameSite=Lax) holding a signed random value and renders the value into its
forms; a state-changing request must send the value back (form field ``csrf_token`` or header
``X-CSRF-Token``) next to the cookie. Another site can make the browser send the cookie but can
neither read it nor forge its signature.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from dataclasses import dataclass

from itsdangerous import BadSignature, SignatureExpired, URLSafeSerializer, URLSafeTimedSerializer

VOLUNTEER_COOKIE = "tessera_volunteer"
SESSION_COOKIE = "tessera_session"
CSRF_COOKIE = "tessera_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
SESSION_MAX_AGE_S = 12 * 3600


class TokenProblem(enum.StrEnum):
    MALFORMED = "malformed"
    BAD_SIGNATURE = "bad_signature"
    EXPIRED = "expired"


class TokenError(ValueError):
    def __init__(self, problem: TokenProblem, message: str) -> None:
        super().__init__(message)
        self.problem = problem


@dataclass(frozen=True)
class TaskClaims:
    task_id: int
    nonce: str
    volunteer: str  # the volunteer's public id
    tiles: int


class Signer:
    def __init__(self, secret: str) -> None:
        self._cookie = URLSafeSerializer(secret, salt="tessera.volunteer")
        self._task = URLSafeTimedSerializer(secret, salt="tessera.task")
        self._session = URLSafeTimedSerializer(secret, salt="tessera.session")
        self._csrf = URLSafeSerializer(secret, salt="tessera.csrf")
        # Keys the tiles' variations (``tile_seed``): derived from the secret, never sent.
        self.tile_key = hashlib.blake2b(
            secret.encode(), digest_size=32, person=b"tessera.tile"
        ).digest()

    def client_key(self, address: str) -> str:
        """A keyed hash of a client address (32 hex digits): the same address always gives the
        same key, and the key does not give the address back."""
        return hashlib.blake2b(address.encode(), digest_size=16, key=self.tile_key).hexdigest()

    def session_cookie(self, account_id: int, epoch: int) -> str:
        return self._session.dumps([account_id, epoch])

    def read_session_cookie(self, value: str | None) -> tuple[int, int] | None:
        """The account id and session epoch of a login session, or None when missing, forged,
        too old or of the old form (an id alone, which cannot be revoked)."""
        if not value:
            return None
        try:
            data = self._session.loads(value, max_age=SESSION_MAX_AGE_S)
        except BadSignature:  # SignatureExpired is a BadSignature
            return None
        if (
            isinstance(data, list)
            and len(data) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in data)
        ):
            return data[0], data[1]
        return None

    def csrf_cookie(self, nonce: str) -> str:
        return self._csrf.dumps(nonce)

    def read_csrf_cookie(self, value: str | None) -> str | None:
        if not value:
            return None
        try:
            nonce = self._csrf.loads(value)
        except BadSignature:
            return None
        return nonce if isinstance(nonce, str) else None

    def volunteer_cookie(self, public_id: str) -> str:
        return self._cookie.dumps(public_id)

    def read_volunteer_cookie(self, value: str | None) -> str | None:
        """The public id in a cookie, or None when it is missing or forged."""
        if not value:
            return None
        try:
            public_id = self._cookie.loads(value)
        except BadSignature:
            return None
        return public_id if isinstance(public_id, str) else None

    def task_token(self, claims: TaskClaims) -> str:
        return self._task.dumps([claims.task_id, claims.nonce, claims.volunteer, claims.tiles])

    def read_task_token(self, token: str, *, max_age_s: int) -> TaskClaims:
        try:
            payload = self._task.loads(token, max_age=max_age_s)
        except SignatureExpired as exc:
            raise TokenError(
                TokenProblem.EXPIRED, "this task has expired; fetch a new one"
            ) from exc
        except BadSignature as exc:
            raise TokenError(
                TokenProblem.BAD_SIGNATURE, "the task token is not one this server issued"
            ) from exc
        try:
            task_id, nonce, volunteer, tiles = payload
            return TaskClaims(int(task_id), str(nonce), str(volunteer), int(tiles))
        except (TypeError, ValueError) as exc:
            raise TokenError(TokenProblem.MALFORMED, "the task token is malformed") from exc


def same_secret(expected: str, sent: str) -> bool:
    """Whether ``sent`` is the secret ``expected``, in constant time. Compared as UTF-8 bytes:
    ``hmac.compare_digest`` refuses str with non-ASCII characters (a TypeError, which a header
    sent by anyone turned into a 500)."""
    return hmac.compare_digest(expected.encode(), sent.encode(errors="surrogateescape"))
