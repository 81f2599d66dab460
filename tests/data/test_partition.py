"""Partitioners: cover, disjointness, no empty client, and each scheme's shape."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.data import dirichlet, iid, natural, partition, shards
from veil.errors import DataError


def assert_cover_and_disjoint(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == n, "every example is assigned exactly once"
    assert np.array_equal(np.sort(joined), np.arange(n))
    assert all(len(p) > 0 for p in parts), "no client is empty"


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 400),
    clients=st.integers(1, 60),
    scheme=st.sampled_from(["iid", "shards", "dirichlet"]),
    alpha=st.floats(0.001, 1000),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_partition_covers_disjointly(
    n: int, clients: int, scheme: str, alpha: float, seed: int
) -> None:
    labels = np.random.default_rng(seed).integers(0, 10, n)
    rng = np.random.default_rng(seed)
    if clients * (2 if scheme == "shards" else 1) > n:
        with pytest.raises(DataError, match="at most the number of examples"):
            partition(scheme, labels, clients, rng, alpha=alpha)
        return
    parts = partition(scheme, labels, clients, rng, alpha=alpha)
    assert len(parts) == clients
    assert_cover_and_disjoint(parts, n)


def test_iid_sizes_are_equal() -> None:
    parts = iid(60_000, 100, np.random.default_rng(0))
    assert {len(p) for p in parts} == {600}


def test_shards_follow_mcmahan() -> None:
    # Sorted labels, 200 shards of 300, two per client: each client sees <= 2 labels
    # (a shard may straddle a label boundary, so allow up to 4).
    labels = np.repeat(np.arange(10), 6000)
    parts = shards(labels, 100, np.random.default_rng(0), shards_per_client=2)
    assert {len(p) for p in parts} == {600}
    assert_cover_and_disjoint(parts, 60_000)
    distinct = [len(np.unique(labels[p])) for p in parts]
    assert max(distinct) <= 2  # 6000 per label is a multiple of 300
    assert np.mean(distinct) > 1.5  # two shards usually differ in label


def test_dirichlet_small_alpha_concentrates_labels() -> None:
    labels = np.repeat(np.arange(10), 600)
    parts = dirichlet(labels, 100, alpha=0.01, rng=np.random.default_rng(0))
    assert_cover_and_disjoint(parts, 6000)
    distinct = [len(np.unique(labels[p])) for p in parts]
    assert np.median(distinct) <= 2


def test_dirichlet_large_alpha_is_close_to_iid() -> None:
    labels = np.repeat(np.arange(10), 600)
    parts = dirichlet(labels, 10, alpha=1000.0, rng=np.random.default_rng(0))
    for p in parts:
        freq = np.bincount(labels[p], minlength=10) / len(p)
        assert np.abs(freq - 0.1).max() < 0.05


def test_dirichlet_rejects_bad_alpha() -> None:
    with pytest.raises(DataError, match="alpha must be"):
        dirichlet(np.zeros(10, dtype=int), 2, alpha=0.0, rng=np.random.default_rng(0))


def test_natural_gives_one_client_per_user() -> None:
    users = np.array(["b", "a", "b", "c", "a"])
    parts = natural(users)
    assert [p.tolist() for p in parts] == [[1, 4], [0, 2], [3]]
    with pytest.raises(DataError, match="needs a user id"):
        natural(None)


def test_too_many_clients_is_refused_clearly() -> None:
    with pytest.raises(DataError, match="no client is empty"):
        iid(5, 6, np.random.default_rng(0))
    with pytest.raises(DataError, match="partition must be one of"):
        partition("random", np.zeros(5), 2, np.random.default_rng(0))
