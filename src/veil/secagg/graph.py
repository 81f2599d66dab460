"""Who masks with whom: the full graph (Bonawitz et al. 2017) or a random k-regular
graph (SecAgg+, Bell et al. 2020).

In the full graph every client shares its secrets with, and masks against, every
other client: cost grows with n per client and n**2 at the server. SecAgg+ places the
clients on a ring in a random order fixed by a public seed and links each to its
``k / 2`` nearest on either side (a Harary graph), so each client deals with k
neighbours only.

A client's secrets are shared among its *holders*: itself and its neighbours.
:func:`choose_degree` picks k from n, the expected dropout rate and the threshold
fraction so that every needed secret keeps enough holders with high probability.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from veil.errors import SecAggError

__all__ = [
    "choose_degree",
    "min_threshold",
    "neighbour_graph",
    "neighbours_of",
    "shortfall_probability",
    "threshold_for",
]


def neighbour_graph(
    clients: Sequence[int], neighbours: int, seed: bytes
) -> dict[int, frozenset[int]]:
    """Each client's neighbours.

    Args:
        clients: the invited client ids, distinct.
        neighbours: k, even and >= 2, for SecAgg+; 0 (or k >= n - 1) for the full
            graph.
        seed: public random bytes fixing the ring order (SecAgg+ only).
    """
    ring = _ring(clients, neighbours, seed)
    return {c: _near(ring, pos, neighbours) for pos, c in enumerate(ring)}


def neighbours_of(
    client: int, clients: Sequence[int], neighbours: int, seed: bytes
) -> frozenset[int]:
    """One client's neighbours in :func:`neighbour_graph` (in O(n), not O(n k))."""
    ring = _ring(clients, neighbours, seed)
    if client not in ring:
        raise SecAggError(f"client {client} is not among the clients")
    return _near(ring, ring.index(client), neighbours)


def _ring(clients: Sequence[int], neighbours: int, seed: bytes) -> list[int]:
    """The clients in ring order: sorted for the full graph, else shuffled by the
    seed."""
    ids = sorted(set(clients))
    if len(ids) != len(clients):
        raise SecAggError("clients must be distinct ids")
    if neighbours == 0 or neighbours >= len(ids) - 1:
        return ids
    if neighbours < 2 or neighbours % 2:
        raise SecAggError(
            f"neighbours must be 0 (full graph) or an even number >= 2, got "
            f"{neighbours}"
        )
    return [int(c) for c in np.random.default_rng(list(seed)).permutation(ids)]


def _near(ring: list[int], pos: int, neighbours: int) -> frozenset[int]:
    n = len(ring)
    if neighbours == 0 or neighbours >= n - 1:
        return frozenset(ring[:pos] + ring[pos + 1 :])
    half = neighbours // 2
    return frozenset(ring[(pos + d) % n] for d in range(-half, half + 1) if d)


def min_threshold(holders: int) -> int:
    """The smallest threshold allowed for ``holders`` share holders: more than half,
    so that two disjoint sets of holders can never both reach it (an honest holder
    reveals one of a client's two secrets, never both)."""
    return holders // 2 + 1


def shortfall_probability(holders: int, threshold: int, dropout_rate: float) -> float:
    """Probability that fewer than ``threshold`` of ``holders`` stay, each dropping
    independently with probability ``dropout_rate``."""
    stay = 1.0 - dropout_rate
    return sum(
        math.comb(holders, j) * stay**j * dropout_rate ** (holders - j)
        for j in range(threshold)
    )


def choose_degree(
    num_clients: int,
    dropout_rate: float,
    threshold_fraction: float = 0.5,
    abort_probability: float = 1e-3,
) -> int:
    """The smallest even k (SecAgg+) for which a round aborts for lack of holders with
    probability at most ``abort_probability`` (union bound over clients), and at least
    ``2 * ceil(log2 n)``; 0 (the full graph) when that k reaches ``n - 1``.

    Args:
        num_clients: n, >= 2.
        dropout_rate: expected fraction of clients that drop, in [0, 1).
        threshold_fraction: t over the holders (k + 1), in [0.5, 1]; t is never below
            :func:`min_threshold`.
        abort_probability: target, in (0, 1).

    The log floor is a heuristic for the graph's connectivity (Bell et al. 2020 give
    k = O(log n)); it is not their exact bound against corrupted clients.
    """
    if num_clients < 2:
        raise SecAggError(f"num_clients must be >= 2, got {num_clients}")
    if not 0 <= dropout_rate < 1:
        raise SecAggError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
    k = max(2, 2 * math.ceil(math.log2(num_clients)))
    while k < num_clients - 1:
        t = threshold_for(k + 1, threshold_fraction)
        risk = num_clients * shortfall_probability(k + 1, t, dropout_rate)
        if risk <= abort_probability:
            return k
        k += 2
    return 0


def threshold_for(holders: int, fraction: float) -> int:
    """``max(ceil(fraction * holders), min_threshold(holders))``, at most
    ``holders``."""
    if not 0 < fraction <= 1:
        raise SecAggError(f"threshold fraction must be in (0, 1], got {fraction}")
    return min(holders, max(math.ceil(fraction * holders), min_threshold(holders)))
