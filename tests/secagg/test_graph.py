"""Neighbour graphs and the choice of k and t."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.errors import SecAggError
from veil.secagg.graph import (
    choose_degree,
    min_threshold,
    neighbour_graph,
    shortfall_probability,
    threshold_for,
)


@given(
    n=st.integers(4, 80),
    half=st.integers(1, 20),
    seed=st.binary(min_size=32, max_size=32),
)
@settings(max_examples=40, deadline=None)
def test_harary_graph_is_k_regular_and_symmetric(
    n: int, half: int, seed: bytes
) -> None:
    k = 2 * half
    ids = [3 * i + 1 for i in range(n)]
    graph = neighbour_graph(ids, k, seed)
    degree = k if k < n - 1 else n - 1
    for c, near in graph.items():
        assert c not in near
        assert len(near) == degree
        assert all(c in graph[v] for v in near)


def test_graph_depends_on_the_seed_only() -> None:
    ids = list(range(50))
    assert neighbour_graph(ids, 6, bytes(32)) == neighbour_graph(ids, 6, bytes(32))
    assert neighbour_graph(ids, 6, bytes(32)) != neighbour_graph(ids, 6, b"\x01" * 32)


def test_full_graph_and_odd_degree() -> None:
    graph = neighbour_graph([0, 1, 2], 0, bytes(32))
    assert graph[0] == {1, 2}
    with pytest.raises(SecAggError, match="even number"):
        neighbour_graph(list(range(10)), 3, bytes(32))


def test_threshold_is_more_than_half_of_the_holders() -> None:
    assert [min_threshold(h) for h in (1, 2, 3, 10, 11)] == [1, 2, 2, 6, 6]
    assert threshold_for(10, 0.3) == 6
    assert threshold_for(10, 0.75) == 8
    with pytest.raises(SecAggError, match="fraction"):
        threshold_for(10, 0.0)


def test_shortfall_probability_matches_binomial() -> None:
    from scipy import stats

    p = shortfall_probability(21, 11, 0.3)
    assert p == pytest.approx(stats.binom.cdf(10, 21, 0.7), rel=1e-9)


def test_degree_grows_with_dropouts_and_falls_back_to_full() -> None:
    assert choose_degree(500, 0.0) < choose_degree(500, 0.3) < 499
    assert choose_degree(100, 0.3) == 0  # k would reach n - 1: the full graph
    k = choose_degree(500, 0.1)
    t = threshold_for(k + 1, 0.5)
    assert 500 * shortfall_probability(k + 1, t, 0.1) <= 1e-3
    with pytest.raises(SecAggError, match="dropout_rate"):
        choose_degree(10, 1.0)


def test_one_clients_neighbours_match_the_graph() -> None:
    from veil.secagg.graph import neighbours_of

    ids = list(range(0, 60, 3))
    for k in (0, 4, 18):
        graph = neighbour_graph(ids, k, b"\x07" * 32)
        assert all(neighbours_of(c, ids, k, b"\x07" * 32) == graph[c] for c in ids)
