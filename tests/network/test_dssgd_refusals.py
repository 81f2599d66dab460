"""Every bad DSSGD request gets its 4xx JSON error and changes nothing: not the
global parameters, counts or version, not the stored turns, not the ledger."""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import save

from tests.network.conftest import NUM_CLIENTS
from tests.network.dssgd_harness import NetHarness
from veil.learning.dssgd import SPARSE_FORMAT, DSSGDSettings, upload_count

BOUND = 0.5
SETTINGS = DSSGDSettings(0.05, 1.0, "largest", 0.0, BOUND)


def raw(
    indices: Any,
    values: Any,
    size: int | str,
    fmt: str = SPARSE_FORMAT,
    extra: dict[str, torch.Tensor] | None = None,
) -> bytes:
    """Safetensors bytes laid out as an upload, with whatever was asked for."""
    tensors = {"values": values}
    if indices is not None:
        tensors["indices"] = indices
    tensors.update(extra or {})
    return save(tensors, metadata={"format": fmt, "size": str(size)})


def i32(*v: int) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.int32)


def f32(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


class Setup:
    def __init__(self, folder: Path) -> None:
        self.h = NetHarness(folder, "round_robin", 1, SETTINGS)
        self.tokens = {k: self.h.enrol(k) for k in range(NUM_CLIENTS)}
        self.h.service.release(1)
        r = self.h.http.post("/v1/dssgd/turn", headers=auth(self.tokens[0]))
        assert r.status_code == 200, r.text
        self.turn = int(r.json()["turn"])
        self.size = self.h.service.size
        self.capacity = upload_count(0.05, self.size)

    def snapshot(self) -> tuple[Any, ...]:
        s = self.h.service
        return (
            s.server.parameters(),
            s.server.counts(),
            s.server.version,
            s.turn_store.turns(),
            s.turn_store.read_state()[2],
            s.status(),
        )

    def upload(
        self,
        body: bytes,
        token: str | None = None,
        turn: int | None = None,
        result: Any = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        h: dict[str, str] = {} if token == "" else auth(token or self.tokens[0])
        if result != "":
            meta = {"loss": 0.5} if result is None else result
            h["X-Veil-Result"] = meta if isinstance(meta, str) else json.dumps(meta)
        h.update(headers or {})
        t = self.turn if turn is None else turn
        return self.h.http.post(f"/v1/dssgd/turns/{t}/upload", content=body, headers=h)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    s = Setup(tmp_path)
    yield s
    s.h.close()


def _good(s: Setup) -> bytes:
    return raw(i32(1, 4, 9), f32(0.1, -0.2, 0.3), s.size)


CASES: dict[str, tuple[Any, int, str]] = {
    # name: (how to send, status, part of the message)
    "no token": (lambda s: s.upload(_good(s), token=""), 401, "device token"),
    "unknown token": (lambda s: s.upload(_good(s), token="nope"), 401, "unknown"),
    "another client's turn": (
        lambda s: s.upload(_good(s), token=s.tokens[1]),
        403,
        "not your turn",
    ),
    "a turn never granted": (lambda s: s.upload(_good(s), turn=99), 404, "never"),
    "indices out of range": (
        lambda s: s.upload(raw(i32(1, s.size), f32(0.1, 0.1), s.size)),
        422,
        f"[0, {7850})",
    ),
    "negative index": (
        lambda s: s.upload(raw(i32(-1, 3), f32(0.1, 0.1), s.size)),
        422,
        "[0, 7850)",
    ),
    "repeated indices": (
        lambda s: s.upload(raw(i32(3, 3), f32(0.1, 0.1), s.size)),
        422,
        "strictly increasing",
    ),
    "unsorted indices": (
        lambda s: s.upload(raw(i32(5, 3), f32(0.1, 0.1), s.size)),
        422,
        "strictly increasing",
    ),
    "float64 values": (
        lambda s: s.upload(
            raw(i32(1, 2), torch.tensor([0.1, 0.2], dtype=torch.float64), s.size)
        ),
        422,
        "must be 1-d F32",
    ),
    "int64 indices": (
        lambda s: s.upload(
            raw(torch.tensor([1, 2], dtype=torch.int64), f32(0.1, 0.2), s.size)
        ),
        422,
        "must be 1-d I32",
    ),
    "2-d values": (
        lambda s: s.upload(raw(None, torch.zeros(2, 2), s.size)),
        422,
        "must be 1-d F32",
    ),
    "NaN": (
        lambda s: s.upload(raw(i32(1, 2), f32(0.1, float("nan")), s.size)),
        422,
        "NaN or Inf",
    ),
    "Inf": (
        lambda s: s.upload(raw(i32(1, 2), f32(float("inf"), 0.1), s.size)),
        422,
        "NaN or Inf",
    ),
    "values over the bound": (
        lambda s: s.upload(raw(i32(1, 2), f32(0.1, BOUND * 1.01), s.size)),
        422,
        "[-γ, γ]",
    ),
    "more entries than ceil(θu P)": (
        lambda s: s.upload(
            raw(
                torch.arange(s.capacity + 1, dtype=torch.int32),
                torch.zeros(s.capacity + 1),
                s.size,
            )
        ),
        422,
        "at most ceil(θu * P) = 393",
    ),
    "a dense upload when θu < 1": (
        lambda s: s.upload(raw(None, torch.zeros(s.size), s.size)),
        413,
        "at most",
    ),
    "fewer indices than values": (
        lambda s: s.upload(raw(i32(1, 2), f32(0.1, 0.2, 0.3), s.size)),
        422,
        "one index per value",
    ),
    "an extra tensor": (
        lambda s: s.upload(raw(i32(1), f32(0.1), s.size, extra={"x": f32(1.0)})),
        422,
        "must hold 'values'",
    ),
    "another size": (
        lambda s: s.upload(raw(i32(1), f32(0.1), s.size + 1)),
        422,
        "over 7850 parameters",
    ),
    "another format": (
        lambda s: s.upload(raw(i32(1), f32(0.1), s.size, fmt="other/1")),
        422,
        "veil.sparse/1",
    ),
    "oversize body": (
        lambda s: s.upload(b"\0" * (s.h.service.max_body_bytes() + 1)),
        413,
        "at most",
    ),
    "oversize Content-Length": (
        lambda s: s.upload(_good(s), headers={"Content-Length": "99999999"}),
        413,
        "at most",
    ),
    "malformed safetensors": (
        lambda s: s.upload(b"\x10\0\0\0\0\0\0\0not json at all!"),
        400,
        "not valid safetensors",
    ),
    "truncated safetensors": (
        lambda s: s.upload(_good(s)[:-5]),
        400,
        "safetensors",
    ),
    "a pickle": (
        lambda s: s.upload(pickle.dumps({"values": [0.1]})),
        415,
        "pickle",
    ),
    "no X-Veil-Result": (lambda s: s.upload(_good(s), result=""), 400, "X-Veil-Result"),
    "NaN loss": (
        lambda s: s.upload(_good(s), result='{"loss": NaN}'),
        400,
        "X-Veil-Result",
    ),
    "an over-budget upload with entries": (
        lambda s: s.upload(_good(s), result={"loss": 0.1, "over_budget": True}),
        422,
        "must be empty",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_upload_is_refused_and_changes_nothing(setup: Setup, case: str) -> None:
    send, status, message = CASES[case]
    before = setup.snapshot()
    r = send(setup)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    after = setup.snapshot()
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert before[2:] == after[2:]
    # The turn is still open: the right upload is applied afterwards.
    r = setup.upload(_good(setup))
    assert r.status_code == 201, r.text


def test_duplicate_upload_is_refused(setup: Setup) -> None:
    assert setup.upload(_good(setup)).status_code == 201
    before = setup.snapshot()
    r = setup.upload(_good(setup))
    assert r.status_code == 409 and "is over" in r.json()["error"]
    after = setup.snapshot()
    assert torch.equal(before[0], after[0]) and before[2:] == after[2:]


def test_revoked_token_is_refused(setup: Setup) -> None:
    admin = (setup.h.folder / "admin_token").read_text().strip()
    r = setup.h.http.post("/v1/clients/0/revoke", headers=auth(admin))
    assert r.status_code == 200
    before = setup.snapshot()
    r = setup.upload(_good(setup))
    assert r.status_code == 403 and "revoked" in r.json()["error"]
    assert before[2:] == setup.snapshot()[2:]


def test_not_your_turn_to_ask_or_download(setup: Setup) -> None:
    other = auth(setup.tokens[1])
    assert setup.h.http.post("/v1/dssgd/turn", headers=other).status_code == 204
    r = setup.h.http.get(f"/v1/dssgd/turns/{setup.turn}/download", headers=other)
    assert r.status_code == 403 and "not your turn" in r.json()["error"]
    r = setup.h.http.post("/v1/dssgd/turn", headers=auth(setup.tokens[0]))
    assert r.status_code == 200 and r.json()["turn"] == setup.turn  # the same turn


def test_finished_run_answers_410(setup: Setup) -> None:
    setup.h.service.finish()
    r = setup.h.http.post("/v1/dssgd/turn", headers=auth(setup.tokens[2]))
    assert r.status_code == 410 and "over" in r.json()["error"]


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
