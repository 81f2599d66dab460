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

It prints seconds per round (the median of the timed rounds, after one warm-up round)
and peak resident memory of the whole process tree (Ray's workers and object store
included), and each variant's ratios to ``bare`` and to ``flower`` measured in the
same run. With ``--repeat N`` every variant runs N times, interleaved, and the best
time and lowest peak are kept (the machine may be shared).

    python benchmarks/scale.py [--clients 100 1000 10000] [--rounds 5] [--repeat 1]
"""

from __future__ import annotations

import argparse
import importlib.util
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
import torch.nn.functional as F

VARIANTS = ("bare", "simulation", "ray", "flower")
HERE = Path(__file__).resolve().parent
LR, BATCH = 0.1, 10


def _tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
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
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


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
    new_states, sizes = [], []
    for k in chosen:
        model.load_state_dict(state)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        g = torch.Generator().manual_seed(rnd * 1_000_003 + int(k))
        cx, cy = x[parts[k]], y[parts[k]]
        order = torch.randperm(len(cy), generator=g)
        for s in range(0, len(cy), BATCH):
            idx = order[s : s + BATCH]
            loss = F.cross_entropy(model(cx[idx]), cy[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        new_states.append(
            {n: v.detach().clone() for n, v in model.state_dict().items()}
        )
        sizes.append(len(cy))
    total = sum(sizes)
    return {
        n: sum(s[n] * (m / total) for s, m in zip(new_states, sizes, strict=True))
        for n in state
    }


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

        cpus = os.cpu_count() or 1
        seconds = run_flower(clients, per_round, rounds + 1, cpus)
        peak = sampler.stop()
        print(
            json.dumps({"seconds": statistics.median(seconds[1:]), "peak_bytes": peak})
        )
        return
    torch.manual_seed(0)
    data = load_mnist()
    parts = iid(len(data.train), clients, np.random.default_rng(0))
    model_fn = build_model
    seconds = []
    if variant == "bare":
        model = build_model("tanh-cnn")
        state = model.state_dict()
        parts_t = [torch.as_tensor(p) for p in parts]
        rng = np.random.default_rng(1)
        for rnd in range(rounds + 1):
            chosen = sorted(rng.choice(clients, per_round, replace=False))
            start = time.perf_counter()
            state = _bare_round(
                model, state, data.train.x, data.train.y, parts_t, chosen, rnd
            )
            seconds.append(time.perf_counter() - start)
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
        for rnd in range(1, rounds + 2):
            seconds.append(runtime.run_round(algorithm, rnd).seconds)
    peak = sampler.stop()
    print(json.dumps({"seconds": statistics.median(seconds[1:]), "peak_bytes": peak}))
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
    return {
        v: {
            "seconds": min(r["seconds"] for r in rs),
            "peak_bytes": min(r["peak_bytes"] for r in rs),
        }
        for v, rs in runs.items()
    }


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
        f"{'clients':>8}{'per round':>10} {'variant':<11}{'s/round':>9}"
        f"{'x bare':>8}{'x flower':>9}{'peak MB':>9}{'x bare':>8}{'x flower':>9}"
    )
    for clients in args.clients:
        per_round = min(100, max(10, clients // 100))
        rows = best_of(variants, clients, per_round, args)
        base, flower = rows.get("bare"), rows.get("flower")
        for v, r in rows.items():
            print(
                f"{clients:>8}{per_round:>10} {v:<11}{r['seconds']:>9.2f}"
                f"{_ratio(r, base, 'seconds'):>8.2f}"
                f"{_ratio(r, flower, 'seconds'):>9.2f}"
                f"{r['peak_bytes'] / 2**20:>9.0f}"
                f"{_ratio(r, base, 'peak_bytes'):>8.2f}"
                f"{_ratio(r, flower, 'peak_bytes'):>9.2f}",
                flush=True,
            )
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
