"""How much does veil's simulation runtime add to the work it runs?

The same FedAvg run (full MNIST, 100 IID clients, C=0.1, E=1, B=10; ``--clients``
and ``--fraction`` change the population) is timed twice:
through veil (``FedAvg`` + ``SimulationRuntime``, with its validation and byte
counting) and as a bare PyTorch loop written from scratch, doing exactly the same local
steps (same clients, same batch order, same initial weights). The final models are
compared to show the two did the same work; the ratio of times is veil's overhead.
Target: at most 1.10. Wall and CPU seconds (of this process) are both printed: on a
machine shared with other jobs, CPU time is the steadier of the two.

    python benchmarks/simulation_overhead.py [--model cnn] [--rounds 20] [--threads 1]
        [--clients 10000 --fraction 0.01]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from bare_loop import local_sgd, snapshot, weighted_mean

from veil.data import iid, load_mnist
from veil.learning import FedAvg, SGDTrainer
from veil.models import build_model
from veil.runtime import SimulationRuntime

LR, EPOCHS, BATCH = 0.1, 1, 10
NUM_CLIENTS, FRACTION = 100, 0.1  # set from --clients and --fraction


def seed_for(seed: int, *keys: int) -> int:
    # The same derivation as veil's seeding, written out so the loop needs no veil.
    state = np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def bare_fedavg(model_name, init, x, y, parts, rounds, seed):  # type: ignore[no-untyped-def]
    model = build_model(model_name)
    global_state = {k: v.clone() for k, v in init.items()}
    m = max(round(FRACTION * NUM_CLIENTS), 1)
    parts_t = [torch.as_tensor(p) for p in parts]
    for rnd in range(1, rounds + 1):
        rng = np.random.default_rng(np.random.SeedSequence([seed, 2, rnd]))
        chosen = sorted(rng.choice(NUM_CLIENTS, m, replace=False))
        new_states, sizes = [], []
        for k in chosen:
            g = torch.Generator().manual_seed(seed_for(seed, 3, rnd, int(k)))
            cx, cy = x[parts_t[k]], y[parts_t[k]]
            local_sgd(
                model,
                global_state,
                cx,
                cy,
                lr=LR,
                epochs=EPOCHS,
                batch=BATCH,
                generator=g,
            )
            new_states.append(snapshot(model))
            sizes.append(len(cy))
        global_state = weighted_mean(new_states, sizes)
    return global_state


def veil_fedavg(model_name, init, train, parts, rounds, seed):  # type: ignore[no-untyped-def]
    algorithm = FedAvg(
        {k: v.clone() for k, v in init.items()},
        NUM_CLIENTS,
        FRACTION,
        SGDTrainer(LR, EPOCHS, BATCH),
        seed=seed,
    )
    runtime = SimulationRuntime(lambda: build_model(model_name), train, parts)
    for rnd in range(1, rounds + 1):
        runtime.run_round(algorithm, rnd)
    return algorithm.global_state


def main() -> None:
    global NUM_CLIENTS, FRACTION
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="2nn", choices=["2nn", "cnn", "tanh-cnn"])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--clients", type=int, default=NUM_CLIENTS)
    parser.add_argument("--fraction", type=float, default=FRACTION)
    args = parser.parse_args()
    NUM_CLIENTS, FRACTION = args.clients, args.fraction

    if args.threads:
        torch.set_num_threads(args.threads)
    mnist = load_mnist()
    parts = iid(len(mnist.train), NUM_CLIENTS, np.random.default_rng(0))
    torch.manual_seed(0)
    init = build_model(args.model).state_dict()
    seed = 0
    # Warm-up and a check that both do the same work: after one round the models
    # agree to float rounding (over many rounds SGD amplifies those last bits).
    one_bare = bare_fedavg(args.model, init, mnist.train.x, mnist.train.y, parts, 1, 0)
    one_veil = veil_fedavg(args.model, init, mnist.train, parts, 1, 0)
    check = max(float((one_bare[k] - one_veil[k]).abs().max()) for k in init)
    if check > 1e-5:
        raise SystemExit(f"the two loops differ after one round by {check:.2e}")

    times: dict[str, list[float]] = {"bare": [], "veil": []}
    cpu: dict[str, list[float]] = {"bare": [], "veil": []}
    results = {}
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both
        start, start_cpu = time.perf_counter(), time.process_time()
        results["bare"] = bare_fedavg(
            args.model, init, mnist.train.x, mnist.train.y, parts, args.rounds, seed
        )
        times["bare"].append(time.perf_counter() - start)
        cpu["bare"].append(time.process_time() - start_cpu)
        start, start_cpu = time.perf_counter(), time.process_time()
        results["veil"] = veil_fedavg(
            args.model, init, mnist.train, parts, args.rounds, seed
        )
        times["veil"].append(time.perf_counter() - start)
        cpu["veil"].append(time.process_time() - start_cpu)

    diff = max(
        float((results["bare"][k] - results["veil"][k]).abs().max()) for k in init
    )
    bare, veil = min(times["bare"]), min(times["veil"])
    print(
        f"FedAvg, MNIST, model {args.model}, {NUM_CLIENTS} clients, C={FRACTION}, "
        f"E={EPOCHS}, B={BATCH}, {args.rounds} rounds, best of {args.repeats}, "
        f"torch threads {torch.get_num_threads()}"
    )
    bare_cpu, veil_cpu = min(cpu["bare"]), min(cpu["veil"])
    print(f"  bare PyTorch loop : {bare:8.2f} s wall {bare_cpu:8.2f} s CPU")
    print(f"  veil simulation   : {veil:8.2f} s wall {veil_cpu:8.2f} s CPU")
    print(
        f"  ratio veil / bare : {veil / bare:8.3f}   wall {veil_cpu / bare_cpu:8.3f} "
        f"CPU   (target <= 1.10); load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"  max |difference| of the models after 1 round: {check:.1e}, after "
        f"{args.rounds}: {diff:.1e}"
    )


if __name__ == "__main__":
    main()
