"""Run one secure aggregation round in this process: :func:`secure_sum`.

The driver plays the network for the client and server state machines: it passes each
message, as bytes, from its sender to its recipient, in step order, and lets chosen
clients drop out before any step. It is what the simulation runtime calls, and what
other protocols built on secure aggregation (distributed DP noise, ...) can call with
their own encoded vectors. Every byte counted in :class:`SecureSum` is a byte of a
message that would travel over the network runtime.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from veil.errors import RoundAbortedError, SecAggError, VeilError
from veil.secagg._common import Step
from veil.secagg.client import SecAggClient
from veil.secagg.graph import neighbour_graph, threshold_for
from veil.secagg.server import SecAggServer

__all__ = ["Intercept", "SecureSum", "secure_sum"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Sees every client-to-server message ``(step, sender, data)`` and returns what
#: actually reaches the server, as ``(transport sender, data)`` pairs: tests use it to
#: tamper with, forge, replay or withhold messages.
Intercept = Callable[[Step, int, bytes], list[tuple[int, bytes]]]


@dataclass(frozen=True, eq=False)
class SecureSum:
    """The outcome of one round.

    Attributes:
        total: the sum of the included clients' inputs modulo ``2**bits`` (1-D, the
            inputs' unsigned type).
        included: clients whose input is in ``total``, sorted.
        dropped: clients the server dropped, with the reason. A client dropped during
            unmasking stays in ``included``.
        refused: clients that stopped on their own, with the reason (a message they
            could not accept, too few neighbours left).
        threshold: t used.
        neighbours: k used (0 for the full graph).
        bytes_up: bytes each client sent, all steps together.
        bytes_down: bytes each client received.
        client_seconds: CPU time each client spent in its steps.
        server_seconds: CPU time the server spent in its steps.
    """

    total: np.ndarray
    included: tuple[int, ...]
    dropped: dict[int, str]
    refused: dict[int, str]
    threshold: int
    neighbours: int
    bytes_up: dict[int, int] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)
    client_seconds: dict[int, float] = field(default_factory=dict)
    server_seconds: float = 0.0


class _Round:
    """The mutable state of one driven round."""

    def __init__(
        self,
        server: SecAggServer,
        clients: dict[int, SecAggClient],
        dropouts: Mapping[Step, Collection[int]],
        intercept: Intercept | None,
    ) -> None:
        self.server, self.clients = server, clients
        self.dropouts, self.intercept = dropouts, intercept
        self.alive = set(clients)
        self.refused: dict[int, str] = {}
        self.up = dict.fromkeys(clients, 0)
        self.down = dict.fromkeys(clients, 0)
        self.client_seconds = dict.fromkeys(clients, 0.0)
        self.server_seconds = 0.0

    def server_call(self, fn: Callable[[], T]) -> T:
        start = time.thread_time()
        try:
            return fn()
        finally:
            self.server_seconds += time.thread_time() - start

    def step(self, step: Step, inbox: Mapping[int, bytes]) -> None:
        """Deliver ``inbox`` (client -> server message), collect the answers of the
        clients that neither drop out nor refuse, and hand them to the server."""
        leaving = set(self.dropouts.get(step, ()))
        for c, message in sorted(inbox.items()):
            if c not in self.alive:
                continue
            self.down[c] += len(message)
            if c in leaving:
                self.alive.discard(c)
                continue
            start = time.thread_time()
            try:
                answer = _CLIENT_STEPS[step](self.clients[c], message)
            except VeilError as exc:
                self.alive.discard(c)
                self.refused[c] = f"{step.name}: {exc}"
                logger.info("client %d stopped: %s", c, exc)
                continue
            finally:
                self.client_seconds[c] += time.thread_time() - start
            self.up[c] += len(answer)
            sent = (
                [(c, answer)]
                if self.intercept is None
                else self.intercept(step, c, answer)
            )
            for sender, data in sent:
                self.server_call(functools.partial(self.server.receive, sender, data))


_CLIENT_STEPS: dict[Step, Callable[[SecAggClient, bytes], bytes]] = {
    Step.ADVERTISE_KEYS: SecAggClient.advertise_keys,
    Step.SHARE_KEYS: SecAggClient.share_keys,
    Step.MASKED_INPUT: SecAggClient.masked_input,
    Step.UNMASKING: SecAggClient.unmask,
}


def secure_sum(
    inputs: Mapping[int, np.ndarray],
    bits: int,
    *,
    threshold: int | None = None,
    neighbours: int = 0,
    round: int = 0,
    dropouts: Mapping[Step, Collection[int]] | None = None,
    intercept: Intercept | None = None,
    graph_seed: bytes | None = None,
) -> SecureSum:
    """The sum modulo ``2**bits`` of the clients' inputs, by secure aggregation.

    Args:
        inputs: each client's encoded input, by client id: 1-D arrays of the same
            length and of the unsigned type of ``bits``
            (:func:`~veil.secagg.fixedpoint.dtype_for_bits`).
        bits: width b of the modulus ``2**b``, in [2, 64].
        threshold: t, shares needed to reconstruct a secret; by default the smallest
            allowed, just over half of each client's holders (itself and its
            neighbours).
        neighbours: k for SecAgg+ (even, >= 2; see
            :func:`~veil.secagg.graph.choose_degree`); 0 for every other client.
        round: the round number, bound into every message and key.
        dropouts: clients that drop out before each step, by step.
        intercept: see :data:`Intercept` (tests).
        graph_seed: 32 bytes fixing the SecAgg+ graph; random by default.

    Raises:
        RoundAbortedError: fewer than ``threshold`` clients (or holders of a needed
            secret) remained; no sum is returned.
        SecAggError: bad parameters or inputs.
    """
    if not inputs:
        raise SecAggError("inputs must hold at least one client's vector")
    lengths = {len(np.asarray(v)) for v in inputs.values()}
    if len(lengths) != 1:
        raise SecAggError(f"inputs must all have one length, got {sorted(lengths)}")
    ids = sorted(inputs)
    if threshold is None:
        holders = len(neighbour_graph(ids, neighbours, bytes(32))[ids[0]]) + 1
        threshold = threshold_for(holders, 0.5)
    server = SecAggServer(
        round, ids, lengths.pop(), bits, threshold, neighbours, graph_seed
    )
    clients = {c: SecAggClient(c, inputs[c]) for c in ids}
    run = _Round(server, clients, dropouts or {}, intercept)
    config = server.round_config()

    # advertise keys, share keys, masked input, unmasking
    try:
        run.step(Step.ADVERTISE_KEYS, dict.fromkeys(ids, config))
        run.step(Step.SHARE_KEYS, run.server_call(server.finish_advertise_keys))
        run.step(Step.MASKED_INPUT, run.server_call(server.finish_share_keys))
        run.step(Step.UNMASKING, run.server_call(server.finish_masked_input))
        total = run.server_call(server.finish_unmasking)
    except RoundAbortedError as exc:
        exc.bytes_up, exc.bytes_down = sum(run.up.values()), sum(run.down.values())
        raise
    return SecureSum(
        total=total,
        included=server.included,
        dropped=dict(server.dropped),
        refused=run.refused,
        threshold=threshold,
        neighbours=neighbours,
        bytes_up=run.up,
        bytes_down=run.down,
        client_seconds=run.client_seconds,
        server_seconds=run.server_seconds,
    )
