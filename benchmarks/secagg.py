"""Benchmark: secure aggregation (full graph and SecAgg+) against plain summation.

For n clients, vectors of d elements and a dropout rate, this measures in the same run

- plain: each client sends its update as float32 bytes; the server decodes and adds;
- secagg: Bonawitz et al. (2017), every client masks with every other (k = n - 1);
- secagg+: Bell et al. (2020), a random k-regular graph, k from
  :func:`veil.secagg.choose_degree` for the dropout rate (abort risk <= 1e-3);

and prints, per client (mean over the clients that finished) and for the server, CPU
seconds and bytes, with the ratios to plain: ``up x`` is the communication expansion,
bytes a client sends over a plain 32-bit update (4 d bytes). Dropped clients are drawn
at random (seeded), each at a step drawn uniformly among the four.

How a cell is measured (column ``how``):

- ``run``: the whole protocol is run at d (every byte and CPU second is real);
- ``split``: the protocol is run at d = 1, and the cost that grows with d is added
  from timings taken just before the cell at d (:func:`mask_costs`): the CPU time of one
  mask (ChaCha20 keystream, added to the vector) times the masks each client
  expanded in the d = 1 run, and for the server the time of one masked input
  (decoded, added, self mask removed) times the inputs, plus one mask per pairwise
  mask it removed for a dropped client. Bytes are exact: the masked vector grows by
  4 bytes per element, nothing else depends on d. Cells up to ``--run-budget`` mask
  elements are ``run``; the rest are ``split``. With ``--check`` the cells that are
  ``run`` are also computed ``split`` and the ratio (split / run) printed, so the
  split estimate is validated.

Run: ``python benchmarks/secagg.py`` (the issue's grid; several minutes on 2 shared
cores, most of it the full graph at n = 500), or e.g. ``--n 10 100 --d 10000``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from veil.secagg import SecureSum, Step, choose_degree, secure_sum, threshold_for
from veil.secagg.graph import neighbour_graph

__all__ = ["main"]

BITS = 32
SEED = bytes(range(32))


@dataclass
class Cost:
    """Per-client (mean) and server CPU seconds and bytes of one cell."""

    client_s: float
    server_s: float
    up: float
    down: float
    how: str
    k: int = 0
    t: int = 0
    included: int = 0


def cpu(fn: Callable[[], object], at_least: float = 0.05) -> float:
    """Mean CPU seconds of one ``fn()``, over as many calls as take ``at_least``."""
    calls, start = 0, time.process_time()
    while True:
        fn()
        calls += 1
        spent = time.process_time() - start
        if spent >= at_least:
            return spent / calls


def plain(n: int, d: int, rng: np.random.Generator) -> Cost:
    updates = [rng.standard_normal(d).astype(np.float32) for _ in range(min(n, 8))]
    client_s = cpu(lambda: [u.tobytes() for u in updates]) / len(updates)
    payloads = [updates[i % len(updates)].tobytes() for i in range(n)]

    def server() -> None:
        total = np.zeros(d, np.float64)
        for p in payloads:
            total += np.frombuffer(p, np.float32)

    return Cost(client_s, cpu(server), 4 * d, 4 * d, "run")


def dropouts(ids: list[int], rate: float, seed: int) -> dict[Step, list[int]]:
    rng = np.random.default_rng(seed)
    leaving = rng.choice(ids, round(rate * len(ids)), replace=False)
    plan: dict[Step, list[int]] = {s: [] for s in Step}
    for c in sorted(int(c) for c in leaving):
        plan[Step(int(rng.integers(1, 5)))].append(c)
    return plan


def masks_expanded(
    result: SecureSum, graph: dict[int, frozenset[int]], plan: dict[Step, list[int]]
) -> tuple[dict[int, int], int]:
    """Masks each finishing client expanded, and pairwise masks the server removed
    for dropped clients (from who dropped when)."""
    gone_before = {s: {c for st in Step if st < s for c in plan[st]} for s in Step}
    dropped = set(result.dropped) | set(result.refused)
    u2 = (
        set(graph)
        - gone_before[Step.MASKED_INPUT]
        - {
            c
            for c, why in result.dropped.items()
            if why.startswith(("ADVERTISE", "SHARE"))
        }
    )
    client = {c: 1 + len(graph[c] & u2) for c in result.included if c not in dropped}
    u3 = set(result.included)
    return client, sum(len(graph[u] & u3) for u in u2 - u3)


def run_protocol(n: int, d: int, rate: float, k: int) -> tuple[Cost, SecureSum, dict]:
    """One real round at length ``d``: its cost, result and dropout plan."""
    ids = list(range(n))
    rng = np.random.default_rng(n * 7 + d)
    inputs = {c: rng.integers(0, 2**20, d, dtype=np.uint32) for c in ids}
    t = threshold_for(n if k == 0 else k + 1, 0.5)
    plan = dropouts(ids, rate, seed=n + int(100 * rate))
    result = secure_sum(
        inputs, BITS, threshold=t, neighbours=k, dropouts=plan, graph_seed=SEED
    )
    finished = [c for c in result.included if c not in result.dropped]
    cost = Cost(
        client_s=statistics.mean(result.client_seconds[c] for c in finished),
        server_s=result.server_seconds,
        up=statistics.mean(result.bytes_up[c] for c in finished),
        down=statistics.mean(result.bytes_down[c] for c in finished),
        how="run",
        k=k,
        t=t,
        included=len(result.included),
    )
    return cost, result, plan


def split(
    base: tuple[Cost, SecureSum, dict], n: int, d: int, t_mask: float, t_input: float
) -> Cost:
    """The cost at length ``d`` from a round run at length 1 (see the module doc)."""
    cost, result, plan = base
    graph = neighbour_graph(list(range(n)), cost.k, SEED)
    client_masks, pair_masks = masks_expanded(result, graph, plan)
    extra_client = statistics.mean(client_masks.values()) * t_mask
    extra_server = pair_masks * t_mask + cost.included * t_input
    return Cost(
        cost.client_s + extra_client,
        cost.server_s + extra_server,
        cost.up + 4 * (d - 1),
        cost.down,
        "split",
        cost.k,
        cost.t,
        cost.included,
    )


def mask_costs(d: int) -> tuple[float, float]:
    """CPU seconds, in context, of one mask of length ``d`` at a client and of one
    masked input at the server (decode, add, remove its self mask): the difference
    between a 10-client round at ``d`` and at 1 (each client expands 10 masks, the
    server takes 10 inputs), the least of three (other processes only add time)."""
    client, server = [], []
    for _ in range(3):
        at_d, at_1 = run_protocol(10, d, 0.0, 0)[0], run_protocol(10, 1, 0.0, 0)[0]
        client.append((at_d.client_s - at_1.client_s) / 10)
        server.append((at_d.server_s - at_1.server_s) / 10)
    return max(min(client), 0.0), max(min(server), 0.0)


HEADER = (
    f"{'mode':8} {'n':>4} {'d':>8} {'drop':>5} {'k':>4} {'t':>4} {'how':>5} "
    f"{'client s':>9} {'x plain':>8} {'server s':>9} {'x plain':>8} "
    f"{'up B/client':>12} {'up x':>6} {'check':>9}"
)


def row(
    mode: str, n: int, d: int, rate: float, cost: Cost, base: Cost, check: str
) -> str:
    degree = "" if mode == "plain" else str(n - 1 if cost.k == 0 else cost.k)
    t = "" if mode == "plain" else str(cost.t)
    return (
        f"{mode:8} {n:4d} {d:8d} {rate:5.0%} {degree:>4} {t:>4} {cost.how:>5} "
        f"{cost.client_s:9.5f} {cost.client_s / base.client_s:8.0f} "
        f"{cost.server_s:9.4f} {cost.server_s / base.server_s:8.1f} "
        f"{cost.up:12.0f} {cost.up / (4 * d):6.3f} {check:>9}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[10, 100, 500])
    parser.add_argument("--d", type=int, nargs="+", default=[10**4, 10**5, 10**6])
    parser.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.1, 0.3])
    parser.add_argument("--run-budget", type=float, default=3e8, help="mask elements")
    parser.add_argument("--check", action="store_true", help="validate split cells")
    args = parser.parse_args()

    # Warm the allocator: once a large block is freed, glibc serves later large
    # blocks from its heap instead of fresh (faulting) pages. Every cell is then
    # measured in that state; a cold process pays about twice the CPU for its first
    # large masks.
    np.ones(3 * max(args.d), np.uint32).sum()
    print(HEADER, flush=True)
    for n in args.n:
        for rate in args.dropout:
            for d in args.d:
                # calibrated next to the cell: load from other processes drifts
                timing = mask_costs(d)
                base = plain(n, d, np.random.default_rng(0))
                print(row("plain", n, d, rate, base, base, ""), flush=True)
                for mode in ("secagg", "secagg+"):
                    k = 0 if mode == "secagg" else choose_degree(n, rate)
                    cost = cell(n, d, rate, k, args.run_budget, timing, args.check)
                    print(row(mode, n, d, rate, cost[0], base, cost[1]), flush=True)


_BASES: dict[tuple[int, float, int], tuple[Cost, SecureSum, dict]] = {}


def cell(
    n: int,
    d: int,
    rate: float,
    k: int,
    budget: float,
    timing: tuple[float, float],
    check: bool,
) -> tuple[Cost, str]:
    """The cost of one cell, and the split/run ratios when checked."""
    degree = n - 1 if k == 0 else k
    key = (n, rate, k)
    if n * (degree + 1) * d * (1 + rate) > budget:
        if key not in _BASES:
            _BASES[key] = run_protocol(n, 1, rate, k)
        return split(_BASES[key], n, d, *timing), ""
    cost = run_protocol(n, d, rate, k)[0]
    if not check:
        return cost, ""
    if key not in _BASES:
        _BASES[key] = run_protocol(n, 1, rate, k)
    model = split(_BASES[key], n, d, *timing)
    return (
        cost,
        f"{model.client_s / cost.client_s:.2f}/{model.server_s / cost.server_s:.2f}",
    )


if __name__ == "__main__":
    main()
