"""Bad requests to the secure aggregation endpoints: each gets a 4xx JSON error and
leaves the round exactly as it was; the client's good answer is still taken."""

from __future__ import annotations

import base64
import json
import pickle
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load, save

from tests.network.conftest import bearer, tiny_net
from tests.network.secagg_harness import (
    CLIENTS,
    SecureHarness,
    secure_dp_fedavg,
    secure_fedavg,
)
from veil.learning._types import ClientTask
from veil.learning.encoding import decode as decode_state
from veil.network._secagg_wire import client_body, masked_input_body, server_message
from veil.network.device import Identity
from veil.network.secagg import STEP_NAMES
from veil.network.secagg_device import SecureSession
from veil.secagg import Step


class Manual:
    """A secure round driven step by step, every client answering but ``held``
    at the step under test."""

    def __init__(self, folder: Path, algorithm: Any) -> None:
        self.h = SecureHarness(folder, algorithm, round_timeout=60, step_timeout=60)
        self.h.enrol_all()
        self.device = self.h.device_client()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.error: BaseException | None = None
        self.thread.start()
        self._wait(lambda: self.h.server._secure is not None)
        self.invited = tuple(self.sec.invited)
        self.held = self.invited[0]  # whose answer the test withholds, tampers with
        self.sessions = {k: self._fit(k) for k in self.invited}

    def _serve(self) -> None:
        try:
            self.h.server.run(1)
        except BaseException as exc:  # reported by finish()
            self.error = exc

    @staticmethod
    def _wait(ready: Callable[[], bool]) -> None:
        for _ in range(3000):
            if ready():
                return
            time.sleep(0.01)
        raise AssertionError("the server did not get there")

    @property
    def sec(self) -> Any:
        return self.h.server._secure

    def _fit(self, k: int) -> SecureSession:
        token = self.h.tokens[k]
        task = self.h.http.get("/v1/task", headers=bearer(token)).json()
        model = self.h.http.get(
            f"/v1/rounds/{task['round']}/model", headers=bearer(token)
        )
        t = ClientTask(
            k,
            task["round"],
            task["seed"],
            decode_state(model.content),
            task["settings"],
        )
        result = self.h.algorithm.client_fit(t, tiny_net(), *self.h.data_of(k))
        return SecureSession(self.h.algorithm, Identity(k, token), t, result)

    def reach(self, step: Step) -> None:
        """Every client answers the steps before ``step``, and all but ``held``
        answer ``step``."""
        for s in Step:
            if s > step:
                break
            self._wait(lambda s=s: self.sec.step == s and not self.sec.closing)
            for k in self.invited:
                if s == step and k == self.held:
                    continue
                assert self.sessions[k].poll(self.device), (k, s)

    def good_answer(self, step: Step) -> tuple[str, dict[str, Any]]:
        """``held``'s correct answer: the URL and the request's keywords."""
        r = self.h.get("/v1/rounds/1/secagg", self.held)
        assert r.status_code == 200 and r.json()["step"] == STEP_NAMES[step]
        data = self.sessions[self.held]._answer(
            step, server_message(r.json()["message"])
        )
        path = f"/v1/rounds/1/secagg/{STEP_NAMES[step]}"
        if step is Step.MASKED_INPUT:
            return path, {"content": masked_input_body(data)}
        return path, {"json": client_body(data)}

    def snapshot(self) -> Any:
        sa = self.sec.server
        return (
            self.sec.step,
            frozenset(self.sec.answered),
            dict(sa.dropped),
            frozenset(sa._received),
            frozenset(sa._active),
            frozenset(self.h.server._round.accepted),
        )

    def refused(self, status: int, path: str, k: int | None, **kw: Any) -> str:
        before = self.snapshot()
        r = self.h.post(path, k, **kw)
        assert r.status_code == status, (r.status_code, r.text)
        assert self.snapshot() == before
        return str(r.json()["error"])

    def finish(self) -> None:
        """The other steps run to the end; the round aggregates every input."""
        end = time.monotonic() + 60
        while not all(s.done for s in self.sessions.values()):
            assert time.monotonic() < end, "the round did not finish"
            for session in self.sessions.values():
                if not session.done:
                    session.poll(self.device)
            time.sleep(0.01)
        self.thread.join(timeout=30)
        assert self.error is None
        assert self.h.store.rounds()[0].status == "aggregated"
        assert self.h.recorder.sums[1][1] == self.invited


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


#: A body of the right form for each step (for requests sent at the wrong step).
WELL_FORMED: dict[Step, dict[str, Any]] = {
    Step.ADVERTISE_KEYS: {
        "json": dict.fromkeys(
            ("encryption_key", "mask_key", "seed_commitment"), _b64(bytes(32))
        )
    },
    Step.SHARE_KEYS: {"json": {"ciphertexts": []}},
    Step.MASKED_INPUT: {"content": save({"masked_input": np.zeros(3, np.uint32)})},
    Step.UNMASKING: {"json": {"shares": []}},
}


@pytest.mark.parametrize("step", list(Step), ids=[s.name.lower() for s in Step])
def test_bad_requests_leave_the_round_unchanged(tmp_path: Path, step: Step) -> None:
    m = Manual(tmp_path, secure_fedavg(bits=20))
    m.reach(step)
    path, good = m.good_answer(step)
    other = next(s for s in Step if s != step)

    # tokens, round, step, a second answer
    assert "token" in m.refused(401, path, None, **good)
    assert "unknown" in m.refused(401, path, None, headers=bearer("x"), **good)
    assert "round must be" in m.refused(409, path.replace("/1/", "/2/"), m.held, **good)
    wrong_step = path.replace(STEP_NAMES[step], STEP_NAMES[other])
    assert "is collecting" in m.refused(409, wrong_step, m.held, **WELL_FORMED[other])
    assert "already answered" in m.refused(409, path, m.invited[1], **good)

    # the body, step by step
    for status, body in _bad_bodies(step, good):
        m.refused(status, path, m.held, **body)

    # a plain update is refused too
    meta = {"X-Veil-Result": json.dumps({"num_examples": 1, "loss": 0.0})}
    error = m.refused(409, "/v1/rounds/1/update", m.held, content=b"x", headers=meta)
    assert "aggregates securely" in error

    assert m.h.post(path, m.held, **good).status_code == 201
    # again: a second answer, or (every client answered) a closed step or round
    assert m.h.post(path, m.held, **good).status_code in (409, 410)  # 410: run over
    m.finish()


def _bad_bodies(step: Step, good: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    if step is Step.MASKED_INPUT:
        payload = good["content"]
        vector = load(payload)["masked_input"]
        meta = {"complaints": "[]"}
        return [
            (400, {"content": b"garbage"}),
            (415, {"content": pickle.dumps(vector)}),
            (400, {"content": save({"masked_input": vector.astype(np.uint16)}, meta)}),
            (400, {"content": save({"masked_input": vector[:-1]}, meta)}),
            (400, {"content": save({"masked_input": vector, "extra": vector}, meta)}),
            (
                400,
                {"content": save({"masked_input": vector}, {"complaints": "[3, 2]"})},
            ),
            (400, {"content": save({"masked_input": vector}, {"complaints": "{"})}),
            (413, {"content": payload + bytes(len(vector) * 4 + 70000)}),
            # values beyond 2**20, and a complaint about itself (not a neighbour)
            (
                422,
                {"content": save({"masked_input": vector | np.uint32(1 << 25)}, meta)},
            ),
            (422, {"content": save({"masked_input": vector}, {"complaints": "[0]"})}),
        ]
    body = good["json"]
    out: list[tuple[int, dict[str, Any]]] = [
        (
            422,
            {"content": b"not json", "headers": {"Content-Type": "application/json"}},
        ),
        (422, {"json": {}}),
        (422, {"json": [body]}),
    ]
    if step is Step.ADVERTISE_KEYS:
        out += [
            (400, {"json": {**body, "mask_key": "!!not base64!!"}}),
            (400, {"json": {**body, "mask_key": _b64(bytes(31))}}),
        ]
    elif step is Step.SHARE_KEYS:
        boxes = body["ciphertexts"]
        out += [
            (422, {"json": {"ciphertexts": boxes[1:]}}),  # a neighbour left out
            (400, {"json": {"ciphertexts": boxes[::-1]}}),  # unsorted
            (400, {"json": {"ciphertexts": [{**boxes[0], "ciphertext": "%%"}]}}),
        ]
    elif step is Step.UNMASKING:
        shares = body["shares"]
        flipped = {"self_mask_seed": "mask_key", "mask_key": "self_mask_seed"}
        wrong = [{**shares[0], "kind": flipped[shares[0]["kind"]]}, *shares[1:]]
        out += [
            (422, {"json": {"shares": wrong}}),  # a secret that was not asked for
            (400, {"json": {"shares": [{**shares[0], "share": _b64(bytes(32))}]}}),
            (400, {"json": {"shares": shares[::-1]}}),  # unsorted
        ]
    return out


def test_polling_refusals(tmp_path: Path) -> None:
    """Not invited (5 of 6 sampled), wrong round, unknown token; a client out of
    the round is told why."""
    m = Manual(tmp_path, secure_dp_fedavg())
    left_out = next(k for k in range(CLIENTS) if k not in m.invited)
    r = m.h.get("/v1/rounds/1/secagg", left_out)
    assert r.status_code == 403 and "not among" in r.json()["error"]
    admin = (m.h.store.folder / "admin_token").read_text().strip()
    revoke = m.h.http.post(f"/v1/clients/{left_out}/revoke", headers=bearer(admin))
    assert revoke.status_code == 200
    r = m.h.post(
        "/v1/rounds/1/secagg/advertise-keys",
        left_out,
        **WELL_FORMED[Step.ADVERTISE_KEYS],
    )
    assert r.status_code == 403 and "revoked" in r.json()["error"]
    assert m.h.get("/v1/rounds/7/secagg", m.held).status_code == 409
    r = m.h.http.get("/v1/rounds/1/secagg", headers=bearer("nope"))
    assert r.status_code == 401 and "unknown" in r.json()["error"]
    m.reach(Step.ADVERTISE_KEYS)
    r = m.h.get("/v1/rounds/1/secagg", m.invited[1])
    assert r.status_code == 204  # answered: wait for the next step
    path, good = m.good_answer(Step.ADVERTISE_KEYS)
    assert m.h.post(path, m.held, **good).status_code == 201
    m.finish()
    assert json.loads(m.h.get("/v1/rounds/1/secagg", m.held).text)["error"]
