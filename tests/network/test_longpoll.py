"""Long polls on ``GET /v1/task?wait=S``: held until a round opens, the wait ends
or the run ends, without holding up other requests or the server's shutdown."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.network.conftest import Harness, bearer, tiny_fedavg
from veil.experiment._network import start_uvicorn
from veil.learning._types import ClientResult
from veil.learning.encoding import encode
from veil.network import ServerSettings, create_app
from veil.network.app import MAX_TASK_WAIT


@pytest.fixture
def everyone(tmp_path: Path) -> Harness:
    """A harness whose rounds pick every client."""
    return Harness(
        tmp_path / "state",
        tiny_fedavg(fraction=1.0),
        ServerSettings(round_timeout=30),
    )


def _later(seconds: float, action: object) -> threading.Thread:
    def run() -> None:
        time.sleep(seconds)
        action()  # type: ignore[operator]

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_held_request_answers_as_soon_as_a_round_opens(everyone: Harness) -> None:
    token = everyone.enrol(0)
    opener = _later(0.3, lambda: everyone.open_round(1))
    start = time.monotonic()
    r = everyone.http.get("/v1/task", params={"wait": 8}, headers=bearer(token))
    took = time.monotonic() - start
    opener.join()
    assert r.status_code == 200, r.text
    assert r.json()["round"] == 1 and r.json()["client_id"] == 0
    assert 0.25 <= took < 4.0, took  # well before the 8 s asked


def test_a_held_request_answers_204_after_the_wait(everyone: Harness) -> None:
    token = everyone.enrol(0)
    start = time.monotonic()
    r = everyone.http.get("/v1/task", params={"wait": 0.5}, headers=bearer(token))
    took = time.monotonic() - start
    assert r.status_code == 204
    assert r.headers["Retry-After"] == "1"
    assert 0.45 <= took < 3.0, took
    # wait = 0 (the default) still answers at once
    start = time.monotonic()
    r = everyone.http.get("/v1/task", headers=bearer(token))
    assert r.status_code == 204 and time.monotonic() - start < 0.4


def test_a_client_that_sent_its_update_waits_for_the_next_round(
    everyone: Harness,
) -> None:
    token = everyone.enrol(0)
    everyone.open_round(1)
    task = everyone.task(token)
    assert task is not None
    assert everyone.upload_result(token, everyone.fit(task, token)).status_code == 201
    start = time.monotonic()
    r = everyone.http.get("/v1/task", params={"wait": 0.4}, headers=bearer(token))
    assert r.status_code == 204 and time.monotonic() - start >= 0.35


def test_a_held_request_answers_410_at_once_when_the_run_ends(
    everyone: Harness,
) -> None:
    token = everyone.enrol(0)
    ender = _later(0.3, everyone.server.finish)
    start = time.monotonic()
    r = everyone.http.get("/v1/task", params={"wait": 8}, headers=bearer(token))
    ender.join()
    assert r.status_code == 410, r.text
    assert "run is over" in r.json()["error"]
    assert time.monotonic() - start < 4.0


@pytest.mark.parametrize("wait", ["-1", "10.5", "nan", "inf", "soon", ""])
def test_a_bad_wait_is_refused_with_422(everyone: Harness, wait: str) -> None:
    token = everyone.enrol(0)
    r = everyone.http.get(f"/v1/task?wait={wait}", headers=bearer(token))
    assert r.status_code == 422, (wait, r.status_code, r.text)
    assert "wait" in r.json()["error"]


def test_the_wait_is_documented_in_openapi(everyone: Harness) -> None:
    spec = everyone.http.get("/openapi.json").json()
    params = spec["paths"]["/v1/task"]["get"]["parameters"]
    (wait,) = [p for p in params if p["name"] == "wait"]
    assert wait["in"] == "query" and not wait.get("required", False)
    assert wait["schema"]["minimum"] == 0
    assert wait["schema"]["maximum"] == MAX_TASK_WAIT
    assert "task" in wait["description"]


def test_fifty_held_requests_do_not_hold_up_other_requests(everyone: Harness) -> None:
    tokens = [everyone.enrol(k) for k in range(3)]
    everyone.open_round(1)
    results = []
    for token in tokens:
        task = everyone.task(token)
        assert task is not None
        results.append(everyone.fit(task, token))
    # client 0 sends its update first: its task requests are then held
    assert everyone.upload_result(tokens[0], results[0]).status_code == 201

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=everyone.http.app)  # type: ignore[arg-type]
        async with httpx.AsyncClient(
            transport=transport, base_url="http://veil", timeout=30
        ) as http:
            held = [
                asyncio.create_task(
                    http.get("/v1/task", params={"wait": 8}, headers=bearer(tokens[0]))
                )
                for _ in range(50)
            ]
            while everyone.server.wakeup.waiting < 50:
                await asyncio.sleep(0.02)
            assert not any(h.done() for h in held)

            start = time.monotonic()
            status = await http.get("/v1/status")
            r = await _upload(http, tokens[1], results[1])
            took = time.monotonic() - start
            assert status.status_code == 200
            assert status.json()["open_round"]["received"] == 1
            assert r.status_code == 201, r.text
            assert took < 2.0, took
            assert not any(h.done() for h in held)

            # The run ends: every held request answers 410 at once.
            start = time.monotonic()
            everyone.server.finish()
            answers = await asyncio.wait_for(asyncio.gather(*held), 4.0)
            assert {a.status_code for a in answers} == {410}
            assert time.monotonic() - start < 4.0

    asyncio.run(scenario())
    everyone.wait()  # the round loop stops too (interrupted, resumable)


async def _upload(
    http: httpx.AsyncClient, token: str, result: ClientResult
) -> httpx.Response:
    meta = {
        "num_examples": result.num_examples,
        "loss": result.loss,
        "metrics": result.metrics,
    }
    return await http.post(
        f"/v1/rounds/{result.round}/update",
        content=encode(result.update),
        headers={**bearer(token), "X-Veil-Result": json.dumps(meta)},
    )


def test_the_server_stops_at_once_with_requests_held(everyone: Harness) -> None:
    token = everyone.enrol(0)
    uv, thread, port = start_uvicorn(create_app(everyone.server))
    url = f"http://127.0.0.1:{port}"
    answers: list[int] = []

    def ask() -> None:
        r = httpx.get(
            url + "/v1/task", params={"wait": 10}, headers=bearer(token), timeout=30
        )
        answers.append(r.status_code)

    askers = [threading.Thread(target=ask) for _ in range(20)]
    for a in askers:
        a.start()
    end = time.monotonic() + 10
    while everyone.server.wakeup.waiting < 20 and time.monotonic() < end:
        time.sleep(0.05)
    assert everyone.server.wakeup.waiting == 20 and not answers  # all held

    start = time.monotonic()
    uv.should_exit = True
    thread.join(timeout=15)
    for a in askers:
        a.join(timeout=15)
    took = time.monotonic() - start
    assert not thread.is_alive()
    assert took < 4.0, took  # not the 10 s the requests asked for
    assert answers == [204] * 20
