"""The server's durable state: one SQLite database, the update files and the
checkpoint files.

Everything the federated server must not lose lives here, so that a server killed at
any moment (SIGKILL, power cut of the process) and restarted resumes where it was:

- ``clients``: enrolled clients, each with the SHA-256 of its token (the token
  itself is never stored) and when it was revoked;
- ``rounds``: every round opened, with its tasks, deadline and outcome
  (``open``, ``aggregated`` or ``failed``), and the checkpoint it produced;
- ``updates``: every accepted update: its metadata and the SHA-256 of its tensors,
  which are in ``updates/round-NNNNNN/`` as the safetensors bytes the device sent;
- ``ledger``: the privacy events released, one row per aggregated round, written in
  the same transaction that marks the round aggregated;
- ``meta``: the admin token's hash and the run's identity (method, config digest).

Updates are written by one writer thread that commits them in groups: each update's
file is written first, then the rows of every update waiting at that moment are
inserted in one transaction, and only when it has committed is each waiting upload
told that it is stored, so an answer of 201 means the update is on disk. A file
without a committed row (the process died in between) is never read. Keeping the
tensors out of SQLite writes them once instead of twice (WAL, then the database)
and makes dropping them after aggregation a matter of deleting a folder.

The global model is checkpointed every round as safetensors: written to a temporary
file, flushed to disk, then renamed over the final name (``os.replace`` is atomic),
*before* the transaction that points the round at it commits. A crash between the
two leaves an unreferenced file that the next aggregation overwrites.

Durability, with ``synchronous = "NORMAL"`` (the default: the database in WAL mode,
update files written but not flushed): a committed transaction and the files it
points at survive the process being killed, since they are in the operating
system's cache. After an operating-system crash or power loss the last transactions
may be rolled back, and an update whose file did not reach the disk whole is found
by its SHA-256 when read and dropped, as if it had never been received. With
``synchronous = "FULL"`` every update file and its folder are flushed to disk
before the transaction that records them, which is itself flushed, so an accepted
update survives power loss too, at some cost in uploads per second.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save

from veil.errors import ConfigError
from veil.learning._types import StateDict

__all__ = [
    "AcceptedUpdate",
    "RoundRow",
    "SQLiteDatabase",
    "StateStore",
    "hash_token",
]

logger = logging.getLogger(__name__)

# Most updates the writer thread commits in one transaction.
_MAX_GROUP = 256

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS clients (
    client_id INTEGER PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE,
    enrolled_at REAL NOT NULL,
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN ('open', 'aggregated', 'failed')),
    tasks TEXT NOT NULL,
    opened_at REAL NOT NULL,
    deadline REAL NOT NULL,
    closed_at REAL,
    reason TEXT,
    checkpoint TEXT
);
CREATE TABLE IF NOT EXISTS updates (
    round INTEGER NOT NULL,
    client_id INTEGER NOT NULL,
    num_examples INTEGER NOT NULL,
    loss REAL NOT NULL,
    metrics TEXT NOT NULL,
    tensors BLOB,
    size INTEGER NOT NULL,
    received_at REAL NOT NULL,
    sha256 TEXT,
    PRIMARY KEY (round, client_id)
);
CREATE TABLE IF NOT EXISTS ledger (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    round INTEGER NOT NULL,
    event TEXT NOT NULL,
    recorded_at REAL NOT NULL
);
"""


def hash_token(token: str) -> str:
    """The SHA-256 (hex) under which a token is stored and looked up."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class RoundRow:
    """A round as stored.

    Attributes:
        round: the round number, from 1.
        status: ``"open"``, ``"aggregated"`` or ``"failed"``.
        tasks: the round's tasks as JSON-able dicts (client id, seed, settings).
        deadline: when the round closes, seconds since the epoch.
        reason: why a failed round failed (``None`` otherwise).
        checkpoint: file name of the model the round produced (aggregated only).
    """

    round: int
    status: str
    tasks: list[dict[str, Any]]
    deadline: float
    reason: str | None
    checkpoint: str | None


@dataclass(frozen=True)
class AcceptedUpdate:
    """An accepted update (tensors as safetensors bytes, empty once its round
    was aggregated)."""

    round: int
    client_id: int
    num_examples: int
    loss: float
    metrics: dict[str, float]
    tensors: bytes


class SQLiteDatabase:
    """One SQLite file in WAL mode, shared by threads: one connection under a lock,
    each write one transaction (:meth:`_transaction`). The state stores of the
    federated server and of DSSGD's parameter server are built on it."""

    _lock: threading.Lock
    _db: sqlite3.Connection

    @staticmethod
    def check_synchronous(synchronous: str) -> None:
        """Refuse a ``synchronous`` setting veil does not offer."""
        if synchronous not in ("NORMAL", "FULL"):
            raise ConfigError(
                f"synchronous must be 'NORMAL' or 'FULL', got {synchronous!r}"
            )

    def _connect(self, path: Path, synchronous: str, schema: str) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute(f"PRAGMA synchronous = {synchronous}")
        self._db.executescript(schema)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()


class StateStore(SQLiteDatabase):
    """The SQLite database and checkpoint folder of one server.

    Args:
        folder: where ``state.sqlite`` and ``checkpoints/`` live (created).
        synchronous: SQLite's ``synchronous`` setting, ``"NORMAL"`` (default:
            durable against a killed process) or ``"FULL"`` (also against power
            loss).

    Every method is safe to call from several threads: one connection is shared
    under a lock, and each write is one transaction. Updates are stored by a writer
    thread (:meth:`submit_update`), started with the first one.
    """

    def __init__(self, folder: str | Path, synchronous: str = "NORMAL") -> None:
        self.check_synchronous(synchronous)
        self.folder = Path(folder)
        self.checkpoints = self.folder / "checkpoints"
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self.update_files = self.folder / "updates"
        self.update_files.mkdir(exist_ok=True)
        self._full = synchronous == "FULL"
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._writer_lock = threading.Lock()
        self._closed = False
        self._connect(self.folder / "state.sqlite", synchronous, _SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(updates)")}
        if "sha256" not in columns:  # a state folder from before update files
            self._db.execute("ALTER TABLE updates ADD COLUMN sha256 TEXT")

    def close(self) -> None:
        """Store the updates already submitted, stop the writer, close the
        database."""
        with self._writer_lock:
            self._closed = True
            writer = self._writer
        if writer is not None:
            self._queue.put(None)
            writer.join()
        with self._lock:
            self._db.close()

    # meta
    def get_meta(self, key: str) -> str | None:
        """The stored value of ``key``, or ``None``."""
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def set_meta(self, key: str, value: str) -> None:
        """Store ``value`` under ``key`` (replacing any)."""
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # clients
    def enrol(self, client_id: int, token_sha256: str) -> None:
        """Record a newly enrolled client (the caller checked it is free)."""
        with self._transaction() as db:
            db.execute(
                "INSERT INTO clients VALUES (?, ?, ?, NULL)",
                (client_id, token_sha256, time.time()),
            )

    def revoke(self, client_id: int) -> None:
        """Mark ``client_id`` revoked: its token is refused from now on."""
        with self._transaction() as db:
            db.execute(
                "UPDATE clients SET revoked_at = ? WHERE client_id = ?",
                (time.time(), client_id),
            )

    def clients(self) -> dict[str, tuple[int, bool]]:
        """Every client: token hash -> (client id, revoked)."""
        rows = self._query("SELECT token_sha256, client_id, revoked_at FROM clients")
        return {h: (int(k), r is not None) for h, k, r in rows}

    # rounds
    def open_round(
        self, rnd: int, tasks: list[dict[str, Any]], deadline: float
    ) -> None:
        """Record round ``rnd`` as open with its tasks."""
        with self._transaction() as db:
            db.execute(
                "INSERT INTO rounds VALUES (?, 'open', ?, ?, ?, NULL, NULL, NULL)",
                (rnd, json.dumps(tasks), time.time(), deadline),
            )

    def set_deadline(self, rnd: int, deadline: float) -> None:
        """Move the deadline of the open round ``rnd``."""
        with self._transaction() as db:
            db.execute(
                "UPDATE rounds SET deadline = ? WHERE round = ?", (deadline, rnd)
            )

    def rounds(self) -> list[RoundRow]:
        """Every round, oldest first."""
        rows = self._query(
            "SELECT round, status, tasks, deadline, reason, checkpoint FROM rounds "
            "ORDER BY round"
        )
        return [RoundRow(r, s, json.loads(t), d, e, c) for r, s, t, d, e, c in rows]

    def fail_round(self, rnd: int, reason: str) -> None:
        """Mark round ``rnd`` failed (too few results by its deadline)."""
        with self._transaction() as db:
            db.execute(
                "UPDATE rounds SET status = 'failed', closed_at = ?, reason = ? "
                "WHERE round = ?",
                (time.time(), reason, rnd),
            )

    def finish_round(
        self, rnd: int, checkpoint: str, events: list[dict[str, Any]]
    ) -> None:
        """Mark round ``rnd`` aggregated, pointing at ``checkpoint``, and append the
        privacy events it released, in one transaction. The round's update tensors
        are dropped (their rows stay, as the record of who contributed)."""
        now = time.time()
        with self._transaction() as db:
            db.execute(
                "UPDATE rounds SET status = 'aggregated', closed_at = ?, "
                "checkpoint = ? WHERE round = ?",
                (now, checkpoint, rnd),
            )
            db.executemany(
                "INSERT INTO ledger (round, event, recorded_at) VALUES (?, ?, ?)",
                [(rnd, json.dumps(e), now) for e in events],
            )
            db.execute(
                "UPDATE updates SET tensors = NULL, sha256 = NULL WHERE round = ?",
                (rnd,),
            )
        # The files are no longer read: delete them without holding up the round.
        threading.Thread(
            target=shutil.rmtree, args=(self._round_folder(rnd), True), daemon=True
        ).start()

    # updates
    def add_update(self, update: AcceptedUpdate) -> None:
        """Store an accepted update; return once it is committed."""
        self.submit_update(update).result()

    def submit_update(self, update: AcceptedUpdate) -> Future[None]:
        """Hand an accepted update to the writer thread. The future is done once
        the update is committed (its file written, its row in a committed
        transaction), or holds the error that stopped it (nothing stored then).

        Concurrent submissions are committed together, one transaction for all the
        updates waiting when the writer gets to them (group commit).
        """
        job = _Job(update, Future())
        with self._writer_lock:
            if self._closed:
                raise RuntimeError("the state store is closed")
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._write_updates, name="veil-update-writer", daemon=True
                )
                self._writer.start()
            self._queue.put(job)
        return job.done

    def _write_updates(self) -> None:
        """The writer thread: commit the waiting updates, group by group."""
        while True:
            first = self._queue.get()
            if first is None:
                return
            group, stop = [first], False
            while len(group) < _MAX_GROUP and not self._queue.empty():
                job = self._queue.get()
                if job is None:
                    stop = True
                    break
                group.append(job)
            self._commit_group(group)
            if stop:
                return

    def _commit_group(self, group: list[_Job]) -> None:
        try:
            self._store_updates([job.update for job in group])
        except Exception as exc:
            if len(group) > 1:  # nothing was committed: find which one fails
                for job in group:
                    self._commit_group([job])
            else:
                group[0].done.set_exception(exc)
            return
        for job in group:
            job.done.set_result(None)

    def _store_updates(self, updates: list[AcceptedUpdate]) -> None:
        """Write the updates' files, then their rows in one transaction."""
        rows, folders = [], set()
        for u in updates:
            digest = hashlib.sha256(u.tensors).hexdigest()
            path = self._update_path(u.round, u.client_id, digest)
            if path.parent not in folders and not path.parent.exists():
                path.parent.mkdir(exist_ok=True)
                if self._full:
                    _fsync_dir(path.parent.parent)
            folders.add(path.parent)
            with open(path, "wb") as f:
                f.write(u.tensors)
                if self._full:
                    f.flush()
                    os.fsync(f.fileno())
            rows.append(
                (
                    u.round,
                    u.client_id,
                    u.num_examples,
                    u.loss,
                    json.dumps(u.metrics),
                    len(u.tensors),
                    time.time(),
                    digest,
                )
            )
        if self._full:
            for folder in folders:
                _fsync_dir(folder)
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO updates (round, client_id, num_examples, loss, metrics, "
                "size, received_at, sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    def _round_folder(self, rnd: int) -> Path:
        return self.update_files / f"round-{rnd:06d}"

    def _update_path(self, rnd: int, client_id: int, digest: str) -> Path:
        # The digest in the name: a write that fails to commit never overwrites
        # the file of a committed update.
        name = f"client-{client_id:06d}-{digest}.safetensors"
        return self._round_folder(rnd) / name

    def updates(self, rnd: int) -> list[AcceptedUpdate]:
        """The accepted updates of round ``rnd``, by increasing client id.

        An update whose file is missing or does not match its SHA-256 (it did not
        reach the disk whole before a power loss) is deleted, with a warning, as
        if it had never been received.
        """
        rows = self._query(
            "SELECT client_id, num_examples, loss, metrics, tensors, sha256 "
            "FROM updates WHERE round = ? ORDER BY client_id",
            (rnd,),
        )
        found, lost = [], []
        for k, n, loss, m, blob, digest in rows:
            tensors = blob or b""
            if digest is not None:
                tensors = self._read_update(rnd, k, digest)
                if tensors is None:
                    lost.append(k)
                    continue
            found.append(AcceptedUpdate(rnd, k, n, loss, json.loads(m), tensors))
        if lost:
            logger.warning(
                "round %d: the updates of clients %s did not reach the disk whole "
                "(a power loss?); they are dropped as if never received",
                rnd,
                lost,
            )
            with self._transaction() as db:
                db.executemany(
                    "DELETE FROM updates WHERE round = ? AND client_id = ?",
                    [(rnd, k) for k in lost],
                )
        return found

    def _read_update(self, rnd: int, client_id: int, digest: str) -> bytes | None:
        try:
            data = self._update_path(rnd, client_id, digest).read_bytes()
        except FileNotFoundError:
            return None
        return data if hashlib.sha256(data).hexdigest() == digest else None

    def counts(self) -> dict[str, int]:
        """How many updates were accepted and how many bytes they held."""
        rows = self._query("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM updates")
        return {"updates": int(rows[0][0]), "bytes": int(rows[0][1])}

    # ledger
    def ledger(self) -> list[dict[str, Any]]:
        """Every privacy event released, oldest first."""
        rows = self._query("SELECT event FROM ledger ORDER BY id")
        return [json.loads(e) for (e,) in rows]

    # checkpoints
    def write_checkpoint(
        self, rnd: int, tensors: StateDict, metadata: dict[str, str]
    ) -> str:
        """Write the model of round ``rnd`` atomically; return its file name.

        The bytes go to a temporary file in the same folder, are flushed to disk,
        and the file is renamed over the final name, so a reader (or a restart)
        sees the old file or the new one, never a torn one.
        """
        name = f"round-{rnd:06d}.safetensors"
        data = save(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata
        )
        tmp = self.checkpoints / f".{name}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.checkpoints / name)
        _fsync_dir(self.checkpoints)
        return name

    def read_checkpoint(self, name: str) -> tuple[StateDict, dict[str, str]]:
        """The tensors and metadata of checkpoint ``name``."""
        from safetensors import safe_open

        path = self.checkpoints / name
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata

    def prune_checkpoints(self, keep: str) -> None:
        """Delete every round checkpoint but ``keep`` and the initial one."""
        for path in self.checkpoints.glob("round-*.safetensors"):
            if path.name not in (keep, "round-000000.safetensors"):
                path.unlink(missing_ok=True)


@dataclass(frozen=True)
class _Job:
    update: AcceptedUpdate
    done: Future[None]


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
