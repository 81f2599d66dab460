"""The protocol end to end: exact sums under dropouts at every step, aborts below the
threshold, and what the server sees."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

from veil.errors import RoundAbortedError, SecAggError
from veil.secagg import (
    FixedPoint,
    SecAggClient,
    SecAggServer,
    Step,
    dtype_for_bits,
    min_threshold,
    secure_sum,
)
from veil.secagg.messages import SecretKind, UnmaskShares, decode


def _inputs(n: int, length: int, bits: int, seed: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    dtype = dtype_for_bits(bits)
    return {
        3 * c + 1: rng.integers(0, 2**bits, length, dtype=np.uint64).astype(dtype)
        for c in range(n)
    }


def _plain_sum(
    inputs: dict[int, np.ndarray], clients: tuple[int, ...], bits: int
) -> np.ndarray:
    total = [
        sum(int(inputs[c][i]) for c in clients) % 2**bits
        for i in range(len(inputs[clients[0]]))
    ]
    return np.array(total, dtype=np.uint64)


class Revealed:
    """An intercept that records every share revealed to the server."""

    def __init__(self) -> None:
        self.kinds: dict[int, dict[SecretKind, int]] = defaultdict(
            lambda: defaultdict(int)
        )

    def __call__(self, step: Step, sender: int, data: bytes) -> list[tuple[int, bytes]]:
        if step == Step.UNMASKING:
            message = decode(data)
            assert isinstance(message, UnmaskShares)
            for client, kind, _ in message.shares:
                self.kinds[client][kind] += 1
        return [(sender, data)]

    def assert_never_both(self) -> None:
        for client, kinds in self.kinds.items():
            assert len(kinds) <= 1, f"both secrets of client {client} revealed"


@given(
    n=st.integers(3, 11),
    length=st.integers(1, 24),
    bits=st.sampled_from([8, 13, 16, 32, 64]),
    graph=st.sampled_from(["full", 2, 4]),
    data=st.data(),
)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_unmasked_sum_is_the_plain_sum_under_dropouts(
    n: int, length: int, bits: int, graph: str | int, data: st.DataObject
) -> None:
    neighbours = 0 if graph == "full" else int(graph)
    inputs = _inputs(n, length, bits, data.draw(st.integers(0, 2**32 - 1)))
    ids = sorted(inputs)
    holders = n if neighbours == 0 or neighbours >= n - 1 else neighbours + 1
    t = data.draw(st.integers(min_threshold(holders), holders))
    dropouts, alive = {}, list(ids)
    for step in Step:
        leaving = data.draw(
            st.lists(
                st.sampled_from(alive), unique=True, max_size=max(len(alive) // 3, 1)
            )
            if alive
            else st.just([])
        )
        dropouts[step] = leaving
        alive = [c for c in alive if c not in leaving]
    sent_input = [c for c in ids if not any(c in dropouts[s] for s in list(Step)[:3])]
    revealed = Revealed()
    try:
        result = secure_sum(
            inputs, bits, threshold=t, neighbours=neighbours, round=5,
            dropouts=dropouts, intercept=revealed,
        )  # fmt: skip
    except RoundAbortedError:
        if neighbours == 0 or neighbours >= n - 1:
            assert len(alive) < t  # the full graph aborts exactly below t
        revealed.assert_never_both()
        return
    revealed.assert_never_both()
    assert len(alive) >= t
    assert set(result.included) <= set(sent_input)
    if neighbours == 0 or neighbours >= n - 1:
        assert result.included == tuple(sent_input)
    for c in set(sent_input) - set(result.included):
        assert "too few neighbours" in result.dropped[c]
    expected = _plain_sum(inputs, result.included, bits)
    assert np.array_equal(result.total.astype(np.uint64), expected)


@given(
    n=st.integers(3, 9),
    clip_range=st.floats(0.01, 10.0),
    bits=st.sampled_from([16, 32, 48]),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=25, deadline=None)
def test_decoded_secure_sum_is_the_float_sum_within_quantisation_error(
    n: int, clip_range: float, bits: int, seed: int
) -> None:
    fp = FixedPoint(clip_range, bits, n)
    rng = np.random.default_rng(seed)
    values = {c: rng.uniform(-clip_range, clip_range, 30) for c in range(n)}
    result = secure_sum({c: fp.encode(v) for c, v in values.items()}, bits)
    decoded = fp.decode_sum(result.total, len(result.included))
    plain = np.sum([values[c] for c in result.included], axis=0)
    assert np.abs(decoded - plain).max() <= fp.sum_error(n) * (1 + 1e-9) + 1e-9


@pytest.mark.parametrize("neighbours", [0, 4])
def test_below_threshold_the_round_errors_and_returns_no_sum(neighbours: int) -> None:
    inputs = _inputs(9, 5, 32, 0)
    ids = sorted(inputs)
    for step in Step:
        # leave t - 1 clients: t = 5 of 9 (full graph) or 3 of 5 holders (k = 4)
        leaving = ids[: 9 - 4] if neighbours == 0 else ids[:7]
        with pytest.raises(RoundAbortedError, match="fewer than the threshold"):
            secure_sum(inputs, 32, neighbours=neighbours, dropouts={step: leaving})


def test_server_refuses_calls_after_an_abort() -> None:
    server = SecAggServer(0, range(4), 3, 16, threshold=3)
    with pytest.raises(RoundAbortedError):
        server.finish_advertise_keys()  # nobody advertised
    with pytest.raises(RoundAbortedError):
        server.finish_share_keys()


def test_a_sum_of_one_client_is_refused() -> None:
    with pytest.raises(SecAggError, match="at least 2 clients"):
        SecAggServer(0, [4], 3, 16, threshold=1)


@pytest.mark.parametrize("threshold", [1, 2, 6])
def test_threshold_must_be_more_than_half_the_holders(threshold: int) -> None:
    with pytest.raises(SecAggError, match="threshold must be in \\[3, 5\\]"):
        SecAggServer(0, range(5), 3, 16, threshold=threshold)


def _masked_input_of(
    client: int, inputs: dict[int, np.ndarray], bits: int
) -> np.ndarray:
    captured: dict[int, np.ndarray] = {}

    def grab(step: Step, sender: int, data: bytes) -> list[tuple[int, bytes]]:
        if step == Step.MASKED_INPUT and sender == client:
            captured[sender] = decode(data).vector  # type: ignore[union-attr]
        return [(sender, data)]

    secure_sum(inputs, bits, intercept=grab)
    return captured[client]


def test_masked_input_is_uniform_whatever_the_update() -> None:
    """Chi-square on the top byte of a masked input (16-bit elements), for an all-zero
    and an all-maximum update; and the two are indistinguishable from each other."""
    length, bits = 40_000, 16
    seen = []
    for value in (0, 2**bits - 1):
        inputs = {
            c: np.full(length, value if c == 0 else 7, np.uint16) for c in range(3)
        }
        masked = _masked_input_of(0, inputs, bits)
        counts = np.bincount(masked >> 8, minlength=256)
        assert stats.chisquare(counts).pvalue > 1e-4
        seen.append(counts)
    assert stats.chi2_contingency(np.array(seen)).pvalue > 1e-4


def test_client_reveals_one_secret_per_client_and_only_once() -> None:
    """A server that names a client survivor to some holders and dropped to others
    gets each holder's share of one secret only: with t above half the holders, it
    can never reach t shares of both."""
    inputs = _inputs(7, 4, 32, 1)
    server = SecAggServer(0, inputs, 4, 32, threshold=4)
    clients = {c: SecAggClient(c, v) for c, v in inputs.items()}
    config = server.round_config()
    for c, client in clients.items():
        server.receive(c, client.advertise_keys(config))
    for c, m in server.finish_advertise_keys().items():
        server.receive(c, clients[c].share_keys(m))
    for c, m in server.finish_share_keys().items():
        server.receive(c, clients[c].masked_input(m))
    server.finish_masked_input()
    target, others = 1, [c for c in inputs if c != 1]
    counts: dict[SecretKind, int] = defaultdict(int)
    from veil.secagg.messages import UnmaskRequest

    for i, c in enumerate(others):
        survivors = tuple(sorted({c, target} if i % 2 else {c}))
        dropped = () if i % 2 else (target,)
        answer = decode(
            clients[c].unmask(UnmaskRequest(0, c, survivors, dropped).encode())
        )
        assert isinstance(answer, UnmaskShares)
        for client, kind, _ in answer.shares:
            if client == target:
                counts[kind] += 1
        with pytest.raises(SecAggError, match="cannot run UNMASKING now"):
            clients[c].unmask(UnmaskRequest(0, c, survivors, dropped).encode())
    assert sum(counts.values()) == len(others)
    assert min(counts[SecretKind.SELF_MASK_SEED], counts[SecretKind.MASK_KEY]) < 4


def test_client_refuses_a_request_naming_a_client_both_ways() -> None:
    inputs = _inputs(3, 2, 16, 2)
    ids = sorted(inputs)
    server = SecAggServer(0, ids, 2, 16, threshold=2)
    clients = {c: SecAggClient(c, v) for c, v in inputs.items()}
    for c in ids:
        server.receive(c, clients[c].advertise_keys(server.round_config()))
    for c, m in server.finish_advertise_keys().items():
        server.receive(c, clients[c].share_keys(m))
    for c, m in server.finish_share_keys().items():
        server.receive(c, clients[c].masked_input(m))
    server.finish_masked_input()
    from veil.errors import MessageError
    from veil.secagg.messages import UnmaskRequest

    a, b = ids[0], ids[1]
    bad = UnmaskRequest(0, a, (a, b), (b,)).encode()
    with pytest.raises(MessageError, match="both survivor and dropped"):
        clients[a].unmask(bad)


def test_the_server_never_asks_for_the_mask_key_of_a_client_in_the_sum() -> None:
    inputs = _inputs(8, 3, 32, 3)
    ids = sorted(inputs)
    revealed = Revealed()
    result = secure_sum(
        inputs, 32, dropouts={Step.MASKED_INPUT: ids[:2], Step.UNMASKING: ids[2:3]},
        intercept=revealed,
    )  # fmt: skip
    for c in result.included:
        assert set(revealed.kinds[c]) == {SecretKind.SELF_MASK_SEED}
    for c in ids[:2]:
        assert set(revealed.kinds[c]) == {SecretKind.MASK_KEY}
    assert ids[2] in result.included  # dropped while unmasking: still in the sum


def test_steps_run_once_and_in_order() -> None:
    client = SecAggClient(0, np.zeros(3, np.uint32))
    with pytest.raises(
        SecAggError, match="cannot run SHARE_KEYS now; it expects ADVERTISE_KEYS"
    ):
        client.share_keys(b"")


class ClientZeroView:
    """What the server receives about client 0: its masked input and the shares of
    its secrets revealed to it."""

    def __init__(self) -> None:
        self.masked = np.zeros(0, np.uint16)
        self.seed_shares: dict[int, int] = {}

    def __call__(self, step: Step, sender: int, data: bytes) -> list[tuple[int, bytes]]:
        message = decode(data)
        if step == Step.MASKED_INPUT and sender == 0:
            self.masked = message.vector  # type: ignore[union-attr]
        if step == Step.UNMASKING:
            for client, kind, share in message.shares:  # type: ignore[union-attr]
                if client == 0:
                    assert kind == SecretKind.SELF_MASK_SEED
                    self.seed_shares[sender] = share
        return [(sender, data)]


def test_what_the_server_can_unmask_of_one_client_is_still_uniform() -> None:
    """With its whole view of client 0 the server removes client 0's self mask (as it
    must, for the sum); what remains is still hidden by the pairwise masks: uniform
    whatever the update."""
    from veil.secagg._common import self_mask
    from veil.secagg.shamir import reconstruct

    length, bits = 40_000, 16
    seen = []
    for value in (0, 2**bits - 1):
        inputs = {
            c: np.full(length, value if c == 0 else 7, np.uint16) for c in range(4)
        }
        view = ClientZeroView()
        result = secure_sum(inputs, bits, round=9, intercept=view)
        seed = reconstruct(view.seed_shares, result.threshold)
        rest = view.masked - self_mask(seed, 9, length, bits)
        counts = np.bincount(rest >> 8, minlength=256)
        assert stats.chisquare(counts).pvalue > 1e-4
        seen.append(counts)
    assert stats.chi2_contingency(np.array(seen)).pvalue > 1e-4
