"""The run report: ``report.md`` with PNG plots, built from a run directory alone.

The report is rebuilt from ``config.toml`` and ``metrics.jsonl`` (``veil report
RUN_DIR``), so a run can be re-reported after the fact and nothing in it is computed
anywhere else. Methods that communicate every round (FedAvg, ...) are drawn as
accuracy-against-round curves; the baselines (centralized, standalone), whose x-axis
is epochs rather than rounds, as horizontal lines at their final accuracy.
"""

from __future__ import annotations

import json
import tomllib
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from veil.errors import ConfigError
from veil.experiment._attacks import attacks_section
from veil.experiment._dp import read_privacy
from veil.experiment._dssgd import dssgd_section
from veil.experiment.rundir import read_metrics

__all__ = ["summarize", "write_report"]

_LABELS = {
    "central-dp": "Central DP-SGD (pooled data)",
    "fedavg": "FedAvg",
    "dp-fedavg": "DP-FedAvg (user-level DP)",
    "centralized": "Centralized (pooled data)",
    "standalone": "Standalone (each client alone)",
    "dssgd": "DSSGD (selective SGD)",
}


_STOP_REASONS = {
    "budget": "the next step would have exceeded the budget.",
    "refused": "the next round's updates were refused (NaN, Inf or malformed).",
}


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def summarize(
    records: list[dict[str, Any]], target: float | None = None
) -> dict[str, dict[str, Any]]:
    """Per method: final and best accuracy, rounds to ``target``, bytes and seconds."""
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_method[r["method"]].append(r)
    summary = {}
    for method, rows in by_method.items():
        last = rows[-1]
        accs = [r["accuracy"] for r in rows if r["accuracy"] is not None]
        reached = [
            r["round"] for r in rows if target and (r["accuracy"] or 0) >= target
        ]
        summary[method] = {
            "axis": last["axis"],
            "rounds": last["round"],
            "final_accuracy": last["accuracy"],
            "best_accuracy": max(accs) if accs else None,
            "accuracy_min": last.get("accuracy_min"),
            "accuracy_max": last.get("accuracy_max"),
            "rounds_to_target": reached[0] if reached else None,
            "bytes_up": sum(r["bytes_up"] for r in rows),
            "bytes_down": sum(r["bytes_down"] for r in rows),
            "seconds": sum(r["seconds"] for r in rows),
            "clients": last["clients"],
        }
    return summary


def _plot_accuracy(by_method: dict[str, list[dict[str, Any]]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    curves = {m: rows for m, rows in by_method.items() if rows[-1]["axis"] == "round"}
    lines = {m: rows for m, rows in by_method.items() if rows[-1]["axis"] != "round"}
    max_round = max((rows[-1]["round"] for rows in curves.values()), default=1)
    for method, rows in curves.items():
        ax.plot(
            [r["round"] for r in rows],
            [100 * r["accuracy"] for r in rows],
            label=_LABELS.get(method, method),
        )
    for method, rows in lines.items():
        last = rows[-1]
        color = ax.plot(
            [1, max_round],
            [100 * last["accuracy"]] * 2,
            linestyle="--",
            label=f"{_LABELS.get(method, method)}, final",
        )[0].get_color()
        if last.get("accuracy_min") is not None:
            ax.axhspan(
                100 * last["accuracy_min"],
                100 * last["accuracy_max"],
                color=color,
                alpha=0.12,
            )
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_bytes(by_method: dict[str, list[dict[str, Any]]], path: Path) -> bool:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = False
    for method, rows in by_method.items():
        if rows[-1]["axis"] != "round":
            continue
        total, xs, ys = 0, [], []
        for r in rows:
            total += r["bytes_up"] + r["bytes_down"]
            xs.append(r["round"])
            ys.append(total / 1e6)
        ax.plot(xs, ys, label=f"{_LABELS.get(method, method)} (up + down)")
        drawn = True
    raw = by_method.get("centralized")
    if raw and raw[0]["bytes_up"]:
        ax.axhline(
            raw[0]["bytes_up"] / 1e6,
            linestyle="--",
            color="gray",
            label="raw training data (centralized upload)",
        )
        drawn = True
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative MB sent")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    if drawn:
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def _plot_privacy(by_method: dict[str, list[dict[str, Any]]], path: Path) -> bool:
    """Epsilon and the clipping norm against round, for methods that log them."""
    keys = ("epsilon", "clipping_norm")
    curves = {
        m: rows
        for m, rows in by_method.items()
        if rows[-1]["axis"] == "round" and any(r.get(k) for r in rows for k in keys)
    }
    if not curves:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in zip(
        axes, keys, ("epsilon spent", "clipping norm S"), strict=True
    ):
        for method, rows in curves.items():
            points = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, label=_LABELS.get(method, method))
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _numbers(values: list[float]) -> str:
    return ", ".join(f"{v:.4g}" for v in values) or "-"


def _privacy_section(
    privacy: dict[str, dict[str, Any]], by_method: dict[str, list[dict[str, Any]]]
) -> list[str]:
    """The privacy spent by each DP method, from its ledgers."""
    if not privacy:
        return []
    lines = [
        "## Privacy",
        "",
        "| method | protects | epsilon | delta | budget | accountant | relation "
        "| noise multiplier | sample rate | steps |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    notes = []
    for method, p in privacy.items():
        stops = [r for r in by_method.get(method, []) if r.get("stopped")]
        if stops:
            notes.append(
                f"{_LABELS.get(method, method)} stopped at {stops[0]['axis']} "
                f"{stops[0]['round']}: "
                + _STOP_REASONS.get(stops[0]["stopped"], str(stops[0]["stopped"]))
            )
        if p.get("clients_trained") == 0:
            notes.append(f"{_LABELS.get(method, method)}: no client trained.")
            continue
        eps = "inf" if p["epsilon"] is None else f"{p['epsilon']:.3f}"
        protects = p.get("protects", "one example")
        if "trust_model" in p:
            protects += f" ({p['trust_model']} noise)"
        if "worst_client" in p:
            protects = "one example of one client"
            eps += f" (worst client; median {p['median_epsilon']:.3f})"
        budget = p["budget"]
        budget_text = "none" if budget is None else f"epsilon {budget['epsilon']:g}"
        lines.append(
            f"| {_LABELS.get(method, method)} | {protects} | {eps} | {p['delta']:g} "
            f"| {budget_text} | {p['accountant']} | {p['relation']} "
            f"| {_numbers(p['noise_multiplier'])} | {_numbers(p['sample_rate'])} "
            f"| {p['steps']} |"
        )
        if "worst_client" in p:
            notes.append(
                f"{_LABELS.get(method, method)}: {p['clients_trained']} clients "
                "trained, each with its own ledger; steps are the worst client's."
            )
    lines += [
        "",
        "Epsilon is computed from the run's privacy ledgers (`privacy/*.json`) by "
        "`dp-accounting`. *add_or_remove_one*: the guarantee holds between data sets "
        "that differ by adding or removing one record (one client for DP-FedAvg; "
        "*replace_one*: replacing one).",
        "",
        *_trust_notes(privacy),
        *notes,
        "",
    ]
    return lines


def _trust_notes(privacy: dict[str, dict[str, Any]]) -> list[str]:
    notes = {
        "central": "the server adds the noise: the guarantee holds against everyone "
        "who sees the models, not against the server, which sees clipped updates.",
        "distributed": "each sampled client adds a share of the noise, so only the "
        "sum carries all of it: with secure aggregation the guarantee also holds "
        "against the server.",
        "distributed + secure aggregation": "each sampled client adds a share of the "
        "noise and the server learns only the masked sum (secure aggregation): the "
        "guarantee also holds against an honest-but-curious server, except for the "
        "noise it tops up for clients that dropped out.",
    }
    return [
        f"{_LABELS.get(m, m)}: {notes[p['trust_model']]}"
        for m, p in privacy.items()
        if p.get("trust_model") in notes
    ]


#: What the report reads from a run's config.
_REPORT_KEYS = (
    "name",
    "seed",
    "data.dataset",
    "data.partition",
    "data.num_clients",
    "model.name",
)


def _has(table: object, keys: list[str]) -> bool:
    for key in keys:
        if not isinstance(table, dict) or key not in table:
            return False
        table = table[key]
    return True


def _run_config(run_dir: Path) -> dict[str, Any]:
    """The run's ``config.toml``, checked for what the report reads."""
    path = run_dir / "config.toml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory: config.toml is missing")
    fix = "it should be the resolved config `veil run` wrote; restore it from there"
    try:
        config = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML ({exc}); {fix}") from None
    missing = [key for key in _REPORT_KEYS if not _has(config, key.split("."))]
    if missing:
        raise ConfigError(f"{path} lacks {', '.join(missing)}; {fix}")
    return config


def write_report(run_dir: str | Path) -> Path:
    """(Re)build ``report.md``, ``summary.json`` and the plots of a run directory."""
    run_dir = Path(run_dir)
    config = _run_config(run_dir)
    records = read_metrics(run_dir)
    target = config.get("target_accuracy")
    summary = summarize(records, target)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_method[r["method"]].append(r)
    if by_method:
        _plot_accuracy(by_method, run_dir / "accuracy.png")
    has_bytes = bool(by_method) and _plot_bytes(by_method, run_dir / "bytes.png")

    data, model = config["data"], config["model"]
    lines = [
        f"# veil run: {config['name']}",
        "",
        f"Dataset **{data['dataset']}**, split **{data['partition']}** over "
        f"**{data['num_clients']}** clients; model **{model['name']}**; "
        f"seed {config['seed']}.",
        "",
        "## Results",
        "",
        "| method | rounds / epochs | final accuracy | best accuracy | "
        f"rounds to {_pct(target) if target else 'target'} | bytes up | bytes down "
        "| seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method, s in summary.items():
        final = _pct(s["final_accuracy"])
        if s["accuracy_min"] is not None:
            final += f" (min {_pct(s['accuracy_min'])}, max {_pct(s['accuracy_max'])})"
        to_target = s["rounds_to_target"] if s["rounds_to_target"] else "-"
        lines.append(
            f"| {_LABELS.get(method, method)} | {s['rounds']} {s['axis']}s | {final} "
            f"| {_pct(s['best_accuracy'])} | {to_target} | {_fmt_bytes(s['bytes_up'])} "
            f"| {_fmt_bytes(s['bytes_down'])} | {s['seconds']:.1f} |"
        )
    lines += [
        "",
        "Standalone accuracy is the mean over clients, each model evaluated on the "
        "whole test set. Centralized *bytes up* is the size of the pooled training "
        "tensors: the raw data clients would have to hand over.",
        "",
        "## Accuracy",
        "",
        "![test accuracy against round](accuracy.png)",
        "",
    ]
    if has_bytes:
        lines += ["## Communication", "", "![cumulative bytes sent](bytes.png)", ""]
    lines += dssgd_section(by_method)
    if bool(by_method) and _plot_privacy(by_method, run_dir / "privacy.png"):
        lines += [
            "## Privacy over rounds",
            "",
            "![epsilon and clipping norm against round](privacy.png)",
            "",
        ]
    lines += _privacy_section(read_privacy(run_dir), by_method)
    lines += attacks_section(run_dir)
    lines += [
        "## Config",
        "",
        "```toml",
        (run_dir / "config.toml").read_text().rstrip(),
        "```",
        "",
    ]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
