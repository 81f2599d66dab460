"""An OpenAPI-driven fuzz run (schemathesis) over a secure server's schema, the
secure aggregation endpoints included: with or without a valid device token,
whatever is sent, the answer is never a 5xx. The round waits in its first step
(advertise keys) while the examples run."""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from tests.network.secagg_harness import SecureHarness, secure_fedavg

QUICK, LONG = 4, 100

_FOLDER = tempfile.TemporaryDirectory(prefix="veil-secagg-fuzz-")
_HARNESS = SecureHarness(Path(_FOLDER.name), secure_fedavg(), round_timeout=600)
schema = schemathesis.openapi.from_asgi("/openapi.json", _HARNESS.http.app)


def _token() -> str:
    if not _HARNESS.tokens:
        _HARNESS.enrol_all()
        threading.Thread(target=_HARNESS.server.run, args=(1,), daemon=True).start()
    return _HARNESS.tokens[0]


def _check(case: Any) -> None:
    token = _token()
    if "{rnd}" in case.path:
        case.path_parameters = {**(case.path_parameters or {}), "rnd": 1}
    case.call_and_validate(checks=[not_a_server_error])
    case.headers = {**(case.headers or {}), "Authorization": f"Bearer {token}"}
    case.call_and_validate(checks=[not_a_server_error])


@schema.parametrize()
@settings(max_examples=QUICK, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_makes_the_secure_server_fail(case: Any) -> None:
    _check(case)


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=LONG, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_makes_the_secure_server_fail_long(case: Any) -> None:
    _check(case)
