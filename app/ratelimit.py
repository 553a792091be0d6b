"""Request rate limits per volunteer and per client address (sliding one-minute windows).

In-process: each worker process keeps its own counts, so with N workers behind a load balancer
the effective limit is up to N times the setting (put a shared limiter such as the proxy's in
front for a hard cap). A limit of 0 turns that limit off.
"""

from __future__ import annotations

import threading
import time
from collections import deque

WINDOW_S = 60.0


class RateLimitExceeded(Exception):
    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RateLimiter:
    def __init__(self, per_minute: int, what: str, *, max_keys: int = 100_000) -> None:
        self.per_minute, self.what, self.max_keys = per_minute, what, max_keys
        self._hits: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def hit(self, key: str, now: float | None = None) -> None:
        """Count one request for ``key``; raise ``RateLimitExceeded`` when over the limit."""
        if self.per_minute <= 0:
            return
        now = time.monotonic() if now is None else now
        with self._lock:
            hits = self._hits.get(key)
            if hits is None:
                if len(self._hits) >= self.max_keys:  # forget the idlest keys, not the limit
                    self._prune(now)
                hits = self._hits[key] = deque()
            while hits and hits[0] <= now - WINDOW_S:
                hits.popleft()
            if len(hits) >= self.per_minute:
                retry = int(hits[0] + WINDOW_S - now) + 1
                raise RateLimitExceeded(
                    f"too many requests from this {self.what}: at most {self.per_minute} a "
                    f"minute; try again in {retry} s",
                    retry,
                )
            hits.append(now)

    def _prune(self, now: float) -> None:
        stale = [k for k, h in self._hits.items() if not h or h[-1] <= now - WINDOW_S]
        for key in stale or list(self._hits)[: len(self._hits) // 2]:
            del self._hits[key]
