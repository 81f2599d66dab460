"""Partitioners: how a training set is split among clients.

Every partitioner returns one index array per client. The arrays are disjoint and
together cover the training set, and no client is left empty: where a split cannot
give every client an example, the partitioner refuses with :class:`DataError` instead
of letting a later step crash on an empty client.

- ``iid``: a random permutation cut into near-equal parts.
- ``shards``: McMahan et al. (2017): sort by label, cut into shards, give each client
  ``shards_per_client`` of them (200 shards of 300 and two per client on MNIST).
- ``dirichlet``: each client draws a label distribution from Dirichlet(alpha) and fills
  an equal share of the data from it (Hsu et al. 2019); small alpha, few labels each.
- ``natural``: one client per user id recorded in the data.
"""

from __future__ import annotations

import numpy as np

from veil.errors import DataError

__all__ = ["PARTITIONERS", "dirichlet", "iid", "natural", "partition", "shards"]


def _check_clients(num_examples: int, num_clients: int) -> None:
    if num_clients < 1:
        raise DataError(f"num_clients must be at least 1, got {num_clients}")
    if num_clients > num_examples:
        raise DataError(
            f"num_clients must be at most the number of examples ({num_examples}) "
            f"so that no client is empty, got {num_clients}"
        )


def iid(
    num_examples: int, num_clients: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Split ``range(num_examples)`` uniformly at random into near-equal parts."""
    _check_clients(num_examples, num_clients)
    return [
        np.sort(p) for p in np.array_split(rng.permutation(num_examples), num_clients)
    ]


def shards(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    shards_per_client: int = 2,
) -> list[np.ndarray]:
    """Sort by label, cut ``num_clients * shards_per_client`` shards, deal them out.

    Ties within a label are broken at random, so the shard a label's examples land in
    does not depend on the file's order. When the data do not divide evenly, shard
    sizes differ by at most one and every example is still dealt.
    """
    labels = np.asarray(labels)
    num_shards = num_clients * shards_per_client
    if shards_per_client < 1:
        raise DataError(
            f"shards_per_client must be at least 1, got {shards_per_client}"
        )
    _check_clients(len(labels), num_clients)
    if num_shards > len(labels):
        raise DataError(
            f"num_clients * shards_per_client must be at most the number of examples "
            f"({len(labels)}), got {num_clients} * {shards_per_client} = {num_shards}"
        )
    order = np.lexsort((rng.random(len(labels)), labels))
    pieces = np.array_split(order, num_shards)
    dealt = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([pieces[s] for s in row])) for row in dealt]


def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Give each client an equal share drawn from its own Dirichlet(alpha) label mix.

    Each client ``k`` draws label proportions ``q_k ~ Dirichlet(alpha * p)``, with
    ``p`` the label frequencies of the whole set, and fills its share by drawing
    labels in proportion to ``q_k`` among the examples still unassigned; when a label
    runs out, its weight moves to the labels that remain. Shares differ by at most
    one example, so no client is empty for any alpha > 0, and the clients together
    cover the data.

    Args:
        labels: shape ``(N,)``, integer class of each example.
        alpha: concentration, > 0. Small (0.01): a client sees one or two labels;
            large (1000): close to ``iid``.
    """
    labels = np.asarray(labels)
    if not alpha > 0 or not np.isfinite(alpha):
        raise DataError(f"alpha must be a finite number > 0, got {alpha}")
    _check_clients(len(labels), num_clients)
    classes, inverse = np.unique(labels, return_inverse=True)
    pools = [rng.permutation(np.flatnonzero(inverse == c)) for c in range(len(classes))]
    left = np.array([len(p) for p in pools])
    shares = np.array_split(np.arange(len(labels)), num_clients)
    sizes = np.array([len(p) for p in shares])
    mixes = _balanced_mixes(rng, alpha, sizes, left.copy())
    clients: list[np.ndarray] = []
    for size, mix in zip(sizes, mixes, strict=True):
        taken: list[np.ndarray] = []
        need = int(size)
        while need > 0:
            weights = np.where(left > 0, mix, 0.0)
            if weights.sum() <= 0:  # every label the client favours has run out
                weights = left.astype(float)
            counts = np.minimum(_apportion(need, weights / weights.sum()), left)
            for c in np.flatnonzero(counts):
                start = len(pools[c]) - left[c]
                taken.append(pools[c][start : start + counts[c]])
                left[c] -= counts[c]
            need -= int(counts.sum())
        clients.append(np.sort(np.concatenate(taken)))
    return clients


_FITTING_STEPS = 3


def _balanced_mixes(
    rng: np.random.Generator, alpha: float, sizes: np.ndarray, counts: np.ndarray
) -> np.ndarray:
    """Draw each client's label mix, then rescale the mixes toward asking, together,
    for the examples there are (a few steps of iterative proportional fitting).

    Without this step the last clients inherit whatever labels the others left over,
    which is far from their mix when alpha is large. Only a few steps are taken, so
    that a label few clients favour is not spread thinly over many clients when alpha
    is small; the greedy fill that follows absorbs what remains.
    """
    prior = counts / counts.sum()
    # Dirichlet draws with tiny alpha underflow to zero; floor them to stay valid.
    mixes = rng.dirichlet(np.maximum(alpha * prior, 1e-3), size=len(sizes))
    bad = ~np.all(np.isfinite(mixes), axis=1)  # every gamma draw underflowed
    mixes[bad] = np.eye(len(counts))[rng.choice(len(counts), bad.sum(), p=prior)]
    plan = mixes * sizes[:, None]
    for _ in range(_FITTING_STEPS):
        plan *= counts / np.maximum(plan.sum(axis=0), 1e-12)
        plan *= (sizes / plan.sum(axis=1))[:, None]
    return plan / sizes[:, None]


def _apportion(total: int, shares: np.ndarray) -> np.ndarray:
    """Integer counts summing to ``total`` in proportion to ``shares`` (largest
    remainders get the leftover units), so no sampling noise is added to the mix."""
    exact = total * shares
    counts = np.floor(exact).astype(np.int64)
    leftover = total - int(counts.sum())
    counts[np.argsort(counts - exact, kind="stable")[:leftover]] += 1
    return counts


def natural(users: np.ndarray | None) -> list[np.ndarray]:
    """One client per distinct user id, in sorted order of the ids."""
    if users is None:
        raise DataError(
            "the natural partition needs a user id per example, and this dataset has "
            "none; choose partition = 'iid', 'shards' or 'dirichlet'"
        )
    users = np.asarray(users)
    ids, inverse = np.unique(users, return_inverse=True)
    return [np.flatnonzero(inverse == k) for k in range(len(ids))]


PARTITIONERS = ("iid", "shards", "dirichlet", "natural")


def partition(
    name: str,
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    users: np.ndarray | None = None,
    alpha: float = 0.5,
    shards_per_client: int = 2,
) -> list[np.ndarray]:
    """Split a training set among clients with the partitioner ``name``."""
    if name == "iid":
        return iid(len(labels), num_clients, rng)
    if name == "shards":
        return shards(labels, num_clients, rng, shards_per_client)
    if name == "dirichlet":
        return dirichlet(labels, num_clients, alpha, rng)
    if name == "natural":
        return natural(users)
    raise DataError(f"partition must be one of {list(PARTITIONERS)}, got {name!r}")
