"""The DSSGD parameter server's durable state: turns, global parameters, counts.

The network's DSSGD service (:mod:`veil.network.dssgd`) keeps everything it must not
lose in ``STATE/dssgd.sqlite`` (WAL mode), beside the enrolment database of
:class:`~veil.network.store.StateStore`:

- ``turns``: every turn granted, one row each: the client, its round and seed, the
  version it downloaded at, the encoded download (kept until the turn ends, so a
  retried download gets the same bytes), and how it ended (``granted``,
  ``applied`` or ``expired``) with its staleness, byte counts and loss;
- ``state``: one row, the global parameters and update counts (safetensors bytes)
  and the version (uploads applied). It is replaced **in the same transaction**
  that marks a turn applied and appends the upload's privacy events, so a server
  killed at any moment restarts with every accepted upload and nothing else;
- ``seen``: per client, the update counts as of its last download (θd < 1), written
  in the transaction that grants the turn;
- ``ledger``: the privacy events of each accepted DP upload, by client.

``synchronous = NORMAL``, as in :class:`~veil.network.store.StateStore`: a committed
transaction survives the process being killed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save

from veil.errors import ConfigError
from veil.network.store import SQLiteDatabase

__all__ = ["STATE_FORMAT", "TurnRow", "TurnStore"]

#: ``format`` metadata of the stored parameters and counts.
STATE_FORMAT = "veil.dssgd-state/1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS turns (
    turn INTEGER PRIMARY KEY,
    client_id INTEGER NOT NULL,
    round INTEGER NOT NULL,
    slot INTEGER,
    seed INTEGER NOT NULL,
    base_version INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('granted', 'applied', 'expired')),
    granted_at REAL NOT NULL,
    download BLOB,
    bytes_down INTEGER NOT NULL,
    applied_version INTEGER,
    staleness INTEGER,
    uploaded INTEGER,
    bytes_up INTEGER,
    loss REAL,
    over_budget INTEGER,
    metrics TEXT,
    ended_at REAL
);
CREATE TABLE IF NOT EXISTS state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL,
    tensors BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS seen (
    client_id INTEGER PRIMARY KEY,
    counts BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    turn INTEGER NOT NULL,
    client_id INTEGER NOT NULL,
    event TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class TurnRow:
    """A turn as stored (``None`` for what an unfinished turn does not have yet).

    Attributes:
        turn: the turn's number, from 0, in the order turns were granted.
        client_id: the client whose turn it is.
        round: the round it belongs to (the seed's round).
        slot: its position in the schedule of a synchronous order (``None`` for
            ``async``).
        seed: the turn's seed (:func:`~veil.learning.dssgd.turn_seed`).
        base_version: uploads applied when the client downloaded.
        status: ``"granted"``, ``"applied"`` or ``"expired"``.
        download: the encoded download (granted turns only).
        bytes_down: its length in bytes.
        applied_version: the server's version just before the upload was applied.
        staleness: uploads applied by others between download and upload.
        uploaded: entries in the upload.
        bytes_up: length of the upload in bytes.
        loss: the training loss the device reported.
        over_budget: the device's privacy budget stopped its upload.
    """

    turn: int
    client_id: int
    round: int
    slot: int | None
    seed: int
    base_version: int
    status: str
    download: bytes | None
    bytes_down: int
    applied_version: int | None
    staleness: int | None
    uploaded: int | None
    bytes_up: int | None
    loss: float | None
    over_budget: bool | None


class TurnStore(SQLiteDatabase):
    """``STATE/dssgd.sqlite``: the DSSGD service's turns, state and ledger.

    Args:
        folder: the server's state folder (created).
        synchronous: SQLite's ``synchronous``, ``"NORMAL"`` or ``"FULL"``.

    Thread-safe: one connection under a lock, one transaction per write.
    """

    def __init__(self, folder: str | Path, synchronous: str = "NORMAL") -> None:
        self.check_synchronous(synchronous)
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._connect(self.folder / "dssgd.sqlite", synchronous, _SCHEMA)

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    # --- the global state ------------------------------------------------------
    def write_initial(self, parameters: torch.Tensor) -> None:
        """Store version 0 (``parameters``, zero counts) unless a state exists."""
        counts = torch.zeros(parameters.numel(), dtype=torch.int64)
        with self._transaction() as db:
            found = db.execute("SELECT COUNT(*) FROM state").fetchone()[0]
            if not found:
                db.execute(
                    "INSERT INTO state VALUES (1, 0, ?)",
                    (_state_bytes(parameters, counts, 0),),
                )

    def read_state(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The stored parameters (float32), counts (int64) and version."""
        rows = self._query("SELECT version, tensors FROM state WHERE id = 1")
        if not rows:
            raise ConfigError(f"{self.folder}/dssgd.sqlite holds no DSSGD state")
        version, blob = rows[0]
        tensors = load(blob)
        return tensors["parameters"], tensors["counts"], int(version)

    def seen(self) -> dict[int, torch.Tensor]:
        """Every client's counts as of its last download."""
        rows = self._query("SELECT client_id, counts FROM seen")
        return {int(k): load(blob)["seen"] for k, blob in rows}

    # --- turns -------------------------------------------------------------------
    def grant(
        self,
        row: TurnRow,
        seen: torch.Tensor | None,
    ) -> None:
        """Record a granted turn and the client's download counts, together."""
        with self._transaction() as db:
            db.execute(
                "INSERT INTO turns (turn, client_id, round, slot, seed, base_version, "
                "status, granted_at, download, bytes_down) "
                "VALUES (?, ?, ?, ?, ?, ?, 'granted', ?, ?, ?)",
                (
                    row.turn,
                    row.client_id,
                    row.round,
                    row.slot,
                    row.seed,
                    row.base_version,
                    time.time(),
                    row.download,
                    row.bytes_down,
                ),
            )
            if seen is not None:
                db.execute(
                    "INSERT OR REPLACE INTO seen VALUES (?, ?)",
                    (row.client_id, save({"seen": seen.contiguous()})),
                )

    def skip(self, row: TurnRow) -> None:
        """Record a synchronous turn whose client never asked for it, as expired."""
        with self._transaction() as db:
            db.execute(
                "INSERT INTO turns (turn, client_id, round, slot, seed, base_version, "
                "status, granted_at, bytes_down, ended_at) "
                "VALUES (?, ?, ?, ?, ?, ?, 'expired', ?, 0, ?)",
                (
                    row.turn,
                    row.client_id,
                    row.round,
                    row.slot,
                    row.seed,
                    row.base_version,
                    time.time(),
                    time.time(),
                ),
            )

    def expire(self, turn: int) -> None:
        """Mark a granted turn expired (its upload will be refused)."""
        with self._transaction() as db:
            db.execute(
                "UPDATE turns SET status = 'expired', download = NULL, ended_at = ? "
                "WHERE turn = ? AND status = 'granted'",
                (time.time(), turn),
            )

    def apply(
        self,
        row: TurnRow,
        metrics: dict[str, float],
        parameters: torch.Tensor,
        counts: torch.Tensor,
        version: int,
        events: list[dict[str, Any]],
    ) -> None:
        """In one transaction: mark the turn applied, replace the global state by
        ``parameters``, ``counts`` and ``version``, and append the upload's privacy
        events."""
        state = _state_bytes(parameters, counts, version)
        with self._transaction() as db:
            db.execute(
                "UPDATE turns SET status = 'applied', download = NULL, "
                "applied_version = ?, staleness = ?, uploaded = ?, bytes_up = ?, "
                "loss = ?, over_budget = ?, metrics = ?, ended_at = ? "
                "WHERE turn = ? AND status = 'granted'",
                (
                    row.applied_version,
                    row.staleness,
                    row.uploaded,
                    row.bytes_up,
                    row.loss,
                    int(bool(row.over_budget)),
                    json.dumps(metrics),
                    time.time(),
                    row.turn,
                ),
            )
            db.execute("UPDATE state SET version = ?, tensors = ?", (version, state))
            db.executemany(
                "INSERT INTO ledger (turn, client_id, event) VALUES (?, ?, ?)",
                [(row.turn, row.client_id, json.dumps(e)) for e in events],
            )

    def turns(self) -> list[TurnRow]:
        """Every turn, in the order granted."""
        rows = self._query(
            "SELECT turn, client_id, round, slot, seed, base_version, status, "
            "download, bytes_down, applied_version, staleness, uploaded, bytes_up, "
            "loss, over_budget FROM turns ORDER BY turn"
        )
        return [_row(r) for r in rows]

    def ledger(self) -> list[tuple[int, dict[str, Any]]]:
        """Every privacy event recorded, oldest first, with its client id."""
        rows = self._query("SELECT client_id, event FROM ledger ORDER BY id")
        return [(int(k), json.loads(e)) for k, e in rows]


def _row(r: tuple[Any, ...]) -> TurnRow:
    over_budget = None if r[14] is None else bool(r[14])
    return TurnRow(
        int(r[0]),
        int(r[1]),
        int(r[2]),
        r[3],
        int(r[4]),
        int(r[5]),
        str(r[6]),
        r[7],
        int(r[8]),
        r[9],
        r[10],
        r[11],
        r[12],
        r[13],
        over_budget,
    )


def _state_bytes(parameters: torch.Tensor, counts: torch.Tensor, version: int) -> bytes:
    tensors = {
        "parameters": parameters.to(torch.float32).contiguous(),
        "counts": counts.to(torch.int64).contiguous(),
    }
    return save(tensors, metadata={"format": STATE_FORMAT, "version": str(version)})
