"""Rate limits on the task endpoints, per volunteer and per client address."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.main import create_app
from app.models import Volunteer
from app.ratelimit import RateLimiter, RateLimitExceeded
from tests.app.conftest import SLUG, Live


def test_the_window_slides() -> None:
    limiter = RateLimiter(3, "volunteer")
    for t in (0.0, 1.0, 2.0):
        limiter.hit("a", now=t)
    with pytest.raises(RateLimitExceeded, match="at most 3 a minute") as caught:
        limiter.hit("a", now=30.0)
    assert caught.value.retry_after_s == 31
    limiter.hit("b", now=30.0)  # another key has its own budget
    limiter.hit("a", now=60.5)  # the first hit has left the window
    RateLimiter(0, "volunteer").hit("a")  # 0: no limit


def test_a_flooding_volunteer_gets_429_with_retry_after(live: Live) -> None:
    settings = live.settings.model_copy(update={"rate_limit_volunteer_per_minute": 5})
    client = TestClient(create_app(settings))
    statuses = [client.get(f"/api/projects/{SLUG}/tasks/next").status_code for _ in range(7)]
    assert statuses[:5] == [200] * 5 and statuses[5:] == [429, 429]
    refused = client.get(f"/api/projects/{SLUG}/tasks/next")
    assert "at most 5 a minute" in refused.json()["detail"]
    assert int(refused.headers["retry-after"]) > 0
    # Another volunteer (another cookie) from the same address is not held back.
    assert TestClient(client.app).get(f"/api/projects/{SLUG}/tasks/next").status_code == 200


def test_an_address_limit_stops_cookie_less_floods_before_they_make_volunteers(
    live: Live,
) -> None:
    settings = live.settings.model_copy(update={"rate_limit_address_per_minute": 4})
    app = create_app(settings)
    statuses = [
        TestClient(app).get(f"/api/projects/{SLUG}/tasks/next").status_code for _ in range(10)
    ]
    assert statuses.count(200) == 4 and statuses.count(429) == 6
    with live.factory() as session:
        assert session.scalar(select(func.count()).select_from(Volunteer)) == 4
