"""The run directory: everything one ``veil run`` leaves behind.

Layout::

    RUN_DIR/
      config.toml         the resolved config (every default filled in)
      metrics.jsonl       one JSON object per evaluation (see :class:`MetricsLog`)
      models/METHOD.safetensors   the final model of each method
      summary.json        per-method final numbers
      report.md, *.png    the report (rebuilt by ``veil report RUN_DIR``)

Nothing here is pickled: tensors are safetensors, everything else JSON or TOML.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from veil.errors import ConfigError
from veil.learning._types import StateDict

__all__ = ["MetricsLog", "append_record", "new_run_dir", "read_metrics", "save_model"]

#: Keys every metrics record carries.
RECORD_KEYS = (
    "method",
    "axis",
    "round",
    "accuracy",
    "loss",
    "clients",
    "bytes_up",
    "bytes_down",
    "seconds",
)


def new_run_dir(root: str | Path, name: str) -> Path:
    """A fresh ``root/NAME-YYYYmmdd-HHMMSS`` folder (suffixed if it exists)."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{name}-{stamp}"
    path, n = base, 1
    while path.exists():
        path = base.with_name(f"{base.name}-{n}")
        n += 1
    path.mkdir(parents=True)
    return path


class MetricsLog:
    """Appends one JSON line per evaluation to ``metrics.jsonl``, flushed at once.

    A record holds at least :data:`RECORD_KEYS`: ``axis`` is ``"round"`` for methods
    that communicate every round and ``"epoch"`` for the baselines; ``seconds`` is the
    time spent since the previous record of the method; ``bytes_up`` and
    ``bytes_down`` count that interval's traffic.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []

    def log(self, **record: Any) -> None:
        missing = [k for k in RECORD_KEYS if k not in record]
        if missing:
            raise ValueError(f"metrics record is missing {missing}")
        self.records.append(append_record(self.path, record))


def append_record(path: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Append ``record`` to the JSON-lines file ``path`` and return what was
    written: NaN and infinities become ``null``, which JSON can hold (a bare ``NaN``
    is not JSON, and other tools would refuse the whole file)."""
    clean = {k: _json_number(v) for k, v in record.items()}
    with path.open("a") as f:
        f.write(json.dumps(clean, allow_nan=False) + "\n")
    return clean


def _json_number(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``RUN_DIR/metrics.jsonl``."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise ConfigError(f"{run_dir} is not a run directory: {path.name} is missing")
    records = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}, line {i}: not JSON ({exc})") from None
    return records


def save_model(run_dir: Path, method: str, state: StateDict) -> Path:
    """Write a method's final model as ``models/METHOD.safetensors``."""
    folder = run_dir / "models"
    folder.mkdir(exist_ok=True)
    path = folder / f"{method}.safetensors"
    save_file({k: v.detach().contiguous() for k, v in state.items()}, path)
    return path
