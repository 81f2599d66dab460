"""Every bad request is answered with the right 4xx and a JSON error, and changes
nothing: no stored update, no accepted client, the same global model."""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from tests.network.conftest import Harness, bearer, tiny_fedavg
from veil.learning._types import StateDict
from veil.network import ServerSettings


def _open(harness: Harness) -> Iterator[tuple[Harness, dict[int, str], list[int]]]:
    """Round 1 open, every client enrolled; yields tokens and the picked clients."""
    tokens = {k: harness.enrol(k) for k in range(4)}
    harness.open_round(1)
    picked = [k for k, t in tokens.items() if harness.task(t) is not None]
    assert len(picked) == 2
    yield harness, tokens, picked
    harness.server.finish()


@pytest.fixture
def opened(harness: Harness) -> Iterator[tuple[Harness, dict[int, str], list[int]]]:
    yield from _open(harness)


@pytest.fixture(scope="module")
def shared(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Harness, dict[int, str], list[int]]]:
    """One open round for every refusal case: none may change it."""
    folder = tmp_path_factory.mktemp("refusals")
    yield from _open(Harness(folder, tiny_fedavg(), ServerSettings(round_timeout=60)))


def snapshot(h: Harness) -> tuple[Any, ...]:
    status = h.server.status()
    model = {k: v.clone() for k, v in h.algorithm.global_state.items()}  # type: ignore[attr-defined]
    return h.store.counts(), status["open_round"]["received"], model


def assert_unchanged(h: Harness, before: tuple[Any, ...]) -> None:
    counts, received, model = snapshot(h)
    assert counts == before[0]
    assert received == before[1]
    for name, t in model.items():
        assert torch.equal(t, before[2][name])


def zeros(h: Harness) -> StateDict:
    return {k: torch.zeros_like(v) for k, v in h.algorithm.global_state.items()}  # type: ignore[attr-defined]


def with_value(h: Harness, value: float) -> StateDict:
    u = zeros(h)
    name = next(iter(u))
    u[name].view(-1)[3] = value
    return u


Case = Callable[[Harness, dict[int, str], list[int]], Any]

CASES: dict[str, tuple[Case, int, str]] = {
    "no token": (
        lambda h, t, p: h.http.post("/v1/rounds/1/update", content=b"x"),
        401,
        "device token",
    ),
    "unknown token": (
        lambda h, t, p: h.upload("not-a-token", 1, zeros(h)),
        401,
        "unknown",
    ),
    "wrong round": (
        lambda h, t, p: h.upload(t[p[0]], 2, zeros(h)),
        409,
        "round must be 1",
    ),
    "client not picked": (
        lambda h, t, p: h.upload(t[next(k for k in t if k not in p)], 1, zeros(h)),
        403,
        "not among round 1",
    ),
    "missing tensor": (
        lambda h, t, p: h.upload(t[p[0]], 1, dict(list(zeros(h).items())[1:])),
        422,
        "missing",
    ),
    "extra tensor": (
        lambda h, t, p: h.upload(t[p[0]], 1, {**zeros(h), "extra": torch.zeros(2)}),
        422,
        "unexpected ['extra']",
    ),
    "wrong shape": (
        lambda h, t, p: h.upload(
            t[p[0]], 1, {k: v.reshape(-1) for k, v in zeros(h).items()}
        ),
        422,
        "of shape",
    ),
    "wrong dtype": (
        lambda h, t, p: h.upload(
            t[p[0]], 1, {k: v.half() for k, v in zeros(h).items()}
        ),
        422,
        "must be F32",
    ),
    "NaN": (
        lambda h, t, p: h.upload(t[p[0]], 1, with_value(h, float("nan"))),
        422,
        "NaN or Inf",
    ),
    "Inf": (
        lambda h, t, p: h.upload(t[p[0]], 1, with_value(h, float("inf"))),
        422,
        "NaN or Inf",
    ),
    "declared size over limit": (
        lambda h, t, p: h.upload(
            t[p[0]], 1, b"\0" * 16, headers={"Content-Length": str(10**9)}
        ),
        413,
        "at most",
    ),
    "streamed size over limit": (
        lambda h, t, p: h.http.post(
            "/v1/rounds/1/update",
            content=iter([b"\0" * 65536] * 100),
            headers={
                **bearer(t[p[0]]),
                "X-Veil-Result": '{"num_examples": 1, "loss": 0}',
            },
        ),
        413,
        "at most",
    ),
    "malformed safetensors": (
        lambda h, t, p: h.upload(t[p[0]], 1, b"\x10\0\0\0\0\0\0\0{not json}......"),
        400,
        "not valid safetensors",
    ),
    "truncated safetensors": (
        lambda h, t, p: h.upload(t[p[0]], 1, _truncated(zeros(h))),
        400,
        "safetensors",
    ),
    "pickle": (
        lambda h, t, p: h.upload(t[p[0]], 1, pickle.dumps(zeros(h))),
        415,
        "never loaded",
    ),
    "torch.save": (
        lambda h, t, p: h.upload(t[p[0]], 1, _torch_save(zeros(h))),
        415,
        "never loaded",
    ),
    "missing metadata": (
        lambda h, t, p: h.upload(t[p[0]], 1, zeros(h), meta=""),
        400,
        "X-Veil-Result",
    ),
    "zero examples": (
        lambda h, t, p: h.upload(
            t[p[0]], 1, zeros(h), meta={"num_examples": 0, "loss": 1.0}
        ),
        400,
        "num_examples",
    ),
    "more examples than any device holds": (
        lambda h, t, p: h.upload(
            t[p[0]], 1, zeros(h), meta={"num_examples": 10**30, "loss": 1.0}
        ),
        400,
        "num_examples",
    ),
    "NaN loss": (
        lambda h, t, p: h.upload(
            t[p[0]], 1, zeros(h), meta='{"num_examples": 3, "loss": NaN}'
        ),
        400,
        "X-Veil-Result",
    ),
    "metadata not JSON": (
        lambda h, t, p: h.upload(t[p[0]], 1, zeros(h), meta="{oops"),
        400,
        "X-Veil-Result",
    ),
}


def _truncated(u: StateDict) -> bytes:
    from veil.learning.encoding import encode

    data = encode(u)
    return data[: len(data) - 100]


def _torch_save(u: StateDict) -> bytes:
    buffer = io.BytesIO()
    torch.save(u, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("case", list(CASES))
def test_bad_upload_is_refused_and_changes_nothing(
    shared: tuple[Harness, dict[int, str], list[int]], case: str
) -> None:
    h, tokens, picked = shared
    send, status, fragment = CASES[case]
    before = snapshot(h)
    r = send(h, tokens, picked)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]
    assert_unchanged(h, before)


def test_duplicate_update_is_refused(
    opened: tuple[Harness, dict[int, str], list[int]],
) -> None:
    h, tokens, picked = opened
    assert h.upload(tokens[picked[0]], 1, zeros(h)).status_code == 201
    before = snapshot(h)
    r = h.upload(tokens[picked[0]], 1, zeros(h))
    assert r.status_code == 409
    assert "already sent" in r.json()["error"]
    assert_unchanged(h, before)


def test_revoked_token_is_refused(
    opened: tuple[Harness, dict[int, str], list[int]],
) -> None:
    h, tokens, picked = opened
    admin = (h.folder / "admin_token").read_text().strip()
    k = picked[0]
    r = h.http.post(f"/v1/clients/{k}/revoke", headers=bearer(tokens[k]))
    assert r.status_code == 401  # a device token is not the admin token
    r = h.http.post(f"/v1/clients/{k}/revoke", headers=bearer(admin))
    assert r.status_code == 200, r.text
    before = snapshot(h)
    r = h.upload(tokens[k], 1, zeros(h))
    assert r.status_code == 403
    assert "revoked" in r.json()["error"]
    assert h.http.get("/v1/task", headers=bearer(tokens[k])).status_code == 403
    assert_unchanged(h, before)
    assert h.server.status()["clients_revoked"] == 1


def test_update_over_norm_bound_is_refused(tmp_path: Any) -> None:
    h = Harness(tmp_path, tiny_fedavg(), ServerSettings(max_update_norm=1.0))
    tokens = {k: h.enrol(k) for k in range(4)}
    h.open_round(1)
    k = next(k for k, t in tokens.items() if h.task(t) is not None)
    before = snapshot(h)
    r = h.upload(tokens[k], 1, with_value(h, 2.0))
    assert r.status_code == 422
    assert "L2 norm must be at most 1" in r.json()["error"]
    assert_unchanged(h, before)
    assert h.upload(tokens[k], 1, with_value(h, 0.5)).status_code == 201
    h.server.finish()


def test_enrolment_refusals(harness: Harness) -> None:
    harness.enrol(1)
    r = harness.http.post("/v1/enrol", json={"client_id": 1})
    assert r.status_code == 409
    r = harness.http.post("/v1/enrol", json={"client_id": 99})
    assert r.status_code == 422
    assert "client_id must be in [0, 4)" in r.json()["error"]
    r = harness.http.post("/v1/enrol", json={"client_id": "x"})
    assert r.status_code == 422
    assert harness.server.status()["clients_enrolled"] == 1


def test_enrolment_key_is_required_when_set(tmp_path: Any) -> None:
    h = Harness(tmp_path, tiny_fedavg(), ServerSettings(enrolment_key="sesame"))
    assert h.http.post("/v1/enrol", json={}).status_code == 401
    r = h.http.post("/v1/enrol", json={}, headers=bearer("sesame"))
    assert r.status_code == 201
    assert r.json()["client_id"] == 0


def test_only_the_token_hash_is_stored(harness: Harness) -> None:
    import hashlib
    import sqlite3

    token = harness.enrol(2)
    raw = (harness.folder / "state.sqlite").read_bytes()
    raw += (harness.folder / "state.sqlite-wal").read_bytes()
    assert token.encode() not in raw
    db = sqlite3.connect(harness.folder / "state.sqlite")
    (stored,) = db.execute("SELECT token_sha256 FROM clients").fetchone()
    assert stored == hashlib.sha256(token.encode()).hexdigest()


def test_model_of_another_round_is_refused(
    opened: tuple[Harness, dict[int, str], list[int]],
) -> None:
    h, tokens, picked = opened
    r = h.http.get("/v1/rounds/7/model", headers=bearer(tokens[picked[0]]))
    assert r.status_code == 409
    assert "open round (1)" in r.json()["error"]


def test_adaptive_clipping_indicator_is_checked(tmp_path: Any) -> None:
    """With central noise the clipped-or-not indicator must be -0.5 or 0.5: a client
    cannot move the clipping norm by more than its share."""
    from tests.network.conftest import tiny_model_state
    from veil.learning import AdaptiveClipping, DPFedAvg, SGDTrainer
    from veil.privacy import PrivacyLedger

    algorithm = DPFedAvg(
        global_state=tiny_model_state(),
        num_clients=4,
        sample_rate=1.0,
        clipping_norm=1.0,
        noise_multiplier=1.0,
        trainer=SGDTrainer(0.1),
        ledger=PrivacyLedger("rdp"),
        adaptive=AdaptiveClipping(2.0, 0.5, 0.2),
    )
    h = Harness(tmp_path, algorithm)
    token = h.enrol(0)
    h.open_round(1)
    before = snapshot(h)
    for metrics, fragment in (
        ({}, "must hold 'unclipped'"),
        ({"unclipped": 40.0}, "-0.5 or 0.5"),
    ):
        meta = {"num_examples": 5, "loss": 1.0, "metrics": metrics}
        r = h.upload(token, 1, zeros(h), meta=meta)
        assert r.status_code == 422, r.text
        assert fragment in r.json()["error"]
    assert_unchanged(h, before)
    meta = {"num_examples": 5, "loss": 1.0, "metrics": {"unclipped": 0.5}}
    assert h.upload(token, 1, zeros(h), meta=meta).status_code == 201
    h.server.finish()
