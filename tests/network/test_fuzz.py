"""An OpenAPI-driven fuzz run (schemathesis) over the server's own schema: whatever a
client sends, with or without a valid device token, the answer is never a 5xx.

Bounded: a fixed number of generated requests per endpoint, no deadline per example.
The server is built when the module is collected (schemathesis needs the app then),
in a temporary folder; its round opens on the first example.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from tests.network.conftest import Harness, tiny_fedavg
from veil.network import ServerSettings

#: Generated requests per endpoint: a quick pass by default, a longer one when slow.
QUICK, LONG = 4, 100

_FOLDER = tempfile.TemporaryDirectory(prefix="veil-fuzz-")
_HARNESS = Harness(
    Path(_FOLDER.name), tiny_fedavg(fraction=1.0), ServerSettings(round_timeout=600)
)
schema = schemathesis.openapi.from_asgi("/openapi.json", _HARNESS.http.app)
_TOKENS: list[str] = []


def _token() -> str:
    if not _TOKENS:
        _TOKENS.append(_HARNESS.enrol(0))
        _HARNESS.open_round(1)
    return _TOKENS[0]


def _check(case: Any) -> None:
    token = _token()
    case.call_and_validate(checks=[not_a_server_error])
    # Again as an enrolled client, so requests get past authentication.
    case.headers = {**(case.headers or {}), "Authorization": f"Bearer {token}"}
    case.call_and_validate(checks=[not_a_server_error])


@schema.parametrize()
@settings(max_examples=QUICK, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_makes_the_server_fail(case: Any) -> None:
    _check(case)


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=LONG, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_makes_the_server_fail_long(case: Any) -> None:
    _check(case)
