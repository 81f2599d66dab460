"""DSSGD's parameter server over the network: turns granted, downloads served,
sparse uploads checked and applied, every change durable.

:class:`DSSGDService` wraps the same :class:`~veil.learning.dssgd.ParameterServer`
the simulation and Ray drive; it adds only what a network needs: who may take a
turn now, the checks on what devices send, and the durable state
(:class:`~veil.network.dssgd_store.TurnStore`). Devices run the client side,
:func:`veil.experiment._dssgd.client_turn`, unchanged. The HTTP app is in
:mod:`veil.network.dssgd_app`.

A turn over the network:

1. ask (``POST /v1/dssgd/turn``): the server decides whose turn it is. In a
   synchronous order (``round_robin``, ``random``) it follows the schedule the
   simulation follows (:func:`~veil.learning.dssgd.turn_order`), one turn at a time;
   in ``async`` any enrolled client without a turn in flight gets one. Granting a
   turn makes its download (``ParameterServer.download`` with the turn's seeded
   generator) and stores it, with the client's download counts, in one transaction;
2. download (``GET /v1/dssgd/turns/{t}/download``): those bytes
   (:func:`~veil.learning.dssgd.encode_sparse`), the same on every retry;
3. upload (``POST /v1/dssgd/turns/{t}/upload``): the sparse change. It is checked
   completely (token, turn, duplicate, size, safetensors header, dtypes, entry
   count, indices, finite values, bound) and only then applied
   (``ParameterServer.apply``); the turn, the new parameters and counts, and under
   DP the upload's privacy events are committed in one transaction.

Rounds only mark when the runner (or ``veil serve``) evaluates: the service grants
no turn beyond :meth:`DSSGDService.release`'s limit, so every round ends at the
same state as in the simulation.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load

from veil._wire import refuse_pickle, safetensors_header
from veil.errors import ConfigError, ServiceError, UpdateError
from veil.learning.dssgd import (
    ORDERS,
    SPARSE_FORMAT,
    DSSGDClient,
    DSSGDSettings,
    ParameterServer,
    SparseVector,
    Upload,
    decode_sparse,
    encode_sparse,
    turn_order,
    turn_seed,
    upload_count,
    upload_events,
)
from veil.network.dssgd_store import TurnRow, TurnStore
from veil.network.enrolment import Enrolment
from veil.network.store import StateStore
from veil.privacy import PrivacyEvent, PrivacyLedger

__all__ = [
    "MAX_WAIT",
    "METHOD",
    "DSSGDServerSettings",
    "DSSGDService",
    "TurnGrant",
    "TurnOutcome",
    "TurnResult",
    "max_upload_bytes",
    "turn_generator",
]

logger = logging.getLogger(__name__)

#: The method name the service announces (``GET /v1/config``).
METHOD = "dssgd"
#: Longest a turn request may wait for a turn, in seconds.
MAX_WAIT = 10.0
# Room for the safetensors header of an upload (names, dtypes, shapes, metadata).
_HEADER_ROOM = 1024


@dataclass(frozen=True)
class DSSGDServerSettings:
    """How the service waits for devices and what it accepts.

    Attributes:
        turn_timeout: seconds, > 0 (default 60). A granted turn not uploaded within
            it expires (its upload is then refused); in a synchronous order a turn
            whose client does not ask for it within it is skipped, so one absent
            device cannot stall the run.
        max_body_bytes: largest upload accepted, in bytes; default: the encoded
            size of ``ceil(θu * P)`` entries plus 1 KiB.
        enrolment_key: when set, enrolling needs it as a bearer token.
    """

    turn_timeout: float = 60.0
    max_body_bytes: int | None = None
    enrolment_key: str | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.turn_timeout) and self.turn_timeout > 0):
            raise ConfigError(f"turn_timeout must be > 0, got {self.turn_timeout}")


@dataclass(frozen=True)
class TurnGrant:
    """A turn as the device receives it (``POST /v1/dssgd/turn``).

    Attributes:
        turn: the turn's number (use it in the download and upload paths).
        round: the round of the turn's seed.
        client_id: whose turn it is.
        seed: the turn's seed: the device seeds its generator with it and draws
            what the server's download drew (:func:`turn_generator`).
        version: uploads applied when the download was made.
        size: P, the number of global parameters.
        download_count: entries in the download.
        download_bytes: length of the encoded download.
        upload_capacity: most entries an upload may hold, ``ceil(θu * P)``.
        seconds_left: until the turn expires.
    """

    turn: int
    round: int
    client_id: int
    seed: int
    version: int
    size: int
    download_count: int
    download_bytes: int
    upload_capacity: int
    seconds_left: float


@dataclass(frozen=True)
class TurnResult:
    """What a device says about its upload (the ``X-Veil-Result`` JSON header)."""

    loss: float
    over_budget: bool
    metrics: dict[str, float]


@dataclass(frozen=True)
class TurnOutcome:
    """An applied upload: its turn, the server's version after it, its staleness."""

    turn: int
    version: int
    staleness: int


@dataclass
class _Grant:
    row: TurnRow
    deadline: float


@dataclass
class _ClientRecord:
    """What the server knows of a client's privacy spending (from its uploads)."""

    ledger: PrivacyLedger | None
    uploads: int = 0
    pure_epsilon: float = 0.0


@dataclass
class _Counters:
    resolved: int = 0  # sync: schedule slots done (applied or skipped); async: applied
    applied: int = 0
    expired: int = 0
    next_turn: int = 0
    turns_of: dict[int, int] = field(default_factory=dict)  # async: turns per client


def max_upload_bytes(size: int, capacity: int) -> int:
    """The encoded size of the largest valid upload, plus header room."""
    if capacity >= size:
        largest = SparseVector(size, None, torch.zeros(size))
    else:
        idx = torch.arange(size - capacity, size, dtype=torch.int64)
        largest = SparseVector(size, idx, torch.zeros(capacity))
    return len(encode_sparse(largest)) + _HEADER_ROOM


def turn_generator(seed: int, download_fraction: float, size: int) -> torch.Generator:
    """The turn's generator as the server's download left it: seeded with the
    turn's seed, after the download's tie-break draw (if θd < 1)."""
    from veil.learning.dssgd import download_tie_break

    generator = torch.Generator().manual_seed(seed)
    download_tie_break(generator, upload_count(download_fraction, size), size)
    return generator


class DSSGDService:
    """DSSGD's parameter server for devices over HTTP, state in ``folder``.

    Args:
        start: the initial global parameters, a flat float32 vector of P values.
        settings: the turn settings (θu, θd, selection, bound, DP) every device
            uses; the server checks uploads against them.
        store: the enrolment database (clients, tokens, run identity).
        turns: the turn database; restored from when it holds a run.
        num_clients: K; client ids are ``0..K-1``.
        rounds: R; the run ends after ``R * K`` turns.
        order: ``round_robin``, ``random`` or ``async``.
        seed: the run's seed (schedule and turn seeds).
        network: timeouts and limits.
        config: the experiment config as JSON-able values, served to devices.
        new_ledger: makes a client's privacy ledger (DP runs), else ``None``.
    """

    def __init__(
        self,
        start: torch.Tensor,
        settings: DSSGDSettings,
        store: StateStore,
        turns: TurnStore,
        num_clients: int,
        rounds: int,
        order: str,
        seed: int,
        network: DSSGDServerSettings | None = None,
        config: dict[str, Any] | None = None,
        new_ledger: Callable[[], PrivacyLedger] | None = None,
    ) -> None:
        if order not in ORDERS:
            raise ConfigError(f"order must be one of {list(ORDERS)}, got {order!r}")
        if rounds < 1:
            raise ConfigError(f"rounds must be >= 1, got {rounds}")
        if settings.dp is not None and new_ledger is None:
            raise ConfigError("a DP run needs new_ledger to keep the clients' ledgers")
        self.settings = settings
        self.store = store
        self.turn_store = turns
        self.num_clients = num_clients
        self.rounds = rounds
        self.order = order
        self.seed = seed
        self.network = network or DSSGDServerSettings()
        self.config = config or {}
        self.server = ParameterServer(start, num_clients)
        self.size = self.server.size
        self.capacity = upload_count(settings.upload_fraction, self.size)
        self.finished = False
        self.failed: str | None = None
        self._new_ledger = new_ledger
        self._lock = threading.Condition()
        self._grants: dict[int, _Grant] = {}  # by client id: the turn in flight
        self._count = _Counters()
        self._limit = rounds * num_clients
        self._slot_since = time.time()
        self._orders: dict[int, list[int]] = {}
        self._clients = {k: _ClientRecord(self._ledger()) for k in range(num_clients)}
        self.stats: list[TurnRow] = []
        self._check_identity(start)
        self._restore()
        self.enrolment = Enrolment(
            store, num_clients, self.network.enrolment_key, self._lock
        )

    # --- start and restore -------------------------------------------------------
    @property
    def total_turns(self) -> int:
        """``R * K``: the turns of the whole run."""
        return self.rounds * self.num_clients

    @property
    def synchronous(self) -> bool:
        """Whether turns follow a schedule (``round_robin`` or ``random``)."""
        return self.order != "async"

    def _ledger(self) -> PrivacyLedger | None:
        return None if self._new_ledger is None else self._new_ledger()

    def _check_identity(self, start: torch.Tensor) -> None:
        identity = json.dumps({"method": METHOD, "config": self.config})
        stored = self.store.get_meta("identity")
        if stored is None:
            self.store.set_meta("identity", identity)
        elif stored != identity:
            raise ConfigError(
                f"state folder {self.store.folder} holds another run (another method "
                "or config); use a new folder or the run's own config"
            )
        self.turn_store.write_initial(start.reshape(-1))

    def _restore(self) -> None:
        """Load the stored parameters, counts, download counts, turns and ledger."""
        from veil.learning.dssgd import ServerState

        params, counts, version = self.turn_store.read_state()
        seen = self.turn_store.seen()
        self.server.restore(ServerState(params, counts, seen, version))
        rows = self.turn_store.turns()
        now = time.time()
        for row in rows:
            c = self._count
            c.next_turn = row.turn + 1
            c.turns_of[row.client_id] = c.turns_of.get(row.client_id, 0) + 1
            if row.status == "granted":
                deadline = now + self.network.turn_timeout
                self._grants[row.client_id] = _Grant(row, deadline)
            elif row.status == "applied":
                c.applied += 1
                self.stats.append(row)
                self._spend(row.client_id, row.uploaded or 0, bool(row.over_budget))
            else:
                c.expired += 1
        c = self._count
        c.resolved = c.applied + (c.expired if self.synchronous else 0)
        if rows:
            logger.info(
                "restored: version %d, %d turns applied, %d expired, %d in flight",
                version,
                c.applied,
                c.expired,
                len(self._grants),
            )
        if c.applied != version:
            raise ConfigError(
                f"{self.turn_store.folder}/dssgd.sqlite is inconsistent: version "
                f"{version} but {c.applied} applied turns"
            )
        if self.settings.dp is not None:
            expected = [
                (r.client_id, e.to_dict()) for r in self.stats for e in self._events(r)
            ]
            if expected != self.turn_store.ledger():
                raise ConfigError("the stored ledger does not match the applied turns")

    # --- enrolment and tokens (veil.network.enrolment) ----------------------------
    def authenticate(self, token: str | None) -> int:
        """The client id of a device token; 401 unknown, 403 revoked."""
        return self.enrolment.authenticate(token)

    # --- whose turn --------------------------------------------------------------
    def _schedule(self, slot: int) -> tuple[int, int]:
        """The round and client of a synchronous schedule's slot."""
        rnd = slot // self.num_clients + 1
        if rnd not in self._orders:
            self._orders = {
                rnd: turn_order(self.order, self.num_clients, rnd, self.seed)
            }
        return rnd, self._orders[rnd][slot % self.num_clients]

    def _open_slots(self) -> int:
        return min(self._limit, self.total_turns)

    def _expire_overdue(self) -> None:
        """Expire granted turns past their deadline; skip a synchronous slot whose
        client did not ask in time. Call with the lock held."""
        now = time.time()
        for k, grant in list(self._grants.items()):
            if grant.deadline <= now:
                self.turn_store.expire(grant.row.turn)
                del self._grants[k]
                self._count.expired += 1
                if self.synchronous:
                    self._count.resolved += 1
                    self._slot_since = now
                logger.warning("turn %d of client %d expired", grant.row.turn, k)
                self._lock.notify_all()
        if not self.synchronous or self._grants:
            return
        slot = self._count.resolved
        overdue = now - self._slot_since > self.network.turn_timeout
        if slot < self._open_slots() and overdue:
            rnd, k = self._schedule(slot)
            seed = turn_seed(self.seed, rnd, k)
            row = _new_row(self._count.next_turn, k, rnd, slot, seed, self.server)
            self.turn_store.skip(row)
            self._count.next_turn += 1
            self._count.expired += 1
            self._count.resolved += 1
            self._slot_since = now
            logger.warning("turn %d skipped: client %d did not ask in time", slot, k)
            self._lock.notify_all()

    def request_turn(self, client_id: int, wait: float = 0.0) -> TurnGrant | None:
        """Grant ``client_id`` a turn if it may take one now (the one it holds, if
        any); else wait up to ``wait`` seconds for one, then ``None``.

        Raises:
            ServiceError: 410 once the run is over; 503 after a storage failure.
        """
        end = time.monotonic() + min(max(wait, 0.0), MAX_WAIT)
        with self._lock:
            while True:
                self._check_running()
                self._expire_overdue()
                grant = self._grants.get(client_id)
                if grant is None:
                    grant = self._grant(client_id)
                if grant is not None:
                    return self._describe(grant)
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self._lock.wait(min(left, 0.5))

    def _check_running(self) -> None:
        if self.failed is not None:
            raise ServiceError(f"the server stopped after an error: {self.failed}", 503)
        if self.finished:
            raise ServiceError("the run is over: no more turns", 410)

    def _grant(self, client_id: int) -> _Grant | None:
        c = self._count
        slot: int | None = None
        if self.synchronous:
            if c.resolved >= self._open_slots() or self._grants:
                return None
            slot = c.resolved
            rnd, k = self._schedule(slot)
            if k != client_id:
                return None
        else:
            if c.resolved + len(self._grants) >= self._open_slots():
                return None
            rnd = c.turns_of.get(client_id, 0) + 1
        seed = turn_seed(self.seed, rnd, client_id)
        generator = torch.Generator().manual_seed(seed)
        download = self.server.download(
            client_id, self.settings.download_fraction, generator
        )
        payload = encode_sparse(download.vector)
        row = _new_row(c.next_turn, client_id, rnd, slot, seed, self.server)
        row = _replace(row, base_version=download.version, download=payload)
        seen = None
        if self.settings.download_fraction < 1:
            seen = self.server.seen(client_id)
        try:
            self.turn_store.grant(row, seen)
        except Exception as exc:
            self._fail(exc)
        c.next_turn += 1
        c.turns_of[client_id] = c.turns_of.get(client_id, 0) + 1
        grant = _Grant(row, time.time() + self.network.turn_timeout)
        self._grants[client_id] = grant
        logger.info("turn %d granted to client %d", row.turn, client_id)
        return grant

    def _describe(self, grant: _Grant) -> TurnGrant:
        row = grant.row
        assert row.download is not None
        return TurnGrant(
            turn=row.turn,
            round=row.round,
            client_id=row.client_id,
            seed=row.seed,
            version=row.base_version,
            size=self.size,
            download_count=upload_count(self.settings.download_fraction, self.size),
            download_bytes=row.bytes_down,
            upload_capacity=self.capacity,
            seconds_left=max(grant.deadline - time.time(), 0.0),
        )

    def _fail(self, exc: BaseException) -> None:
        self.failed = f"{type(exc).__name__}: {exc}"
        logger.error("storage failed, the service stops: %s", self.failed)
        raise ServiceError(f"the server could not store the turn ({exc})", 503)

    def download(self, client_id: int, turn: int) -> tuple[bytes, TurnGrant]:
        """The encoded download of ``client_id``'s turn ``turn`` (the same bytes on
        every call) and the turn's description."""
        with self._lock:
            grant = self._target(client_id, turn)
            assert grant.row.download is not None
            return grant.row.download, self._describe(grant)

    def _target(self, client_id: int, turn: int) -> _Grant:
        """The turn in flight ``turn`` of ``client_id``, or a refusal: 404 no such
        turn, 403 another client's turn, 409 a turn that already ended."""
        self._check_running()
        grant = self._grants.get(client_id)
        if grant is not None and grant.row.turn == turn:
            return grant
        other = [g for g in self._grants.values() if g.row.turn == turn]
        if other:
            raise ServiceError(
                f"turn {turn} is client {other[0].row.client_id}'s, not client "
                f"{client_id}'s: it is not your turn",
                403,
            )
        if 0 <= turn < self._count.next_turn:
            raise ServiceError(
                f"turn {turn} is over (applied or expired): ask for a new turn "
                "(POST /v1/dssgd/turn)",
                409,
            )
        raise ServiceError(
            f"turn {turn} was never granted: ask for your turn first "
            "(POST /v1/dssgd/turn)",
            404,
        )

    def check_target(self, client_id: int, turn: int) -> None:
        """Refuse, before the body is read, an upload for a turn that is not this
        client's turn in flight (see :meth:`_target`)."""
        with self._lock:
            self._expire_overdue()
            self._target(client_id, turn)

    def abandon(self, client_id: int, turn: int) -> None:
        """End ``client_id``'s turn ``turn`` without an upload (a device that
        cannot finish it, say after its upload was refused): stored as expired; in
        a synchronous order its slot is skipped, in ``async`` it is free again.
        Nothing else changes."""
        with self._lock:
            grant = self._target(client_id, turn)
            try:
                self.turn_store.expire(grant.row.turn)
            except Exception as exc:
                self._fail(exc)
            del self._grants[client_id]
            self._count.expired += 1
            if self.synchronous:
                self._count.resolved += 1
            self._slot_since = time.time()
            self._lock.notify_all()
        logger.warning("turn %d abandoned by client %d", turn, client_id)

    # --- uploads -----------------------------------------------------------------
    def max_body_bytes(self) -> int:
        """The largest upload accepted, in bytes."""
        if self.network.max_body_bytes is not None:
            return self.network.max_body_bytes
        return max_upload_bytes(self.size, self.capacity)

    def accept(
        self, client_id: int, turn: int, payload: bytes, result: TurnResult
    ) -> TurnOutcome:
        """Check an upload completely, then apply it and commit the turn.

        Raises:
            ServiceError: 415 pickle; 400 malformed safetensors; 422 wrong tensor
                names or dtypes, more entries than ``ceil(θu * P)``, indices out of
                range, repeated or unsorted, NaN or Inf, values over the bound, an
                over-budget upload that is not empty; 403/404/409 as
                :meth:`check_target`. Nothing changes then.
        """
        vector = self._check_payload(payload)
        if result.over_budget and vector.count:
            raise ServiceError(
                f"an over-budget upload must be empty, got {vector.count} entries", 422
            )
        with self._lock:
            grant = self._target(client_id, turn)
            row = grant.row
            upload = Upload(client_id, vector, row.base_version)
            version = self.server.version
            try:
                staleness = self.server.apply(upload)
            except UpdateError as exc:  # checked above; a last line of defence
                raise ServiceError(str(exc), 422) from None
            done = _replace(
                row,
                status="applied",
                download=None,
                applied_version=version,
                staleness=staleness,
                uploaded=vector.count,
                bytes_up=len(payload),
                loss=result.loss,
                over_budget=result.over_budget,
            )
            events = [e.to_dict() for e in self._events(done)]
            try:
                self.turn_store.apply(
                    done,
                    result.metrics,
                    self.server.parameters(),
                    self.server.counts(),
                    self.server.version,
                    events,
                )
            except Exception as exc:
                self._fail(exc)
            del self._grants[client_id]
            self._count.applied += 1
            self._count.resolved += 1
            self._slot_since = time.time()
            self.stats.append(done)
            self._spend(client_id, vector.count, result.over_budget)
            self._lock.notify_all()
            outcome = TurnOutcome(turn, self.server.version, staleness)
        logger.info(
            "turn %d: client %d's upload of %d entries applied (staleness %d)",
            turn,
            client_id,
            vector.count,
            staleness,
        )
        return outcome

    def _check_payload(self, payload: bytes) -> SparseVector:
        """The upload's vector, or a refusal (before any state is touched)."""
        refuse_pickle(payload)
        header = safetensors_header(payload)
        self._check_header(header)
        try:
            load(payload)
        except Exception as exc:  # safetensors raises its own error types
            raise ServiceError(f"body is not valid safetensors ({exc})", 400) from None
        try:
            vector = decode_sparse(payload)
        except UpdateError as exc:
            raise ServiceError(f"upload refused: {exc}", 422) from None
        if vector.size != self.size:
            raise ServiceError(
                f"upload must be over {self.size} parameters (metadata 'size'), got "
                f"{vector.size}",
                422,
            )
        bound = self.settings.bound
        if bound is not None and vector.count:
            limit = torch.tensor(bound, dtype=torch.float32)
            if bool((vector.values.abs() > limit).any()):
                raise ServiceError(
                    f"upload values must lie in [-γ, γ] = [-{bound:g}, {bound:g}], "
                    f"got up to {float(vector.values.abs().max()):g}",
                    422,
                )
        return vector

    def _check_header(self, header: dict[str, Any]) -> None:
        names = set(header)
        if names not in ({"values"}, {"values", "indices"}):
            raise ServiceError(
                "upload must hold 'values' and, unless every parameter is sent, "
                f"'indices' ({SPARSE_FORMAT}); got {sorted(names)[:10]}",
                422,
            )
        index_dtype = "I32" if self.size < 2**31 else "I64"
        want = {"values": "F32", "indices": index_dtype}
        lengths = set()
        for name in names:
            entry = header[name]
            dtype = entry.get("dtype") if isinstance(entry, dict) else None
            shape = entry.get("shape") if isinstance(entry, dict) else None
            if dtype != want[name] or not (isinstance(shape, list) and len(shape) == 1):
                raise ServiceError(
                    f"tensor {name!r} must be 1-d {want[name]}, got {dtype} of shape "
                    f"{shape}",
                    422,
                )
            lengths.add(shape[0])
        count = max(lengths)
        if len(lengths) > 1:
            raise ServiceError(
                f"upload needs one index per value, got lengths {sorted(lengths)}",
                422,
            )
        if count > self.capacity:
            raise ServiceError(
                f"upload must hold at most ceil(θu * P) = {self.capacity} entries, "
                f"got {count}",
                422,
            )
        if "indices" not in names and count != self.size:
            raise ServiceError(
                f"an upload without 'indices' must hold all {self.size} values, got "
                f"{count}",
                422,
            )

    # --- privacy -----------------------------------------------------------------
    def _events(self, row: TurnRow) -> list[PrivacyEvent]:
        """What an applied upload spent: the events its client's ledger records."""
        dp = self.settings.dp
        if dp is None or row.over_budget:
            return []
        return upload_events(dp, self.capacity, row.uploaded or 0)

    def _spend(self, client_id: int, uploaded: int, over_budget: bool) -> None:
        """Account an applied upload as the client's own ledger does."""
        record = self._clients[client_id]
        dp = self.settings.dp
        if dp is None:
            record.uploads += 1
            return
        if over_budget:
            return
        if record.ledger is not None:
            for event in upload_events(dp, self.capacity, uploaded):
                record.ledger.record(event)
        eps_threshold, eps_queries, eps_values = dp.epsilons(self.capacity)
        record.pure_epsilon += eps_threshold + eps_queries
        record.pure_epsilon += uploaded * eps_values / self.capacity
        record.uploads += 1

    def client_records(self) -> list[DSSGDClient]:
        """Every client's privacy record as a :class:`DSSGDClient` without
        parameters (ledger, uploads, sum of pure epsilons), for the report."""
        with self._lock:
            return [
                DSSGDClient(k, torch.zeros(0), r.ledger, r.uploads, r.pure_epsilon)
                for k, r in self._clients.items()
            ]

    def ledger_events(self, client_id: int) -> list[dict[str, Any]]:
        """The privacy events recorded for ``client_id``'s uploads, oldest first."""
        return [e for k, e in self.turn_store.ledger() if k == client_id]

    # --- the run -----------------------------------------------------------------
    def release(self, rnd: int) -> None:
        """Allow turns up to the end of round ``rnd`` (``rnd * K`` turns)."""
        with self._lock:
            self._limit = rnd * self.num_clients
            self._slot_since = time.time()
            self._lock.notify_all()

    def wait_round(
        self,
        rnd: int,
        poll: float = 0.5,
        check: Callable[[], None] | None = None,
    ) -> list[TurnRow]:
        """Wait until round ``rnd``'s turns are done (or the run stopped); return
        every applied turn so far. ``check`` is called every ``poll`` seconds
        while waiting (to raise when the devices are gone, say)."""
        target = min(rnd * self.num_clients, self.total_turns)
        with self._lock:
            while self._count.resolved < target and not self.finished:
                if self.failed is not None:
                    raise ServiceError(f"the server stopped: {self.failed}", 503)
                self._expire_overdue()
                if check is not None:
                    check()
                self._lock.wait(poll)
            return list(self.stats)

    def applied_before(self, rnd: int) -> int:
        """How many of the applied turns belong to rounds before ``rnd``."""
        done = (rnd - 1) * self.num_clients
        with self._lock:
            if not self.synchronous:
                return min(len(self.stats), done)
            return sum(1 for r in self.stats if r.slot is not None and r.slot < done)

    @property
    def next_round(self) -> int:
        """The first round not yet complete."""
        return self._count.resolved // self.num_clients + 1

    def finish(self) -> None:
        """Tell devices the run is over (410 from then on)."""
        with self._lock:
            self.finished = True
            self._lock.notify_all()

    def status(self) -> dict[str, Any]:
        """Turns, clients, version and privacy records, as JSON-able values."""
        with self._lock:
            c = self._count
            current = None
            if self.synchronous and c.resolved < self.total_turns:
                rnd, k = self._schedule(c.resolved)
                current = {"slot": c.resolved, "round": rnd, "client_id": k}
            return {
                "method": METHOD,
                "order": self.order,
                "finished": self.finished,
                "version": self.server.version,
                "turns_total": self.total_turns,
                "turns_applied": c.applied,
                "turns_expired": c.expired,
                "turns_in_flight": len(self._grants),
                "turns_released": self._open_slots(),
                "current": current,
                "clients_enrolled": self.enrolment.counts()[0],
                "clients_revoked": self.enrolment.counts()[1],
                "bytes_up": sum(r.bytes_up or 0 for r in self.stats),
                "bytes_down": sum(r.bytes_down for r in self.stats),
                "ledger_entries": sum(len(self._events(r)) for r in self.stats),
            }


def _new_row(
    turn: int,
    client_id: int,
    rnd: int,
    slot: int | None,
    seed: int,
    server: ParameterServer,
) -> TurnRow:
    return TurnRow(
        turn,
        client_id,
        rnd,
        slot,
        seed,
        server.version,
        "granted",
        None,
        0,
        None,
        None,
        None,
        None,
        None,
        None,
    )


def _replace(row: TurnRow, **changes: Any) -> TurnRow:
    from dataclasses import replace

    if "download" in changes and changes["download"] is not None:
        changes.setdefault("bytes_down", len(changes["download"]))
    return replace(row, **changes)
