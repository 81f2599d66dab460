"""The upload hot path: group commit answers only after the commit, the size limit
refuses a streamed body before reading it whole, the one-pass value check, and
update files that did not reach the disk whole."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from collections.abc import AsyncIterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.network.conftest import NUM_CLIENTS, Harness
from veil._wire import read_body
from veil.errors import ServiceError
from veil.learning import FedAvg, SGDTrainer
from veil.learning.encoding import encode
from veil.network import FederatedServer, ServerSettings, StateStore
from veil.network.store import AcceptedUpdate


def update(rnd: int, client_id: int, value: float = 0.5) -> AcceptedUpdate:
    tensors = encode({"w": torch.full((10,), value)})
    return AcceptedUpdate(rnd, client_id, 5, 1.0, {"accuracy": 0.5}, tensors)


def committed(folder: Path) -> list[tuple[int, int]]:
    """The update rows another connection sees: only committed ones."""
    db = sqlite3.connect(folder / "state.sqlite")
    try:
        return db.execute(
            "SELECT round, client_id FROM updates ORDER BY client_id"
        ).fetchall()
    finally:
        db.close()


class HeldWriter:
    """Makes the store's writer wait at its first group until released, and
    records the size of every group it commits."""

    def __init__(self, store: StateStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.groups: list[int] = []
        write = store._store_updates

        def held(updates: list[AcceptedUpdate]) -> None:
            self.entered.set()
            assert self.release.wait(30)
            write(updates)
            self.groups.append(len(updates))

        monkeypatch.setattr(store, "_store_updates", held)


def test_concurrent_updates_are_committed_together_and_only_then_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = StateStore(tmp_path)
    held = HeldWriter(store, monkeypatch)
    first = store.submit_update(update(1, 0))
    assert held.entered.wait(10)
    rest = [store.submit_update(update(1, k)) for k in (1, 2, 3)]
    assert not any(f.done() for f in [first, *rest])
    assert committed(tmp_path) == []
    held.release.set()
    for f in [first, *rest]:
        f.result(timeout=10)
    assert held.groups == [1, 3]  # the three waiting were one transaction
    assert committed(tmp_path) == [(1, 0), (1, 1), (1, 2), (1, 3)]
    stored = store.updates(1)
    assert [u.client_id for u in stored] == [0, 1, 2, 3]
    assert stored[2] == update(1, 2)
    store.close()


def test_full_synchronous_store_round_trips(tmp_path: Path) -> None:
    store = StateStore(tmp_path, synchronous="FULL")
    futures = [store.submit_update(update(2, k, value=k)) for k in range(3)]
    for f in futures:
        f.result(timeout=10)
    assert store.updates(2) == [update(2, k, value=k) for k in range(3)]
    store.close()


def test_a_failing_update_does_not_sink_its_group(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.add_update(update(1, 0))
    futures = [store.submit_update(update(1, k)) for k in (1, 0, 2)]  # 0: duplicate
    futures[0].result(timeout=10)
    futures[2].result(timeout=10)
    with pytest.raises(sqlite3.IntegrityError):
        futures[1].result(timeout=10)
    assert committed(tmp_path) == [(1, 0), (1, 1), (1, 2)]
    # The refused duplicate did not replace the stored update's file.
    assert store.updates(1)[0] == update(1, 0)
    store.close()


def test_upload_is_answered_only_after_its_commit(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens = {k: harness.enrol(k) for k in range(4)}
    harness.open_round(1)
    picked = [k for k, t in tokens.items() if harness.task(t) is not None]
    held = HeldWriter(harness.store, monkeypatch)
    zeros = {k: torch.zeros_like(v) for k, v in harness.algorithm.global_state.items()}  # type: ignore[attr-defined]
    answer: list[Any] = []
    upload = threading.Thread(
        target=lambda: answer.append(harness.upload(tokens[picked[0]], 1, zeros))
    )
    upload.start()
    assert held.entered.wait(10)
    upload.join(0.3)
    assert upload.is_alive() and not answer  # not answered before the commit
    assert harness.server.status()["open_round"]["received"] == 0
    # While it is being stored, a second upload of the client is a duplicate.
    again = harness.upload(tokens[picked[0]], 1, zeros)
    assert again.status_code == 409
    assert "already sent" in again.json()["error"]
    held.release.set()
    upload.join(10)
    assert answer[0].status_code == 201, answer[0].text
    assert committed(harness.folder) == [(1, picked[0])]
    assert harness.server.status()["open_round"]["received"] == 1
    harness.server.finish()


def test_round_closing_waits_for_an_upload_being_stored(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upload checked before the round closed (here: the server stops) is
    still stored and answered 201; the round's loop waits for it."""
    tokens = {k: harness.enrol(k) for k in range(4)}
    harness.open_round(1)
    picked = [k for k, t in tokens.items() if harness.task(t) is not None]
    results = {k: harness.fit(harness.task(tokens[k]), tokens[k]) for k in picked}  # type: ignore[arg-type]
    held = HeldWriter(harness.store, monkeypatch)
    answers: list[Any] = []
    first = threading.Thread(
        target=lambda: answers.append(
            harness.upload_result(tokens[picked[0]], results[picked[0]])
        )
    )
    first.start()
    assert held.entered.wait(10)
    harness.server.finish()  # the server stops while the upload is being stored
    held.release.set()
    first.join(10)
    assert answers[0].status_code == 201
    harness.wait()
    assert committed(harness.folder) == [(1, picked[0])]


class _Stream:
    """A request whose body arrives in chunks; counts the chunks read."""

    def __init__(self, chunks: int, size: int, declared: int | None) -> None:
        self.headers = {} if declared is None else {"content-length": str(declared)}
        self.chunks, self.size, self.read = chunks, size, 0

    async def stream(self) -> AsyncIterator[bytes]:
        for _ in range(self.chunks):
            self.read += 1
            yield b"\0" * self.size


def test_streamed_body_over_the_limit_is_refused_before_it_is_read_whole() -> None:
    request = _Stream(chunks=100, size=1000, declared=None)
    with pytest.raises(ServiceError) as refused:
        asyncio.run(read_body(request, max_bytes=5500))  # type: ignore[arg-type]
    assert refused.value.status_code == 413
    assert request.read == 6  # stopped at the chunk that crossed the limit
    declared = _Stream(chunks=100, size=1000, declared=100_000)
    with pytest.raises(ServiceError) as refused:
        asyncio.run(read_body(declared, max_bytes=5500))  # type: ignore[arg-type]
    assert refused.value.status_code == 413
    assert declared.read == 0  # Content-Length alone refused it
    fits = _Stream(chunks=5, size=1000, declared=5000)
    assert asyncio.run(read_body(fits, max_bytes=5500)) == b"\0" * 5000  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "dtype", "message"),
    [
        (float("nan"), torch.float32, "holds NaN or Inf"),
        (float("-inf"), torch.float32, "holds NaN or Inf"),
        (1e300, torch.float64, "L2 norm must be at most"),  # squares overflow
    ],
)
def test_value_check_tells_nan_and_inf_from_a_huge_norm(
    tmp_path: Path, value: float, dtype: torch.dtype, message: str
) -> None:
    algorithm = FedAvg(
        {"w": torch.zeros(4, dtype=dtype)}, NUM_CLIENTS, 1.0, SGDTrainer(0.1)
    )
    server = FederatedServer(
        algorithm,
        StateStore(tmp_path),
        NUM_CLIENTS,
        ServerSettings(max_update_norm=10.0),
    )
    with pytest.raises(ServiceError) as refused:
        server._check_values({"w": torch.tensor([0.0, value, 1.0, 2.0], dtype=dtype)})
    assert refused.value.status_code == 422
    assert message in str(refused.value)
    server._check_values({"w": torch.tensor([0.0, 3.0, 4.0, 0.0], dtype=dtype)})


def test_update_file_that_did_not_reach_the_disk_whole_is_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = StateStore(tmp_path)
    for k in (0, 1, 2):
        store.add_update(update(1, k))
    store.close()
    # As after a power loss: one file lost its tail, one is gone.
    files = sorted((tmp_path / "updates" / "round-000001").iterdir())
    files[1].write_bytes(files[1].read_bytes()[:-8])
    files[2].unlink()
    store = StateStore(tmp_path)
    assert [u.client_id for u in store.updates(1)] == [0]
    assert "did not reach the disk whole" in caplog.text
    assert committed(tmp_path) == [(1, 0)]  # as if never received
    store.close()


def test_aggregated_round_drops_its_update_files(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.open_round(1, [], 0.0)
    store.add_update(update(1, 0))
    folder = tmp_path / "updates" / "round-000001"
    assert len(list(folder.iterdir())) == 1
    store.finish_round(1, "round-000001.safetensors", [])
    assert [u.tensors for u in store.updates(1)] == [b""]  # the row stays
    for _ in range(100):
        if not folder.exists():
            break
        threading.Event().wait(0.05)
    assert not folder.exists()
    store.close()


def test_state_folder_with_update_blobs_still_reads(tmp_path: Path) -> None:
    """A folder written before update files (tensors in the row) opens, and its
    updates read back."""
    db = sqlite3.connect(tmp_path / "state.sqlite")
    db.execute(
        "CREATE TABLE updates (round INTEGER NOT NULL, client_id INTEGER NOT NULL, "
        "num_examples INTEGER NOT NULL, loss REAL NOT NULL, metrics TEXT NOT NULL, "
        "tensors BLOB, size INTEGER NOT NULL, received_at REAL NOT NULL, "
        "PRIMARY KEY (round, client_id))"
    )
    old = update(1, 3)
    db.execute(
        "INSERT INTO updates VALUES (1, 3, 5, 1.0, ?, ?, ?, 0)",
        (json.dumps(old.metrics), old.tensors, len(old.tensors)),
    )
    db.commit()
    db.close()
    store = StateStore(tmp_path)
    assert store.updates(1) == [old]
    store.add_update(update(1, 4))
    assert [u.client_id for u in store.updates(1)] == [3, 4]
    store.close()


def test_closed_store_refuses_updates(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    done: Future[None] = store.submit_update(update(1, 0))
    store.close()  # stores what was submitted first
    assert done.done() and done.exception() is None
    with pytest.raises(RuntimeError, match="closed"):
        store.submit_update(update(1, 1))
