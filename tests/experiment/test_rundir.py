"""The run directory's files: metrics.jsonl stays valid JSON whatever is logged."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from veil.experiment.rundir import MetricsLog, append_record, read_metrics


def test_non_finite_numbers_are_written_as_null(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    written = append_record(
        path, {"round": 3, "loss": math.nan, "train_loss": math.inf, "accuracy": 0.5}
    )
    assert written == {"round": 3, "loss": None, "train_loss": None, "accuracy": 0.5}
    line = path.read_text()
    assert "NaN" not in line and "Infinity" not in line

    # Strict JSON (no NaN constants) reads it back.
    def refuse(name: str) -> None:
        raise ValueError(name)

    assert json.loads(line, parse_constant=refuse) == written
    assert read_metrics(tmp_path) == [written]


def test_metrics_log_appends_and_refuses_incomplete_records(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl")
    record = {
        "method": "fedavg",
        "axis": "round",
        "round": 1,
        "accuracy": 0.9,
        "loss": -math.inf,
        "clients": 10,
        "bytes_up": 1,
        "bytes_down": 2,
        "seconds": 0.1,
    }
    log.log(**record)
    log.log(**{**record, "round": 2, "loss": 0.3})
    rows = read_metrics(tmp_path)
    assert [r["round"] for r in rows] == [1, 2]
    assert [r["loss"] for r in rows] == [None, 0.3]
    with pytest.raises(ValueError, match="missing"):
        log.log(round=3)
    assert len(read_metrics(tmp_path)) == 2
