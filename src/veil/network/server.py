"""The federated server: rounds of an algorithm, with devices reaching it over HTTP.

:class:`FederatedServer` drives the same algorithm objects as the simulation runtime
(``configure_round`` and ``aggregate``; devices run ``client_fit``), and implements
the :class:`~veil.runtime.Runtime` protocol, so the experiment runner can drive it
round by round. The HTTP app (:mod:`veil.network.app`) only calls its methods.

A round:

1. open: ``configure_round`` picks the clients and their tasks; the round, its tasks
   and its deadline are stored before any device can see them;
2. collect: enrolled devices whose client id was picked ask for their task, download
   the global model and upload an update. Each upload is checked completely (token,
   round, duplicate, tensor names, dtypes, shapes, finite values, norm, metadata)
   and only then stored (committed with the uploads arriving at the same moment,
   see :mod:`veil.network.store`); the upload is answered once it is committed;
3. close: when every task has a result, or at the deadline, the round closes (an
   upload already being stored then is waited for, and counts). With at
   least ``min_results`` results (or every task's, if fewer were picked) the results,
   **sorted by client id**, go to ``aggregate``, so the order in which devices
   answered cannot change the model; the new model is checkpointed and the round and
   its privacy events are committed together. With fewer the round fails: nothing is
   aggregated, and the next round starts (or the server stops, ``on_failed_round``).

Started on a folder that already holds state, the server restores the last
checkpoint and the ledger, and reopens an open round with the updates already
accepted and a fresh deadline.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from veil._wire import refuse_pickle, safetensors_header
from veil.errors import (
    BudgetExceededError,
    ConfigError,
    RoundFailedError,
    ServiceError,
    UpdateError,
)
from veil.learning._types import ClientResult, ClientTask, StateDict
from veil.learning.encoding import decode, encode, encoded_size
from veil.network._algorithms import (
    apply_checkpoint,
    check_metrics,
    checkpoint_of,
    ledger_of,
    method_of,
    new_events,
    norm_bound,
)
from veil.network._longpoll import Wakeup
from veil.network.enrolment import Enrolment
from veil.network.store import AcceptedUpdate, StateStore
from veil.privacy import PrivacyEvent
from veil.runtime import FederatedAlgorithm, RoundStats
from veil.runtime._base import check_clients

__all__ = ["FederatedServer", "ResultMetadata", "ServerSettings", "TaskInfo"]

logger = logging.getLogger(__name__)

# safetensors dtype names of the torch dtypes a model may hold.
_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
# Room for a safetensors header: names, dtypes, shapes and offsets.
_HEADER_ROOM = 64 * 1024


@dataclass(frozen=True)
class ServerSettings:
    """How the server runs rounds and what it accepts.

    Attributes:
        round_timeout: seconds a round stays open, > 0 (default 60).
        min_results: results needed to aggregate a round, >= 1 (default 1); a round
            that picked fewer clients needs all of theirs.
        on_failed_round: ``"next"`` (default) starts the next round after a failed
            one; ``"stop"`` stops the server.
        max_update_norm: largest L2 norm of an accepted update; default: the
            clipping norm for DP-FedAvg with central noise, else no bound.
        max_body_bytes: largest accepted upload in bytes; default: the model's
            safetensors size plus 64 KiB.
        max_examples: largest example count a client may report (FedAvg weights
            by it); default: no bound.
        enrolment_key: when set, enrolling needs it as a bearer token.
    """

    round_timeout: float = 60.0
    min_results: int = 1
    on_failed_round: str = "next"
    max_update_norm: float | None = None
    max_body_bytes: int | None = None
    max_examples: int | None = None
    enrolment_key: str | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.round_timeout) and self.round_timeout > 0):
            raise ConfigError(f"round_timeout must be > 0, got {self.round_timeout}")
        if self.min_results < 1:
            raise ConfigError(f"min_results must be >= 1, got {self.min_results}")
        if self.on_failed_round not in ("next", "stop"):
            raise ConfigError(
                "on_failed_round must be 'next' or 'stop', got "
                f"{self.on_failed_round!r}"
            )
        if self.max_update_norm is not None and not self.max_update_norm > 0:
            raise ConfigError(
                f"max_update_norm must be > 0, got {self.max_update_norm}"
            )


@dataclass(frozen=True)
class TaskInfo:
    """A client's task as the device receives it (the model is downloaded apart)."""

    round: int
    client_id: int
    seed: int
    settings: dict[str, float]
    seconds_left: float


@dataclass(frozen=True)
class ResultMetadata:
    """What a device says about its update (the ``X-Veil-Result`` JSON header)."""

    num_examples: int
    loss: float
    metrics: dict[str, float]


@dataclass
class _OpenRound:
    round: int
    tasks: dict[int, ClientTask]
    deadline: float
    model: bytes
    accepted: set[int] = field(default_factory=set)
    closed: bool = False
    # Clients whose checked update is being stored; accepted once it is committed.
    storing: set[int] = field(default_factory=set)
    # The accepted updates, decoded, as aggregation takes them (the store has them
    # too: this saves reading them back), and the bytes they were sent in.
    results: dict[int, ClientResult] = field(default_factory=dict)
    bytes_up: int = 0


class FederatedServer:
    """Rounds of ``algorithm`` with devices over HTTP, state in ``store``.

    Args:
        algorithm: a FedAvg or DP-FedAvg object (its server side runs here).
        store: the durable state; restored from when it holds a run.
        num_clients: clients in the population; ids are ``0..num_clients-1``.
        settings: round and validation settings.
        config: the experiment config as JSON-able values, served to devices so
            they build the same client side.
        delta: the delta at which the status states epsilon (DP-FedAvg).
    """

    def __init__(
        self,
        algorithm: FederatedAlgorithm,
        store: StateStore,
        num_clients: int,
        settings: ServerSettings | None = None,
        config: dict[str, Any] | None = None,
        delta: float | None = None,
    ) -> None:
        self.method = self._method_of(algorithm)
        self.algorithm = algorithm
        self.store = store
        self.num_clients = num_clients
        self.settings = settings or ServerSettings()
        self.config = config or {}
        self.delta = delta
        self.finished = False
        self._lock = threading.Condition()
        self._round: _OpenRound | None = None
        # Wakes GET /v1/task?wait=S requests when a round opens or the run ends.
        self.wakeup = Wakeup()
        self._reference = {k: v.clone() for k, v in self._global_state().items()}
        limit = self.settings.max_body_bytes
        self._max_body = (
            limit if limit is not None else encoded_size(self._reference) + _HEADER_ROOM
        )
        self._check_identity()
        self.next_round = self._restore()
        self.enrolment = Enrolment(
            store, num_clients, self.settings.enrolment_key, self._lock
        )

    # --- start and restore -------------------------------------------------------
    def _method_of(self, algorithm: FederatedAlgorithm) -> str:
        """The method name served to devices; refuses what this server cannot
        drive (a subclass may drive more)."""
        return method_of(algorithm)

    def _global_state(self) -> StateDict:
        state: StateDict = getattr(self.algorithm, "global_state")  # noqa: B009
        return state

    def _check_identity(self) -> None:
        identity = json.dumps({"method": self.method, "config": self.config})
        stored = self.store.get_meta("identity")
        if stored is None:
            self.store.set_meta("identity", identity)
            name = self.store.write_checkpoint(0, *checkpoint_of(self.algorithm, 0))
            self.store.set_meta("initial_checkpoint", name)
        elif stored != identity:
            raise ConfigError(
                f"state folder {self.store.folder} holds another run (another method "
                "or config); use a new folder or the run's own config"
            )

    def _restore(self) -> int:
        """Load the last aggregated round's checkpoint and the ledger; return the
        round to run next."""
        rows = self.store.rounds()
        done = [r for r in rows if r.status == "aggregated"]
        name = (
            done[-1].checkpoint if done else self.store.get_meta("initial_checkpoint")
        )
        if name is not None and done:
            apply_checkpoint(self.algorithm, *self.store.read_checkpoint(name))
        ledger = ledger_of(self.algorithm)
        events = self.store.ledger()
        if ledger is not None:
            for e in events:
                ledger.record(PrivacyEvent.from_dict(e))
        if rows:
            logger.info(
                "restored: %d rounds stored, last aggregated %s, %d ledger entries",
                len(rows),
                done[-1].round if done else None,
                len(events),
            )
        if not rows:
            return 1
        return rows[-1].round if rows[-1].status == "open" else rows[-1].round + 1

    # --- enrolment and tokens (veil.network.enrolment) ----------------------------
    def authenticate(self, token: str | None) -> int:
        """The client id of a device token; 401 unknown, 403 revoked."""
        return self.enrolment.authenticate(token)

    # --- serving a round ---------------------------------------------------------
    def task_for(self, client_id: int) -> TaskInfo | None:
        """The client's task in the open round, or ``None`` (nothing to do now).

        Raises:
            ServiceError: 410 once the run is over.
        """
        with self._lock:
            if self.finished:
                raise ServiceError("the run is over: no more rounds", 410)
            cur = self._round
            if cur is None or cur.closed or client_id in cur.accepted:
                return None
            task = cur.tasks.get(client_id)
            if task is None:
                return None
            left = max(cur.deadline - time.time(), 0.0)
            return TaskInfo(cur.round, client_id, task.seed, dict(task.settings), left)

    async def wait_for_task(self, client_id: int, wait: float) -> TaskInfo | None:
        """:meth:`task_for`, waiting on the event loop up to ``wait`` seconds for
        a task (no lock is held and no thread is spent while waiting).

        Answers at once when the client has a task; else when a round opens (with
        ``None`` if the round did not pick the client, so that a device acting
        for several clients can ask for the others), when ``wait`` seconds pass,
        or when the server stops serving (``None``).

        Raises:
            ServiceError: 410 once the run is over, also while waiting.
        """
        end = time.monotonic() + wait
        ready = self.wakeup.event()  # before looking: a change after it wakes us
        info = self.task_for(client_id)
        if info is not None or self.wakeup.closed:
            return info
        if await self.wakeup.wait(ready, end - time.monotonic()):
            return self.task_for(client_id)
        return None

    def model_bytes(self, rnd: int) -> bytes:
        """The safetensors bytes of the global model of the open round ``rnd``."""
        with self._lock:
            cur = self._round
            if cur is None or cur.closed or cur.round != rnd:
                open_round = None if cur is None or cur.closed else cur.round
                raise ServiceError(
                    f"round must be the open round ({open_round}), got {rnd}", 409
                )
            return cur.model

    def max_body_bytes(self) -> int:
        """The largest upload accepted, in bytes."""
        return self._max_body

    def check_target(self, client_id: int, rnd: int) -> None:
        """Refuse, before the body is read, an upload the open round cannot take:
        409 no such open round or already sent, 403 a client the round did not pick.
        """
        with self._lock:
            cur = self._round
            if cur is None or cur.closed:
                raise ServiceError(
                    f"round must be an open round, got {rnd}; no round is open now "
                    "(ask GET /v1/task)",
                    409,
                )
            if rnd != cur.round:
                raise ServiceError(
                    f"round must be {cur.round}, the open round, got {rnd}", 409
                )
            if client_id not in cur.tasks:
                raise ServiceError(
                    f"client {client_id} is not among round {rnd}'s clients", 403
                )
            if client_id in cur.accepted or client_id in cur.storing:
                raise ServiceError(
                    f"client {client_id} already sent its update for round {rnd}",
                    409,
                )

    def accept(
        self, client_id: int, rnd: int, payload: bytes, meta: ResultMetadata
    ) -> None:
        """Check an upload completely, then store it; return once it is committed.

        Raises:
            ServiceError: 415 pickle, 400 malformed safetensors, 422 wrong names,
                dtypes or shapes, NaN or Inf, norm over the bound, bad metadata;
                409 or 403 as :meth:`check_target`. Nothing is stored then.
        """
        cur, result, stored = self._check_and_store(client_id, rnd, payload, meta)
        stored.result()
        self._stored(cur, result, len(payload), stored)  # before the answer

    async def accept_async(
        self, client_id: int, rnd: int, payload: bytes, meta: ResultMetadata
    ) -> None:
        """:meth:`accept` for the event loop: the checks run in the caller's
        thread, and the commit is awaited without holding a thread."""
        *_, stored = self._check_and_store(client_id, rnd, payload, meta)
        await asyncio.wrap_future(stored)

    def _check_and_store(
        self, client_id: int, rnd: int, payload: bytes, meta: ResultMetadata
    ) -> tuple[_OpenRound, ClientResult, Future[None]]:
        """Check the upload, then hand it to the store. Until the store is done
        with it the client counts as sending (a second upload is refused, the
        round waits for it before closing); then it is accepted if committed."""
        self._check_metadata(meta)
        refuse_pickle(payload)
        self._check_header(safetensors_header(payload))
        try:
            update = decode(payload)
        except UpdateError as exc:
            raise ServiceError(str(exc), 400) from None
        self._check_values(update)
        with self._lock:
            self.check_target(client_id, rnd)
            cur = self._round
            assert cur is not None
            cur.storing.add(client_id)
        row = AcceptedUpdate(
            rnd, client_id, meta.num_examples, meta.loss, meta.metrics, payload
        )
        result = ClientResult(
            client_id, rnd, update, meta.num_examples, meta.loss, meta.metrics
        )
        try:
            stored = self.store.submit_update(row)
        except BaseException:
            with self._lock:
                cur.storing.discard(client_id)
                self._lock.notify_all()
            raise
        # Runs in the writer thread as soon as the commit is done (or failed),
        # before anyone awaiting the future through asyncio is woken.
        stored.add_done_callback(lambda f: self._stored(cur, result, len(payload), f))
        return cur, result, stored

    def _stored(
        self, cur: _OpenRound, result: ClientResult, size: int, stored: Future[None]
    ) -> None:
        """The store is done with an upload: accepted if committed. Idempotent."""
        ok = stored.exception() is None
        client_id = result.client_id
        with self._lock:
            if client_id not in cur.storing:
                return
            cur.storing.discard(client_id)
            if ok:
                cur.accepted.add(client_id)
                cur.results[client_id] = result
                cur.bytes_up += size
            # Wake the round's loop only when it has something to do: waking it
            # for every upload costs every upload a thread switch.
            if cur.closed or len(cur.accepted) == len(cur.tasks):
                self._lock.notify_all()
        if ok:
            logger.info("round %d: accepted client %d's update", cur.round, client_id)

    def _check_metadata(self, meta: ResultMetadata) -> None:
        problem = check_metrics(self.algorithm, meta.metrics)
        if problem:
            raise ServiceError(problem, 422)
        cap = self.settings.max_examples
        if cap is not None and meta.num_examples > cap:
            raise ServiceError(
                f"num_examples must be at most {cap}, got {meta.num_examples}", 422
            )

    def _check_header(self, header: dict[str, Any]) -> None:
        ref = self._reference
        if set(header) != set(ref):
            missing = sorted(set(ref) - set(header))
            extra = sorted(set(header) - set(ref))
            raise ServiceError(
                f"update must hold exactly the model's tensors; missing {missing}, "
                f"unexpected {extra[:10]}",
                422,
            )
        for name, t in ref.items():
            entry = header[name]
            dtype = entry.get("dtype") if isinstance(entry, dict) else None
            shape = entry.get("shape") if isinstance(entry, dict) else None
            want = _DTYPES.get(t.dtype, str(t.dtype))
            if dtype != want or shape != list(t.shape):
                raise ServiceError(
                    f"tensor {name!r} must be {want} of shape {list(t.shape)}, got "
                    f"{dtype} of shape {shape}",
                    422,
                )

    def _check_values(self, update: StateDict) -> None:
        # One pass per tensor: its sum of squares in float64 (the norm's term, as
        # update_norm computes it) is finite exactly when every value is, unless
        # squaring large finite float64 values overflows; then look closer.
        total = 0.0
        for name, t in update.items():
            square_sum = float(t.double().square().sum())
            finite = math.isfinite(square_sum) or not t.is_floating_point()
            if not (finite or bool(torch.isfinite(t).all())):
                raise ServiceError(f"tensor {name!r} holds NaN or Inf", 422)
            total += square_sum
        bound = norm_bound(self.algorithm, self.settings.max_update_norm)
        norm = math.sqrt(total)
        if norm > bound:
            raise ServiceError(
                f"update's L2 norm must be at most {bound:.6g}, got {norm:.6g}", 422
            )

    # --- the round loop ----------------------------------------------------------
    def run_round(self, algorithm: FederatedAlgorithm, rnd: int) -> RoundStats:
        """Open round ``rnd``, wait for results until all are in or the deadline,
        then aggregate or fail the round.

        Raises:
            BudgetExceededError: the round would exceed the privacy budget (from
                ``configure_round``); nothing is opened.
            RoundFailedError: too few results and ``on_failed_round = "stop"``.
        """
        if algorithm is not self.algorithm:
            raise ConfigError("run_round must be given the server's own algorithm")
        start = time.perf_counter()
        cur = self._open(rnd)
        self._wait(cur)
        if self.finished:  # stopped: the round stays open, a restart resumes it
            raise RoundFailedError(f"round {rnd} interrupted: the server stopped")
        # Sorted by client id: arrival order cannot matter.
        results = [cur.results[k] for k in sorted(cur.results)]
        needed = min(self.settings.min_results, len(cur.tasks))
        bytes_up = cur.bytes_up
        bytes_down = len(cur.model) * len(results)
        if len(results) < needed:
            self._fail(
                rnd,
                f"{len(results)} of {len(cur.tasks)} results by the "
                f"deadline, {needed} needed",
            )
            return RoundStats(
                rnd, 0, bytes_up, bytes_down, math.nan, time.perf_counter() - start
            )
        try:
            self._aggregate(rnd, results)
        except UpdateError as exc:  # validated on upload; a last line of defence
            self._fail(rnd, f"aggregation refused the results: {exc}")
            return RoundStats(
                rnd, 0, bytes_up, bytes_down, math.nan, time.perf_counter() - start
            )
        weights = sum(r.num_examples for r in results)
        loss = sum(r.loss * r.num_examples for r in results) / max(weights, 1)
        return RoundStats(
            rnd, len(results), bytes_up, bytes_down, loss, time.perf_counter() - start
        )

    def _open(self, rnd: int) -> _OpenRound:
        tasks = self.algorithm.configure_round(rnd)
        check_clients(tasks, self.num_clients)
        described = [
            {"client_id": t.client_id, "seed": t.seed, "settings": t.settings}
            for t in tasks
        ]
        deadline = time.time() + self.settings.round_timeout
        stored = {r.round: r for r in self.store.rounds()}.get(rnd)
        if stored is None:
            self.store.open_round(rnd, described, deadline)
        elif stored.status != "open" or stored.tasks != described:
            raise ConfigError(
                f"round {rnd} is stored as {stored.status} with other tasks; the "
                "state folder belongs to another run"
            )
        else:
            self.store.set_deadline(rnd, deadline)  # devices were cut off: new time
        updates = self.store.updates(rnd)  # accepted before a restart
        cur = _OpenRound(
            rnd,
            {t.client_id: t for t in tasks},
            deadline,
            encode(self._global_state()),
            {u.client_id for u in updates},
            results={
                u.client_id: ClientResult(
                    u.client_id,
                    rnd,
                    decode(u.tensors),
                    u.num_examples,
                    u.loss,
                    u.metrics,
                )
                for u in updates
            },
            bytes_up=sum(len(u.tensors) for u in updates),
        )
        with self._lock:
            self._round = cur
            self._lock.notify_all()
        self.wakeup.fire()
        logger.info("round %d: open, %d clients", rnd, len(tasks))
        return cur

    def _wait(self, cur: _OpenRound) -> None:
        with self._lock:
            while len(cur.accepted) < len(cur.tasks) and not self.finished:
                left = cur.deadline - time.time()
                if left <= 0:
                    break
                self._lock.wait(min(left, 1.0))
            cur.closed = True
            while cur.storing:  # checked before the close: they count
                self._lock.wait(1.0)

    def _fail(self, rnd: int, reason: str) -> None:
        self.store.fail_round(rnd, reason)
        logger.warning("round %d failed: %s", rnd, reason)
        if self.settings.on_failed_round == "stop":
            raise RoundFailedError(f"round {rnd} failed: {reason}")

    def _aggregate(self, rnd: int, results: list[ClientResult]) -> None:
        ledger = ledger_of(self.algorithm)
        before = ledger.events if ledger is not None else ()
        self.algorithm.aggregate(rnd, results)
        after = ledger.events if ledger is not None else ()
        events = [e.to_dict() for e in new_events(before, after)]
        name = self.store.write_checkpoint(rnd, *checkpoint_of(self.algorithm, rnd))
        self.store.finish_round(rnd, name, events)
        self.store.prune_checkpoints(name)
        logger.info("round %d: aggregated %d results", rnd, len(results))

    def run(
        self, rounds: int, after_round: Callable[[RoundStats], None] | None = None
    ) -> None:
        """Run rounds from :attr:`next_round` to ``rounds`` (calling
        ``after_round`` with each round's stats), then mark the run finished
        (devices are told so). Stops early when the budget is spent or a failed
        round stops the server."""
        try:
            for rnd in range(self.next_round, rounds + 1):
                stats = self.run_round(self.algorithm, rnd)
                self.next_round = rnd + 1
                if after_round is not None:
                    after_round(stats)
        except BudgetExceededError as exc:
            logger.warning("stopped before round %d: %s", self.next_round, exc)
        finally:
            self.finish()

    def finish(self) -> None:
        """Tell devices the run is over."""
        with self._lock:
            self.finished = True
            self._round = None
            self._lock.notify_all()
        self.wakeup.fire()

    # --- status ------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Round, clients, results and privacy spent, as JSON-able values."""
        rows = self.store.rounds()
        with self._lock:
            cur = self._round
            open_round = None
            if cur is not None and not cur.closed:
                open_round = {
                    "round": cur.round,
                    "clients": len(cur.tasks),
                    "received": len(cur.accepted),
                    "seconds_left": max(cur.deadline - time.time(), 0.0),
                }
            enrolled, revoked = self.enrolment.counts()
        ledger = ledger_of(self.algorithm)
        epsilon = None
        if ledger is not None and self.delta is not None:
            eps = ledger.epsilon(self.delta)
            epsilon = None if math.isinf(eps) else eps
        return {
            "method": self.method,
            "finished": self.finished,
            "open_round": open_round,
            "rounds_aggregated": sum(r.status == "aggregated" for r in rows),
            "rounds_failed": sum(r.status == "failed" for r in rows),
            "clients_enrolled": enrolled,
            "clients_revoked": revoked,
            "updates_accepted": self.store.counts()["updates"],
            "epsilon": epsilon,
            "delta": self.delta if ledger is not None else None,
            "ledger_entries": len(self.store.ledger()),
        }
