"""How do veil's runtimes scale with the number of clients?

FedAvg on full MNIST with the small tanh CNN (E=1, B=10, lr 0.1), split IID among
100, 1,000 and 10,000 clients, 10 to 100 of them per round. Each variant runs in a
fresh process, so its peak memory is its own:

- ``bare``: a PyTorch loop written from scratch doing the same local steps (the
  framework-free baseline);
- ``simulation``: veil's ``SimulationRuntime``;
- ``ray``: veil's ``RayRuntime`` on a local Ray (all of this machine's CPUs);
- ``flower``: Flower's simulation of the same task (``benchmarks/flower_task.py``),
  when Flower is installed (``pip install -e '.[bench]'``), on its own local Ray
  with one CPU per client, as many CPUs as veil's Ray.

It prints seconds per round (the median of the timed rounds, after one warm-up round),
CPU seconds per round and peak resident memory, both of the whole process tree (Ray's
workers, daemons and object store included), and each variant's ratios to ``bare`` and
to ``flower`` measured in the same run. On a machine shared with other jobs, wall
time favours the variants with several processes (the scheduler gives each its
share); CPU time counts the work each variant did. With ``--repeat N`` every
variant runs N times, interleaved, and the best of each column is kept.

    python benchmarks/scale.py [--clients 100 1000 10000] [--rounds 5] [--repeat 1]
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

VARIANTS = ("bare", "simulation", "ray", "flower")
HERE = Path(__file__).resolve().parent
# Printed columns: wall seconds per round, CPU seconds per round (the whole process
# tree: on a shared machine, work done rather than time waited), peak memory.
COLUMNS = (("seconds", 1, 2), ("cpu_seconds", 1, 2), ("peak_bytes", 2**20, 0))
HEADS = ("s/round", "CPU s", "peak MB")
LR, BATCH = 0.1, 10


def _tree(root: int) -> tuple[int, float]:
    """Resident bytes and CPU seconds (user + system) of ``root`` and all its live
    descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    cpu: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            statm = (entry / "statm").read_text().split()
        except OSError:
            continue
        pid, ppid = int(entry.name), int(fields[1])
        children.setdefault(ppid, []).append(pid)
        rss[pid] = int(statm[1]) * os.sysconf("SC_PAGE_SIZE")
        cpu[pid] = (int(fields[11]) + int(fields[12])) / tick
    total, seconds, stack = 0, 0.0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        seconds += cpu.get(pid, 0.0)
        stack.extend(children.get(pid, []))
    return total, seconds


def _tree_rss(root: int) -> int:
    return _tree(root)[0]


def tree_cpu() -> float:
    """CPU seconds used so far by this process and its live descendants."""
    return _tree(os.getpid())[1]


class PeakSampler(threading.Thread):
    """Samples the process tree's resident memory every 0.5 s; keeps the peak.

    The process's own peak (``ru_maxrss``) is exact; sampling adds what child
    processes (Ray's workers and object store) hold.
    """

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, _tree_rss(os.getpid()))
            self._done.wait(0.5)

    def stop(self) -> int:
        self._done.set()
        self.join()
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return max(self.peak, _tree_rss(os.getpid()), own)


def _bare_round(model, state, x, y, parts, chosen, rnd):  # type: ignore[no-untyped-def]
    from bare_loop import local_sgd, snapshot, weighted_mean

    new_states, sizes = [], []
    for k in chosen:
        g = torch.Generator().manual_seed(rnd * 1_000_003 + int(k))
        cx, cy = x[parts[k]], y[parts[k]]
        local_sgd(model, state, cx, cy, lr=LR, epochs=1, batch=BATCH, generator=g)
        new_states.append(snapshot(model))
        sizes.append(len(cy))
    return weighted_mean(new_states, sizes)


def _mark() -> tuple[float, float]:
    """Wall-clock and CPU seconds (this process tree) now."""
    return time.perf_counter(), tree_cpu()


def _report(marks: list[tuple[float, float]], peak: int) -> None:
    """Print the median wall and CPU seconds of the rounds after the first."""
    rounds = list(itertools.pairwise(marks))[1:]
    wall = statistics.median(b[0] - a[0] for a, b in rounds)
    cpu = statistics.median(b[1] - a[1] for a, b in rounds)
    print(json.dumps({"seconds": wall, "cpu_seconds": cpu, "peak_bytes": peak}))


def child(
    variant: str, clients: int, per_round: int, rounds: int, threads: int
) -> None:
    """Run one variant in this process and print one JSON line."""
    torch.set_num_threads(threads)
    from veil.data import iid, load_mnist
    from veil.learning import FedAvg, SGDTrainer
    from veil.models import build_model

    sampler = PeakSampler()
    sampler.start()
    if variant == "flower":
        from flower_task import run_flower

        marks = run_flower(clients, per_round, rounds + 1, os.cpu_count() or 1, _mark)
        _report(marks, sampler.stop())
        return
    torch.manual_seed(0)
    data = load_mnist()
    parts = iid(len(data.train), clients, np.random.default_rng(0))
    model_fn = build_model
    marks = [_mark()]
    if variant == "bare":
        model = build_model("tanh-cnn")
        state = model.state_dict()
        parts_t = [torch.as_tensor(p) for p in parts]
        rng = np.random.default_rng(1)
        for rnd in range(rounds + 1):
            chosen = sorted(rng.choice(clients, per_round, replace=False))
            state = _bare_round(
                model, state, data.train.x, data.train.y, parts_t, chosen, rnd
            )
            marks.append(_mark())
    else:
        import functools

        from veil.runtime import RayRuntime, SimulationRuntime

        fn = functools.partial(model_fn, "tanh-cnn")
        runtime = (
            SimulationRuntime(fn, data.train, parts)
            if variant == "simulation"
            else RayRuntime(fn, data.train, parts)
        )
        algorithm = FedAvg(
            build_model("tanh-cnn").state_dict(),
            clients,
            per_round / clients,
            SGDTrainer(LR, 1, BATCH),
        )
        marks = [_mark()]  # from here on, only rounds
        for rnd in range(1, rounds + 2):
            runtime.run_round(algorithm, rnd)
            marks.append(_mark())
    _report(marks, sampler.stop())
    if variant == "ray":
        runtime.shutdown()  # type: ignore[union-attr]


def measure(
    variant: str, clients: int, per_round: int, rounds: int, threads: int
) -> dict:
    command = [sys.executable, __file__, "--child", variant, str(clients)]
    command += [str(per_round), "--rounds", str(rounds), "--threads", str(threads)]
    # Flower's Ray actors import flower_task from this folder.
    path = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "FLWR_TELEMETRY_ENABLED": "0"}
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{variant} at {clients} clients failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def best_of(
    variants: list[str], clients: int, per_round: int, args: argparse.Namespace
) -> dict[str, dict]:
    """Each variant ``args.repeat`` times, interleaved: best time, lowest peak."""
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(args.repeat):
        for v in variants:
            runs[v].append(measure(v, clients, per_round, args.rounds, args.threads))
    keys = ("seconds", "cpu_seconds", "peak_bytes")
    return {v: {k: min(r[k] for r in rs) for k in keys} for v, rs in runs.items()}


def _ratio(a: dict | None, b: dict | None, key: str) -> float:
    return a[key] / b[key] if a and b else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per process/task"
    )
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--repeat", type=int, default=1, help="runs per variant")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        variant, clients, per_round = args.child
        child(variant, int(clients), int(per_round), args.rounds, args.threads)
        return

    variants = list(args.variants)
    if "flower" in variants and importlib.util.find_spec("flwr") is None:
        print("flower: not installed (pip install -e '.[bench]'); left out")
        variants.remove("flower")
    print(
        f"tanh-cnn, full MNIST, E=1, B={BATCH}, {os.cpu_count()} CPUs, "
        f"{args.threads} torch thread(s) per process or Ray task, "
        f"best of {args.repeat}, load average {os.getloadavg()[0]:.1f} at start"
    )
    print(
        f"{'clients':>8}{'per round':>10} {'variant':<11}"
        + "".join(f"{h:>9}{'x bare':>8}{'x flower':>9}" for h in HEADS)
    )
    for clients in args.clients:
        per_round = min(100, max(10, clients // 100))
        rows = best_of(variants, clients, per_round, args)
        base, flower = rows.get("bare"), rows.get("flower")
        for v, r in rows.items():
            cells = [f"{clients:>8}{per_round:>10} {v:<11}"]
            for key, scale, digits in COLUMNS:
                cells.append(f"{r[key] / scale:>9.{digits}f}")
                cells.append(f"{_ratio(r, base, key):>8.2f}")
                cells.append(f"{_ratio(r, flower, key):>9.2f}")
            print("".join(cells), flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
