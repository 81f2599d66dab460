"""The report's *Attacks* section, read from ``RUN_DIR/attacks/attacks.json``.

``veil attack RUN_DIR`` (:mod:`veil.attacks.run`) writes that file; this module only
formats it, so building a report never imports :mod:`veil.attacks` and a run without
attacks has no such section.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from veil.errors import ConfigError

__all__ = ["ATTACKS_FORMAT", "attacks_section"]

#: Format tag of ``RUN_DIR/attacks/attacks.json`` (written by ``veil attack``).
ATTACKS_FORMAT = "veil.run-attacks/1"


def _num(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _inversion_lines(inv: dict[str, Any]) -> list[str]:
    lines = [
        "### Gradient inversion (iDLG)",
        "",
        f"Client 0's examples {inv['victims']}, each uploaded alone (batch of one) "
        f"as a first-round update of the {inv['model']} at the run's "
        "initial weights; the attacker knows the model and mirrors the client's "
        "loss (and clipping, under DP-SGD).",
        "",
        "| upload | PSNR (dB), mean | PSNR, worst | SSIM | labels recovered |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, row in inv["views"].items():
        lines.append(
            f"| {name} | {_num(row['psnr'], 1)} | {_num(row['psnr_min'], 1)} "
            f"| {_num(row['ssim'])} | {100 * row['label_accuracy']:.0f}% |"
        )
    lines.append("")
    if inv.get("figure"):
        lines += [f"![reconstructions]({inv['figure']})", ""]
    return lines


def _membership_lines(mem: dict[str, Any]) -> list[str]:
    lines = [
        "### Membership inference",
        "",
        f"{mem['members']} training examples (members) against {mem['non_members']} "
        "test examples (non-members). Advantage is the largest TPR - FPR; the "
        "bounds are what the method's (epsilon, delta) allows any attack.",
        "",
        "| model | attack | AUC | advantage | bound | TPR at FPR 0.1% | bound "
        "| epsilon |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method, reports in mem["models"].items():
        for r in reports:
            m = r["metrics"]
            eps = "inf" if r["epsilon"] is None else f"{r['epsilon']:.3g}"
            lines.append(
                f"| {method} | {r['attack']} | {m['auc']:.3f} | {m['advantage']:.3f} "
                f"| {r['advantage_bound']:.3f} | {m['tpr_at_low_fpr']:.4f} "
                f"| {min(1.0, r['tpr_bound']):.4f} | {eps} |"
            )
    lines.append("")
    return lines


def attacks_section(run_dir: Path) -> list[str]:
    """Markdown lines of the attacks section, or none if ``veil attack`` never ran."""
    path = run_dir / "attacks" / "attacks.json"
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    if data.get("format") != ATTACKS_FORMAT:
        raise ConfigError(
            f"{path}: format must be {ATTACKS_FORMAT!r}, got {data.get('format')!r}"
        )
    lines = ["## Attacks", ""]
    if "inversion" in data:
        lines += _inversion_lines(data["inversion"])
    if "membership" in data:
        lines += _membership_lines(data["membership"])
    return lines
