"""Request rate limits per volunteer and per client address (sliding one-minute windows).

In-process: each worker process keeps its own counts, so with N workers behind a load balancer
the effective limit is up to N times the setting (put a shared limiter such as the proxy's in
front for a hard cap). A limit of 0 turns that limit off.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.config import Settings

WINDOW_S = 60.0


class RateLimitExceeded(Exception):
    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RateLimiter:
    """At most ``per_minute`` events per key in any ``window_s`` seconds (a minute unless
    said); ``what`` names the key in the message ("volunteer", "address")."""

    def __init__(
        self,
        per_minute: int,
        what: str,
        *,
        max_keys: int = 100_000,
        window_s: float = WINDOW_S,
        refused: str = "too many requests from this {what}",
    ) -> None:
        self.per_minute, self.what, self.max_keys = per_minute, what, max_keys
        self.window_s, self.refused = window_s, refused
        self._hits: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def hit(self, key: str, now: float | None = None) -> None:
        """Count one request for ``key``; raise ``RateLimitExceeded`` when over the limit."""
        self._admit(key, now, count=True)

    def check(self, key: str, now: float | None = None) -> None:
        """Raise ``RateLimitExceeded`` if ``key`` is at its limit now, counting nothing (the
        event is counted afterwards, by ``hit``, only if it turns out to count: a failure)."""
        self._admit(key, now, count=False)

    def _admit(self, key: str, now: float | None, *, count: bool) -> None:
        if self.per_minute <= 0:
            return
        now = time.monotonic() if now is None else now
        with self._lock:
            hits = self._hits.get(key)
            if hits is None:
                if not count:
                    return
                if len(self._hits) >= self.max_keys:  # forget the idlest keys, not the limit
                    self._prune(now)
                hits = self._hits[key] = deque()
            while hits and hits[0] <= now - self.window_s:
                hits.popleft()
            if len(hits) >= self.per_minute:
                retry = int(hits[0] + self.window_s - now) + 1
                span = "a minute" if self.window_s == WINDOW_S else f"in {self.window_s:g} s"
                raise RateLimitExceeded(
                    f"{self.refused.format(what=self.what)}: at most {self.per_minute} "
                    f"{span}; try again in {retry} s",
                    retry,
                )
            if count:
                hits.append(now)

    def _prune(self, now: float) -> None:
        stale = [k for k, h in self._hits.items() if not h or h[-1] <= now - self.window_s]
        for key in stale or list(self._hits)[: len(self._hits) // 2]:
            del self._hits[key]


LOGIN_WINDOW_S = 15 * 60.0


@dataclass(frozen=True)
class LoginLimits:
    """Password guessing: wrong passwords per account name (the account is then refused for
    the rest of ``LOGIN_WINDOW_S``, whatever the password: a guesser cannot tell the right one
    from the lock), and every attempt per client address (one address guessing many names).
    In-process, like the request limits."""

    failures: RateLimiter  # by account name, counted on a wrong password
    attempts: RateLimiter  # by client address, every attempt

    @classmethod
    def from_settings(cls, settings: Settings) -> LoginLimits:
        return cls(
            RateLimiter(
                settings.login_failures_per_account,
                "account",
                window_s=LOGIN_WINDOW_S,
                refused="too many wrong passwords for this {what}",
            ),
            RateLimiter(
                settings.login_attempts_per_address,
                "address",
                window_s=LOGIN_WINDOW_S,
                refused="too many logins from this {what}",
            ),
        )
