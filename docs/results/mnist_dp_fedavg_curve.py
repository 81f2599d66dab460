"""Plot the Geyer et al. (2017) curve from the MNIST DP-FedAvg run reports.

Reads ``docs/results/mnist-dp-fedavg-{100,1000,6000}[-tanhcnn]/metrics.jsonl`` (each
holds non-private FedAvg and DP-FedAvg of one run; the suffix marks the tanh CNN,
without it the 2NN) and draws the final test accuracy of both methods against the
number of clients, one line per model and method; a missing run is left out. Run
from the repository root:
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


MODELS = (("", "2NN", "tab:blue"), ("-tanhcnn", "tanh CNN", "tab:red"))


def final_accuracy(clients: int, suffix: str = "") -> dict[str, float]:
    """The last logged accuracy of each method in the run over ``clients``."""
    last: dict[str, float] = {}
    path = ROOT / f"mnist-dp-fedavg-{clients}{suffix}" / "metrics.jsonl"
    if not path.exists():
        return last
    for line in path.read_text().splitlines():
        record = json.loads(line)
        last[record["method"]] = record["accuracy"]
    return last


def main() -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    methods = (("fedavg", "FedAvg (no DP)", "--"), ("dp-fedavg", "DP-FedAvg", "-"))
    for suffix, model, colour in MODELS:
        finals = {n: final_accuracy(n, suffix) for n in CLIENTS}
        for method, label, style in methods:
            points = [(n, 100 * f[method]) for n, f in finals.items() if method in f]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(
                    xs, ys, style, color=colour, marker="o", label=f"{model}, {label}"
                )
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
