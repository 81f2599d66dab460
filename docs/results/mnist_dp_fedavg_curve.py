"""Plot the Geyer et al. (2017) curve from the three MNIST DP-FedAvg run reports.

Reads ``docs/results/mnist-dp-fedavg-{100,1000,6000}/metrics.jsonl`` (each holds
non-private FedAvg and DP-FedAvg of one run) and draws the final test accuracy of
both methods against the number of clients. Run from the repository root:
``.venv/bin/python docs/results/mnist_dp_fedavg_curve.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

__all__ = ["main"]

ROOT = Path("docs/results")
CLIENTS = (100, 1000, 6000)


def final_accuracy(clients: int) -> dict[str, float]:
    """The last logged accuracy of each method in the run over ``clients``."""
    last: dict[str, float] = {}
    path = ROOT / f"mnist-dp-fedavg-{clients}" / "metrics.jsonl"
    for line in path.read_text().splitlines():
        record = json.loads(line)
        last[record["method"]] = record["accuracy"]
    return last


def main() -> None:
    finals = [final_accuracy(n) for n in CLIENTS]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method, label in (("fedavg", "FedAvg (no DP)"), ("dp-fedavg", "DP-FedAvg")):
        values = [100 * f[method] for f in finals if method in f]
        ax.plot(CLIENTS[: len(values)], values, marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("clients (full MNIST spread over them)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("user-level epsilon 8, delta = 0.1 / clients")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(ROOT / "mnist-dp-fedavg-curve.png", dpi=120)


if __name__ == "__main__":
    main()
