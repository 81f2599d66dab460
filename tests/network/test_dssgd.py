"""DSSGD's parameter server over HTTP (in process): the simulation's parameters bit
for bit in the synchronous orders, no upload lost in the asynchronous one, byte
counts equal to the bodies sent, and a restart that loses nothing accepted."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tests.network.conftest import NUM_CLIENTS
from tests.network.dssgd_harness import (
    NetHarness,
    same_stats,
    settings,
    simulate,
    start,
    take_turns_in_order,
)
from veil.experiment._network_dssgd import turn_stats
from veil.learning.dssgd import ParameterServer, download_tie_break, upload_count
from veil.network.dssgd import turn_generator

pytestmark = pytest.mark.filterwarnings("ignore::veil.privacy.InsecureNoiseWarning")

ROUNDS = 3


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Devices here are threads of one process; torch's intra-op parallelism is
    not reproducible when several threads compute at once (device processes run
    with ``--threads 1``, as the simulation's runner does)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("order", "kind"),
    [
        ("round_robin", "plain"),
        ("random", "plain"),
        ("round_robin", "partial-download"),
        ("random", "dp"),
        ("random", "residual"),
    ],
)
def test_synchronous_orders_over_http_equal_simulation(
    tmp_path: Path, order: str, kind: str
) -> None:
    s = settings(
        dp=kind == "dp",
        download=0.3 if kind == "partial-download" else 1.0,
        residual=kind == "residual",
    )
    reference, expected = simulate(order, ROUNDS, s)

    h = NetHarness(tmp_path, order, ROUNDS, s)
    tokens = {k: h.enrol(k) for k in range(NUM_CLIENTS)}
    sent = take_turns_in_order(h, tokens, ROUNDS)

    assert torch.equal(h.service.server.parameters(), reference.server.parameters())
    assert torch.equal(h.service.server.counts(), reference.server.counts())
    same_stats([turn_stats(r) for r in h.service.stats], expected)
    assert sent == ROUNDS * NUM_CLIENTS
    if kind == "dp":
        sim = reference.client_states()
        net = h.service.client_records()
        for a, b in zip(sim, net, strict=True):
            assert a.ledger is not None and b.ledger is not None
            assert a.ledger.events == b.ledger.events
            assert (a.uploads, a.pure_epsilon) == (b.uploads, b.pure_epsilon)
        assert h.service.status()["ledger_entries"] > 0


def test_async_over_http_loses_no_upload(tmp_path: Path) -> None:
    s = settings(upload=0.1)
    h = NetHarness(tmp_path, "async", ROUNDS, s)
    tokens = {k: h.enrol(k) for k in range(NUM_CLIENTS)}
    traffic = h.run_devices([[0, 1], [2], [3]], tokens, ROUNDS)

    rows = h.service.stats
    sent = sum(t.turns for t in traffic)
    assert sent == len(rows) == h.service.server.version == ROUNDS * NUM_CLIENTS
    assert int(h.service.server.counts().sum()) == sum(r.uploaded or 0 for r in rows)
    for r in rows:
        assert r.staleness == (r.applied_version or 0) - r.base_version >= 0
    stored = h.service.turn_store.turns()
    assert [r.status for r in stored].count("applied") == sent


def test_async_records_staleness_of_interleaved_turns(tmp_path: Path) -> None:
    h = NetHarness(tmp_path, "async", 1, settings())
    t0, t1 = h.enrol(0), h.enrol(1)
    g0 = h.http.post("/v1/dssgd/turn", headers=_auth(t0)).json()
    g1 = h.http.post("/v1/dssgd/turn", headers=_auth(t1)).json()
    assert g0["version"] == g1["version"] == 0
    body = _upload_body(h, [3, 5], [0.5, -0.25])
    r0 = _upload(h, t0, g0["turn"], body)
    r1 = _upload(h, t1, g1["turn"], body)
    assert (r0.json()["staleness"], r1.json()["staleness"]) == (0, 1)
    assert [r.staleness for r in h.service.stats] == [0, 1]
    expected = start()
    for _ in range(2):  # two uploads, added one after the other
        expected[[3, 5]] += torch.tensor([0.5, -0.25])
    assert torch.equal(h.service.server.parameters(), expected)


def test_byte_counts_equal_the_http_bodies(tmp_path: Path) -> None:
    s = settings(upload=0.02, download=0.5)
    h = NetHarness(tmp_path, "round_robin", 2, s)
    sent: list[int] = []
    received: list[int] = []

    def on_request(request: httpx.Request) -> None:
        if request.url.path.endswith("/upload"):
            sent.append(len(request.content))

    def on_response(response: httpx.Response) -> None:
        if response.request.url.path.endswith("/download"):
            response.read()
            received.append(len(response.content))

    h.http.event_hooks = {"request": [on_request], "response": [on_response]}
    tokens = {k: h.enrol(k) for k in range(NUM_CLIENTS)}
    traffic = h.run_devices([[0, 1, 2, 3]], tokens, 2)

    rows = h.service.stats
    assert [r.bytes_up for r in rows] == sent
    assert [r.bytes_down for r in rows] == received
    assert traffic[0].bytes_up == sum(sent) == h.service.status()["bytes_up"]
    assert traffic[0].bytes_down == sum(received) == h.service.status()["bytes_down"]
    # A sparse message: 4 bytes of int32 index and 4 of float32 value per entry,
    # plus the safetensors header.
    capacity = upload_count(0.02, h.service.size)
    assert all(8 * (r.uploaded or 0) < (r.bytes_up or 0) for r in rows)
    assert all(r.uploaded == capacity for r in rows)
    assert max(sent) <= 8 * capacity + 256


def test_turn_generator_continues_where_the_download_left_it() -> None:
    size = 1000
    for fraction in (1.0, 0.3):
        server = ParameterServer(torch.zeros(size), 2)
        generator = torch.Generator().manual_seed(11)
        server.download(0, fraction, generator)
        assert torch.equal(
            generator.get_state(), turn_generator(11, fraction, size).get_state()
        )
    drawn = download_tie_break(torch.Generator().manual_seed(1), size, size)
    assert drawn is None


def test_restart_resumes_a_turn_in_flight_and_ends_as_the_simulation(
    tmp_path: Path,
) -> None:
    """The server is dropped (no clean shutdown) with a turn granted and
    downloaded; a new one on the same folder serves the same download, accepts the
    upload, and the run ends with the simulation's parameters."""
    s = settings(download=0.4)
    reference, expected = simulate("random", 2, s)

    first = NetHarness(tmp_path, "random", 2, s)
    tokens = {k: first.enrol(k) for k in range(NUM_CLIENTS)}
    first.service.release(1)
    k = first.service.status()["current"]["client_id"]
    grant = first.http.post("/v1/dssgd/turn", headers=_auth(tokens[k])).json()
    before = first.http.get(
        f"/v1/dssgd/turns/{grant['turn']}/download", headers=_auth(tokens[k])
    ).content
    del first  # dropped, not closed

    second = NetHarness(tmp_path, "random", 2, s)
    assert second.service.status()["turns_in_flight"] == 1
    again = second.http.get(
        f"/v1/dssgd/turns/{grant['turn']}/download", headers=_auth(tokens[k])
    ).content
    assert again == before
    assert take_turns_in_order(second, tokens, 2) == 2 * NUM_CLIENTS
    assert torch.equal(
        second.service.server.parameters(), reference.server.parameters()
    )
    same_stats([turn_stats(r) for r in second.service.stats], expected)

    third = NetHarness(tmp_path, "random", 2, s)  # everything applied is on disk
    assert third.service.server.version == 2 * NUM_CLIENTS
    assert torch.equal(third.service.server.parameters(), reference.server.parameters())
    assert torch.equal(third.service.server.counts(), reference.server.counts())


def test_restart_restores_ledgers_and_devices_read_them_back(tmp_path: Path) -> None:
    s = settings(dp=True)
    first = NetHarness(tmp_path, "round_robin", 1, s)
    tokens = {k: first.enrol(k) for k in range(NUM_CLIENTS)}
    first.run_devices([[0, 1, 2, 3]], tokens, 1)
    records = first.service.client_records()
    first.close()

    second = NetHarness(tmp_path, "round_robin", 1, s)
    for a, b in zip(records, second.service.client_records(), strict=True):
        assert a.ledger is not None and b.ledger is not None
        assert a.ledger.events == b.ledger.events and b.ledger.events
    r = second.http.get("/v1/dssgd/ledger", headers=_auth(tokens[2]))
    assert r.status_code == 200
    events = r.json()["events"]
    assert [e["source"] for e in events] == ["dssgd-selection", "dssgd-values"]

    # A restarted device reads its clients' ledgers back before its next turn.
    from tests.network.dssgd_harness import new_ledger
    from veil.learning.dssgd import DSSGDClient
    from veil.network.device import Identity
    from veil.network.dssgd_device import restore_ledgers

    states = {k: DSSGDClient(k, start(), new_ledger()) for k in range(NUM_CLIENTS)}
    ids = [Identity(k, tokens[k]) for k in range(NUM_CLIENTS)]
    restore_ledgers(second.device(), ids, states)
    for k, record in enumerate(records):
        assert states[k].ledger is not None and record.ledger is not None
        assert states[k].ledger.events == record.ledger.events


def test_silent_clients_are_skipped_and_late_uploads_refused(tmp_path: Path) -> None:
    from veil.network.dssgd import DSSGDServerSettings

    network = DSSGDServerSettings(turn_timeout=2.0)
    h = NetHarness(tmp_path, "round_robin", 1, settings(), network)
    tokens = {k: h.enrol(k) for k in range(NUM_CLIENTS)}
    body = _upload_body(h, [1, 2], [0.1, 0.2])

    # Client 0 never asks: after the timeout its slot is skipped, client 1 goes.
    g1 = h.http.post("/v1/dssgd/turn?wait=5", headers=_auth(tokens[1])).json()
    assert _upload(h, tokens[1], g1["turn"], body).status_code == 201
    # Client 2 takes its turn but uploads too late: refused, and client 3 goes.
    g2 = h.http.post("/v1/dssgd/turn", headers=_auth(tokens[2])).json()
    g3 = h.http.post("/v1/dssgd/turn?wait=5", headers=_auth(tokens[3])).json()
    late = _upload(h, tokens[2], g2["turn"], body)
    assert late.status_code == 409 and "is over" in late.json()["error"]
    assert _upload(h, tokens[3], g3["turn"], body).status_code == 201

    status = h.service.status()
    assert (status["turns_applied"], status["turns_expired"]) == (2, 2)
    stored = [(r.client_id, r.status) for r in h.service.turn_store.turns()]
    assert stored == [(0, "expired"), (1, "applied"), (2, "expired"), (3, "applied")]
    assert h.service.server.version == 2


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _upload_body(h: NetHarness, idx: list[int], values: list[float]) -> bytes:
    from veil.learning.dssgd import SparseVector, encode_sparse

    return encode_sparse(
        SparseVector(
            h.service.size,
            torch.tensor(idx, dtype=torch.int64),
            torch.tensor(values, dtype=torch.float32),
        )
    )


def _upload(
    h: NetHarness,
    token: str,
    turn: int,
    body: bytes,
    result: Any = None,
) -> httpx.Response:
    meta = {"loss": 1.0} if result is None else result
    headers = {**_auth(token), "X-Veil-Result": json.dumps(meta)}
    return h.http.post(f"/v1/dssgd/turns/{turn}/upload", content=body, headers=headers)


def test_serve_picks_dssgd_when_the_config_runs_only_dssgd() -> None:
    from veil.commands.network import _default_method

    assert _default_method(["dssgd"]) == "dssgd"
    assert _default_method(["centralized", "dssgd"]) == "dssgd"
    assert _default_method(["fedavg", "dssgd"]) == "fedavg"
    assert _default_method(["dp-fedavg", "dssgd"]) == "dp-fedavg"


def test_a_folder_of_another_run_is_refused(tmp_path: Path) -> None:
    from veil.errors import ConfigError
    from veil.network import StateStore
    from veil.network.dssgd import DSSGDService
    from veil.network.dssgd_store import TurnStore

    NetHarness(tmp_path, "round_robin", 1, settings()).close()
    with pytest.raises(ConfigError, match="holds another run"):
        DSSGDService(
            start(),
            settings(),
            StateStore(tmp_path),
            TurnStore(tmp_path),
            NUM_CLIENTS,
            1,
            "round_robin",
            0,
            config={"seed": 8},
        )


def test_config_and_status_describe_the_run(tmp_path: Path) -> None:
    h = NetHarness(tmp_path, "random", 2, settings())
    assert h.http.get("/v1/config").json() == {"method": "dssgd", "config": {"seed": 7}}
    status = h.http.get("/v1/status").json()
    assert status["order"] == "random" and status["turns_total"] == 2 * NUM_CLIENTS
    assert status["current"]["slot"] == 0 and status["version"] == 0


def test_a_turn_can_be_given_back(tmp_path: Path) -> None:
    h = NetHarness(tmp_path, "round_robin", 1, settings())
    tokens = {k: h.enrol(k) for k in range(NUM_CLIENTS)}
    g0 = h.http.post("/v1/dssgd/turn", headers=_auth(tokens[0])).json()
    other = h.http.post(
        f"/v1/dssgd/turns/{g0['turn']}/abandon", headers=_auth(tokens[1])
    )
    assert other.status_code == 403
    r = h.http.post(f"/v1/dssgd/turns/{g0['turn']}/abandon", headers=_auth(tokens[0]))
    assert r.status_code == 200
    again = h.http.post(
        f"/v1/dssgd/turns/{g0['turn']}/abandon", headers=_auth(tokens[0])
    )
    assert again.status_code == 409
    status = h.service.status()
    assert (status["turns_expired"], status["version"]) == (1, 0)
    assert status["current"]["client_id"] == 1  # the slot was skipped


def test_a_device_whose_uploads_are_refused_gives_turns_back(tmp_path: Path) -> None:
    """Client 0's training diverges (its data holds NaN, so its loss is NaN and its
    upload refused): its device gives each turn back, so the others go on, and stops
    acting for client 0 after 3 refusals in a row."""
    h = NetHarness(tmp_path, "round_robin", 3, settings())
    tokens = {k: h.enrol(k) for k in range(NUM_CLIENTS)}
    clean = h.client_data

    def data(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = clean(k)
        return (torch.full_like(x, float("nan")), y) if k == 0 else (x, y)

    h.client_data = data  # type: ignore[method-assign]
    traffic = h.run_devices([[0], [1, 2, 3]], tokens, 3)
    zero = next(t for t in traffic if not t.per_client)
    assert (zero.refused, zero.turns) == (3, 0)
    status = h.service.status()
    assert (status["turns_applied"], status["turns_expired"]) == (9, 3)
    rows = h.service.turn_store.turns()
    assert [r.status for r in rows if r.client_id == 0] == ["expired"] * 3


def test_server_state_round_trips_and_wrong_shapes_are_refused() -> None:
    from veil.errors import UpdateError
    from veil.learning.dssgd import ServerState, SparseVector, Upload

    server = ParameterServer(torch.arange(10, dtype=torch.float32), 2)
    server.download(1, 0.5, torch.Generator().manual_seed(0))
    vector = SparseVector(10, torch.tensor([2, 7]), torch.tensor([1.0, -1.0]))
    server.apply(Upload(0, vector, 0))
    copy = ParameterServer(torch.zeros(10), 2)
    copy.restore(server.snapshot())
    assert torch.equal(copy.parameters(), server.parameters())
    assert torch.equal(copy.counts(), server.counts())
    seen = copy.seen(1)
    assert seen is not None and copy.seen(0) is None and copy.version == 1
    with pytest.raises(UpdateError, match="10 values per tensor"):
        copy.restore(ServerState(torch.zeros(9), torch.zeros(10), {}, 0))
    with pytest.raises(UpdateError, match="client_id"):
        copy.restore(ServerState(torch.zeros(10), torch.zeros(10), {5: seen}, 0))
