"""API fuzzing: schemathesis generates requests from the OpenAPI schema of the live app.

Every operation gets a bounded number of generated cases (``FUZZ_EXAMPLES`` each); none may
answer 5xx, and every response must match the schema (status codes, content types, bodies).
Each case starts without cookies, as a volunteer's first visit would. The cases are derandomised
(the same for the same code), so that CI never turns red by luck; a random run found the
display-name bug this schema now rules out (control characters that the service collapsed).

The operations are driven through schemathesis' Python API (``as_strategy`` + hypothesis)
rather than its pytest plugin, whose parametrisation does not run under this pytest.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from tests.app.conftest import Live

schemathesis = pytest.importorskip("schemathesis")

FUZZ_EXAMPLES = 30


def test_no_server_errors_and_responses_match_the_schema(live: Live) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", live.app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 6
    calls = 0
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=FUZZ_EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,  # the same cases on every run of the same code: no flaky CI
            suppress_health_check=list(HealthCheck),
        )
        def fuzz(case: object) -> None:
            nonlocal calls
            calls += 1
            case.call_and_validate()  # type: ignore[attr-defined]

        fuzz()
    print(f"fuzzed {len(operations)} operations with {calls} generated requests")
    assert calls >= len(operations) * 5
