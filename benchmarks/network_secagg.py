"""What secure aggregation costs over the network runtime: time and bytes per round
against plain FedAvg, over loopback HTTP, in the same run.

Each variant runs the same config through the runner with ``runtime = "network"``: a
server on 127.0.0.1 (uvicorn in this process) and ``--devices`` ``veil join``
processes sharing the clients. Variants: ``plain`` (FedAvg, updates uploaded as
safetensors), ``secagg`` (full graph) and ``secagg+`` (``neighbours = "auto"``),
both with 32-bit inputs. Per round, from the runner's metrics: wall seconds from the
round's opening to its aggregation (training included: the devices train inside the
round in every variant), bytes the clients sent (updates, or every protocol message
including the masked vectors) and received (model downloads, plus every protocol
message fetched). Rounds are run in the order plain, secagg, secagg+, ``--repeat``
times, interleaved, and the median per variant is printed.

    python benchmarks/network_secagg.py --dataset tuandromd --rounds 3
    python benchmarks/network_secagg.py --dataset mnist --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from veil.experiment import parse_config, run_experiment

MODELS = {"mnist": "2nn", "tuandromd": "tuandromd-mlp"}

CONFIG = """
name = "network-secagg-bench"
seed = 0
methods = ["fedavg"]
runtime = "network"
[data]
dataset = "{dataset}"
num_clients = {clients}
[model]
name = "{model}"
[local]
lr = 0.1
epochs = 1
batch_size = 10
[fedavg]
rounds = {rounds}
client_fraction = {fraction}
secure_aggregation = {secure}
[secagg]
neighbours = "{neighbours}"
bits = 32
clip_range = 0.5
step_timeout = 120
[network]
round_timeout = 600
devices = {devices}
"""

VARIANTS = {
    "plain": ("false", "full"),
    "secagg": ("true", "full"),
    "secagg+": ("true", "auto"),
}


def run(variant: str, args: argparse.Namespace, folder: Path) -> list[dict[str, Any]]:
    """The per-round metrics of one variant's run."""
    secure, neighbours = VARIANTS[variant]
    text = CONFIG.format(
        dataset=args.dataset,
        model=MODELS[args.dataset],
        clients=args.clients,
        rounds=args.rounds,
        fraction=args.fraction,
        secure=secure,
        neighbours=neighbours,
        devices=args.devices,
    )
    config = parse_config(tomllib.loads(text))
    out = run_experiment(config, run_dir=folder / variant, progress=False)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if '"round"' in x]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=sorted(MODELS), default="tuandromd")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()

    rows: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="veil-bench-") as tmp:
        for i in range(args.repeat):
            for variant in VARIANTS:
                rows[variant] += run(variant, args, Path(tmp) / str(i))

    base = {k: statistics.median(r[k] for r in rows["plain"]) for k in ("seconds",
            "bytes_up", "bytes_down")}  # fmt: skip
    print(
        f"{args.dataset}, {args.clients} clients, {args.fraction:g} per round, "
        f"{args.devices} device processes, {len(rows['plain'])} rounds per variant"
    )
    print(
        f"{'variant':8} {'s/round':>8} {'x plain':>8} {'up B/round':>12} "
        f"{'x plain':>8} {'down B/round':>13} {'x plain':>8} {'clients':>7}"
    )
    for variant, got in rows.items():
        med = {k: statistics.median(r[k] for r in got) for k in base}
        clients = statistics.median(r["clients"] for r in got)
        x = {k: med[k] / base[k] for k in base}
        print(
            f"{variant:8} {med['seconds']:8.2f} {x['seconds']:8.2f} "
            f"{med['bytes_up']:12.0f} {x['bytes_up']:8.3f} "
            f"{med['bytes_down']:13.0f} {x['bytes_down']:8.3f} {clients:7.0f}"
        )


if __name__ == "__main__":
    main()
