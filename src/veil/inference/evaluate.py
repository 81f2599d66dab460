"""``veil infer evaluate``: re-measure a run's accuracies over many noise draws.

``veil infer train`` measures each accuracy on one perturbation of the test set (one
draw of nullification masks and Laplace noise per test input), so a table entry moves
by a few tenths of a point with the draw. :func:`evaluate_run` reads a run directory
back and measures, for every noisily trained cloud part ``noisy-eps<E>``, the plainly
and the noisily trained cloud part at ``E`` on ``draws`` independent perturbations of
the same test inputs (both parts see the same perturbed representations), and the
split model without privacy. It reports mean, standard deviation, smallest and
largest accuracy over the draws and writes them to ``evaluation.json``.

The draws come from seeded streams (the run's seed, then ``draw``), distinct from
the single draw ``veil infer train`` used, so the two measurements are independent.
Nothing here is a query of a device: it is the experimenter's measurement.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import torch
from torch import nn

from veil._seeding import torch_generator
from veil.data import load_dataset
from veil.errors import ConfigError
from veil.inference.artifacts import load_split
from veil.inference.config import load_inference_config
from veil.inference.perturb import Perturbation

__all__ = ["EVALUATION_FORMAT", "evaluate_run", "format_evaluation"]

EVALUATION_FORMAT = "veil.inference-evaluation/1"

# Stream of the evaluation draws (the training run uses 100 with keys 0..4).
_STREAM = 101


def evaluate_run(
    run_dir: Path, draws: int = 5, data_dir: str | Path | None = None
) -> dict[str, Any]:
    """Measure the run's cloud parts on ``draws`` perturbations of the test set.

    Args:
        run_dir: a run directory of ``veil infer train``.
        draws: independent perturbations of the test set, >= 1.
        data_dir: folder of datasets (default: the run's config, then veil's).

    Returns:
        The evaluation (also written to ``run_dir/evaluation.json``).
    """
    if draws < 1:
        raise ConfigError(f"draws must be >= 1, got {draws}")
    config = load_inference_config(run_dir / "config.toml")
    split = load_split(run_dir)
    data = load_dataset(split.spec.dataset, data_dir or config.data.data_dir)
    cap = config.data.max_test or len(data.test)
    x, y = data.test.x[:cap], data.test.y[:cap]
    with torch.no_grad():
        reps = torch.cat(
            [split.device_part(x[i : i + 1000]) for i in range(0, cap, 1000)]
        )
    plain = split.clouds["plain"]
    rows: list[dict[str, Any]] = []
    for name, epsilon in split.spec.clouds.items():
        if epsilon is None:
            continue
        p = split.spec.perturbation(epsilon)
        key = round(epsilon * 1000)
        pairs = [
            _accuracies(
                [plain, split.clouds[name]],
                reps,
                y,
                p,
                torch_generator(config.seed, _STREAM, key, draw),
            )
            for draw in range(draws)
        ]
        rows.append(
            {
                "epsilon": epsilon,
                "plain": _summary([a for a, _ in pairs]),
                "noisy": _summary([b for _, b in pairs]),
            }
        )
    baseline = _accuracies([plain], reps, y, None, torch.Generator())[0]
    result = {
        "format": EVALUATION_FORMAT,
        "dataset": split.spec.dataset,
        "test_examples": cap,
        "draws": draws,
        "baseline_accuracy": baseline,
        "rows": sorted(rows, key=lambda r: r["epsilon"]),
    }
    (run_dir / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


@torch.no_grad()
def _accuracies(
    clouds: list[nn.Module],
    reps: torch.Tensor,
    y: torch.Tensor,
    perturbation: Perturbation | None,
    generator: torch.Generator,
) -> tuple[float, ...]:
    """Accuracy of each cloud part on one perturbation of ``reps`` (shared)."""
    correct = [0] * len(clouds)
    for start in range(0, len(y), 1000):
        r = reps[start : start + 1000]
        if perturbation is not None:
            r = perturbation(r, generator)
        for i, cloud in enumerate(clouds):
            hits = cloud.eval()(r).argmax(1) == y[start : start + 1000]
            correct[i] += int(hits.sum())
    return tuple(c / max(len(y), 1) for c in correct)


def _summary(values: list[float]) -> dict[str, Any]:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {
        "mean": statistics.fmean(values),
        "sd": sd,
        "min": min(values),
        "max": max(values),
        "values": values,
    }


def format_evaluation(result: dict[str, Any]) -> str:
    """A Markdown table of :func:`evaluate_run`'s result (losses in points)."""
    base = result["baseline_accuracy"]
    lines = [
        f"Split model without privacy: {100 * base:.2f}%. Accuracy over "
        f"{result['draws']} perturbations of the {result['test_examples']} test "
        "inputs: mean (sd) [min, max]; loss = baseline - mean, in points.",
        "",
        "| epsilon | plainly trained | plain loses | noisily trained | noisy loses |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in result["rows"]:
        cells = [f"{row['epsilon']:g}"]
        for part in ("plain", "noisy"):
            s = row[part]
            cells.append(
                f"{100 * s['mean']:.2f}% ({100 * s['sd']:.2f}) "
                f"[{100 * s['min']:.2f}, {100 * s['max']:.2f}]"
            )
            cells.append(f"{100 * (base - s['mean']):.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
