"""Signed values: the anonymous volunteer cookie and the task tokens.

Both are signed with the project's secret key (itsdangerous, HMAC-SHA1 over a salted key
derivation), with a different salt each, so that a cookie can never pass as a token.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from itsdangerous import BadSignature, SignatureExpired, URLSafeSerializer, URLSafeTimedSerializer

VOLUNTEER_COOKIE = "tessera_volunteer"


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
