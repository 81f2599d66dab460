"""An OpenAPI-driven fuzz run (schemathesis) over DSSGD's app: whatever a client
sends, with or without a valid device token and while it holds a turn, the answer is
never a 5xx.

Bounded: a fixed number of generated requests per endpoint, no deadline per example.
The service is built when the module is collected (schemathesis needs the app then),
in a temporary folder, with the async order so that the fuzzed client may always
hold a turn.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from tests.network.dssgd_harness import NetHarness
from tests.network.dssgd_harness import settings as dssgd_settings

#: Generated requests per endpoint: a quick pass by default, a longer one when slow.
QUICK, LONG = 4, 100

_FOLDER = tempfile.TemporaryDirectory(prefix="veil-dssgd-fuzz-")
_HARNESS = NetHarness(Path(_FOLDER.name), "async", 1000, dssgd_settings())
schema = schemathesis.openapi.from_asgi("/openapi.json", _HARNESS.http.app)
_TOKENS: list[str] = []


def _token() -> str:
    if not _TOKENS:
        _TOKENS.append(_HARNESS.enrol(0))
        _HARNESS.http.post(
            "/v1/dssgd/turn", headers={"Authorization": f"Bearer {_TOKENS[0]}"}
        )
    return _TOKENS[0]


def _check(case: Any) -> None:
    token = _token()
    case.call_and_validate(checks=[not_a_server_error])
    # Again as an enrolled client holding a turn, past authentication.
    case.headers = {**(case.headers or {}), "Authorization": f"Bearer {token}"}
    case.call_and_validate(checks=[not_a_server_error])


@schema.parametrize()
@settings(max_examples=QUICK, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_makes_the_service_fail(case: Any) -> None:
    _check(case)


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=LONG, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_makes_the_service_fail_long(case: Any) -> None:
    _check(case)
