"""Secure aggregation over the network: the server learns only the sum of a round's
encoded updates, with devices dropping out at any step.

:class:`SecureFederatedServer` is a :class:`~veil.network.FederatedServer` whose
rounds end with the four steps of secure aggregation instead of plain uploads. It
drives a :class:`~veil.secagg.SecAggServer` (the same state machine as the
simulation); devices drive :class:`~veil.secagg.SecAggClient`
(:mod:`veil.network.secagg_device`). This module adds only the transport: which
message each client may fetch or send at each step, the step deadlines, the checks
made before a request touches the round, and what is committed.

A round:

1. open: ``configure_round`` picks the clients (stored with the round, as for plain
   rounds); a ``SecAggServer`` is made for them with a fresh random graph seed;
2. advertise keys (deadline ``round_timeout`` from the opening, which also covers
   training): a picked device fetches its task and the model, trains, encodes its
   update (``secure_input``), fetches the round config and sends its public keys;
3. share keys, masked input, unmasking (each open ``step_timeout`` seconds): each
   device fetches the server's message for the step and answers it. A step closes
   when every expected client answered, or at its deadline; the state machine then
   drops the silent ones, exactly as in simulation;
4. close: the unmasked sum goes to the algorithm's ``aggregate_sum``; the model and
   the privacy events are committed as for plain rounds. Below the threshold at any
   step the protocol aborts: the round is marked failed with the reason and nothing
   is aggregated (``on_failed_round`` then applies).

Every request is checked before it touches the round (token, round, step, the
client's part in the step, a second answer, the body's format, and the state
machine's own checks via :meth:`SecAggServer.check`): a refusal is a 4xx and the
client stays in the round. Plain uploads are refused.

What survives a SIGKILL: the round (opened, failed or aggregated), its tasks, the
checkpoints and the ledger, in the same SQLite store. The protocol's state (keys,
sealed shares, masked inputs) is held in memory only, on the server as on the
devices, so a round interrupted by a restart cannot finish: the restarted server
marks it failed (reason given) and opens the next one.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from veil.errors import (
    ConfigError,
    MessageError,
    RoundAbortedError,
    RoundFailedError,
    ServiceError,
)
from veil.learning import DPFedAvg, FedAvg
from veil.learning._types import ClientResult, ClientTask
from veil.network._algorithms import checkpoint_of, ledger_of, new_events
from veil.network._secagg_wire import (
    client_message,
    masked_input_message,
    server_json,
)
from veil.network.server import FederatedServer, ServerSettings
from veil.network.store import StateStore
from veil.runtime import FederatedAlgorithm, RoundStats
from veil.secagg import SecAggServer, Step
from veil.secagg.fixedpoint import dtype_for_bits
from veil.secagg.messages import AdvertiseKeys, Message, SharedKeys, UnmaskShares

__all__ = [
    "STEP_NAMES",
    "SecureAlgorithm",
    "SecureFederatedServer",
    "is_secure",
]

logger = logging.getLogger(__name__)

#: The name of each step in URLs and JSON.
STEP_NAMES = {
    Step.ADVERTISE_KEYS: "advertise-keys",
    Step.SHARE_KEYS: "share-keys",
    Step.MASKED_INPUT: "masked-input",
    Step.UNMASKING: "unmasking",
}
_JSON_KINDS: dict[Step, type[Message]] = {
    Step.ADVERTISE_KEYS: AdvertiseKeys,
    Step.SHARE_KEYS: SharedKeys,
    Step.UNMASKING: UnmaskShares,
}
_RESTARTED = (
    "the server restarted during the round's secure aggregation; the protocol's "
    "keys, shares and masked inputs are held in memory only, so the round cannot "
    "finish and nothing of it was aggregated"
)


class _Plan(Protocol):
    bits: int
    length: int
    neighbours: int
    threshold: int


@runtime_checkable
class SecureAlgorithm(Protocol):
    """What an algorithm offers to be aggregated securely over the network
    (:class:`veil.experiment._secagg.SecureFedAvg`,
    :class:`veil.experiment._secure_dp_fedavg.SecureDPFedAvg`)."""

    def secure_plan(self, invited: int) -> _Plan:
        """Bits, input length, neighbours and threshold for ``invited`` clients."""

    def secure_input(
        self, task: ClientTask, result: ClientResult, invited: int
    ) -> np.ndarray:
        """A device's encoded input (1-D, the round's unsigned type)."""

    def aggregate_sum(
        self, rnd: int, total: np.ndarray, included: Sequence[int], invited: int
    ) -> None:
        """Apply the unmasked sum of the ``included`` clients' inputs."""

    def note_aborted(self, rnd: int) -> None:
        """Count a round whose protocol aborted."""

    def note_traffic(self, bytes_up: int, bytes_down: int, included: int) -> None:
        """Count a round's protocol bytes, sent and received by the clients."""


def is_secure(algorithm: object) -> bool:
    """Whether ``algorithm`` aggregates with secure aggregation."""
    return isinstance(algorithm, SecureAlgorithm)


@dataclass
class _SecureRound:
    """The transport's view of one round's protocol (guarded by the server lock)."""

    round: int
    server: SecAggServer
    invited: tuple[int, ...]
    step: Step
    deadline: float
    outbox: dict[int, dict[str, Any]]  # client -> the step's server message (JSON)
    answered: set[int] = field(default_factory=set)
    fetched: set[int] = field(default_factory=set)
    closing: bool = False
    bytes_up: int = 0
    bytes_down: int = 0

    def expected(self) -> set[int]:
        return set(self.outbox)


class SecureFederatedServer(FederatedServer):
    """A :class:`~veil.network.FederatedServer` whose rounds aggregate securely.

    Args:
        algorithm: a secure FedAvg or DP-FedAvg (distributed noise) object
            (:func:`is_secure`).
        store, num_clients, settings, config, delta: as for
            :class:`~veil.network.FederatedServer`.
        step_timeout: seconds each of the share keys, masked input and unmasking
            steps stays open, > 0; default ``settings.round_timeout``.
    """

    def __init__(
        self,
        algorithm: FederatedAlgorithm,
        store: StateStore,
        num_clients: int,
        settings: ServerSettings | None = None,
        config: dict[str, Any] | None = None,
        delta: float | None = None,
        step_timeout: float | None = None,
    ) -> None:
        self._secure: _SecureRound | None = None
        super().__init__(algorithm, store, num_clients, settings, config, delta)
        timeout = self.settings.round_timeout if step_timeout is None else step_timeout
        if not (math.isfinite(timeout) and timeout > 0):
            raise ConfigError(f"step_timeout must be > 0, got {timeout}")
        self.step_timeout = timeout

    def _method_of(self, algorithm: FederatedAlgorithm) -> str:
        if not is_secure(algorithm):
            raise ConfigError(
                "SecureFederatedServer needs a secure algorithm (fedavg or "
                f"dp_fedavg with secure_aggregation = true), got "
                f"{type(algorithm).__name__}; use FederatedServer"
            )
        if isinstance(algorithm, DPFedAvg):
            # secure_noise is fine here: a restart fails the open round instead of
            # resuming it, so its client sample never has to be drawn again
            return "dp-fedavg"
        if isinstance(algorithm, FedAvg) and algorithm.trainer_for is None:
            return "fedavg"
        raise ConfigError(
            "the network runtime aggregates FedAvg (without local_dp) and DP-FedAvg "
            f"securely, got {type(algorithm).__name__}"
        )

    def _restore(self) -> int:
        """As for plain rounds, except that an open round is failed: its protocol
        state did not survive the restart."""
        nxt = super()._restore()
        rows = self.store.rounds()
        if rows and rows[-1].status == "open":
            self.store.fail_round(rows[-1].round, _RESTARTED)
            logger.warning("round %d failed: %s", rows[-1].round, _RESTARTED)
            return rows[-1].round + 1
        return nxt

    def check_target(self, client_id: int, rnd: int) -> None:
        """Plain uploads are refused: updates travel masked, step by step."""
        raise ServiceError(
            "this server aggregates securely: send the masked update through the "
            f"secure aggregation steps (/v1/rounds/{rnd}/secagg), not a plain update",
            409,
        )

    # --- the steps, as devices see them ------------------------------------------
    def _current(self, client_id: int, rnd: int) -> _SecureRound:
        """The open secure round ``rnd`` with ``client_id`` invited (under lock)."""
        if self.finished:
            raise ServiceError("the run is over: no more rounds", 410)
        sec = self._secure
        if sec is None or sec.round != rnd:
            open_round = None if sec is None else sec.round
            raise ServiceError(
                f"round must be the open secure round ({open_round}), got {rnd}", 409
            )
        if client_id not in sec.invited:
            raise ServiceError(
                f"client {client_id} is not among round {rnd}'s clients", 403
            )
        return sec

    def _out(self, sec: _SecureRound, client_id: int) -> ServiceError:
        reason = sec.server.dropped.get(client_id, "it takes no part in this step")
        return ServiceError(
            f"client {client_id} is out of round {sec.round}: {reason}", 409
        )

    def secure_step(self, client_id: int, rnd: int) -> dict[str, Any] | None:
        """The server's message for ``client_id``'s next step of round ``rnd``, or
        ``None`` while it must wait (it answered, or the step is closing).

        Raises:
            ServiceError: 410 run over; 409 not the open round, or the client is out
                of the round (dropped, with the reason); 403 not invited.
        """
        with self._lock:
            cur = self._round
            opening = cur is not None and cur.round == rnd and not cur.closed
            if self._secure is None and opening:
                return None  # opened a moment ago: its protocol is being set up
            sec = self._current(client_id, rnd)
            if sec.closing or client_id in sec.answered:
                return None
            message = sec.outbox.get(client_id)
            if message is None:
                raise self._out(sec, client_id)
            if client_id not in sec.fetched:
                sec.fetched.add(client_id)
                sec.bytes_down += len(json.dumps(message))
            return {
                "round": rnd,
                "step": STEP_NAMES[sec.step],
                "seconds_left": max(sec.deadline - time.time(), 0.0),
                "message": message,
            }

    def max_masked_bytes(self, rnd: int) -> int:
        """The largest masked input body accepted in round ``rnd``, in bytes."""
        with self._lock:
            sec = self._secure
            if sec is None or sec.round != rnd:
                return 64 * 1024
            cfg = sec.server.config
            return cfg.length * dtype_for_bits(cfg.bits).itemsize + 64 * 1024

    def secure_receive(
        self, client_id: int, rnd: int, step: Step, body: Any, size: int
    ) -> None:
        """Check ``client_id``'s answer to ``step`` completely, then give it to the
        round's state machine. ``body`` is the JSON object, or the safetensors bytes
        of a masked input; ``size`` its length in bytes.

        Raises:
            ServiceError: as :meth:`secure_step`; 409 another step is open, or a
                second answer; 400 a malformed body; 422 a message the protocol
                refuses. The round is unchanged then.
        """
        with self._lock:
            sec = self._current(client_id, rnd)
            if sec.step != step or sec.closing:
                raise ServiceError(
                    f"round {rnd} is collecting {STEP_NAMES[sec.step]}"
                    f"{' (closing)' if sec.closing else ''}, not {STEP_NAMES[step]}",
                    409,
                )
            if client_id in sec.answered:
                raise ServiceError(
                    f"client {client_id} already answered {STEP_NAMES[step]} in "
                    f"round {rnd}",
                    409,
                )
            if client_id not in sec.outbox:
                raise self._out(sec, client_id)
            cfg = sec.server.config
            try:
                if step is Step.MASKED_INPUT:
                    data = masked_input_message(
                        rnd, client_id, cfg.bits, cfg.length, body
                    )
                else:
                    data = client_message(_JSON_KINDS[step], rnd, client_id, body)
            except MessageError as exc:
                raise ServiceError(
                    f"malformed {STEP_NAMES[step]}: {exc}", 400
                ) from None
            try:
                sec.server.check(client_id, data)
            except MessageError as exc:
                raise ServiceError(f"{STEP_NAMES[step]} refused: {exc}", 422) from None
            accepted = sec.server.receive(client_id, data)
            assert accepted, "check passed, so receive accepts"
            sec.answered.add(client_id)
            sec.bytes_up += size
            cur = self._round
            if step is Step.ADVERTISE_KEYS and cur is not None:
                cur.accepted.add(client_id)  # no task for it any more
                sec.bytes_down += len(cur.model)  # it downloaded the model
            self._lock.notify_all()
        logger.info("round %d: client %d answered %s", rnd, client_id, STEP_NAMES[step])

    def status(self) -> dict[str, Any]:
        """As :meth:`FederatedServer.status`, with the open round's secure
        aggregation step and how many clients answered it."""
        out = super().status()
        with self._lock:
            sec = self._secure
            if sec is not None and out["open_round"] is not None:
                out["open_round"]["secagg_step"] = STEP_NAMES[sec.step]
                out["open_round"]["secagg_answered"] = len(sec.answered)
                out["open_round"]["secagg_dropped"] = len(sec.server.dropped)
        return out

    # --- the round loop ----------------------------------------------------------
    def run_round(self, algorithm: FederatedAlgorithm, rnd: int) -> RoundStats:
        """Open round ``rnd``, run the four steps with their deadlines, then
        aggregate the unmasked sum or fail the round.

        Raises:
            BudgetExceededError: from ``configure_round``; nothing is opened.
            RoundFailedError: the protocol aborted and ``on_failed_round =
                "stop"``, or the server was stopped mid-round.
        """
        if algorithm is not self.algorithm:
            raise ConfigError("run_round must be given the server's own algorithm")
        start = time.perf_counter()
        cur = self._open(rnd)
        invited = tuple(sorted(cur.tasks))
        secure: Any = self.algorithm
        if len(invited) < 2:
            return self._small_round(rnd, invited, start)
        plan = secure.secure_plan(len(invited))
        sa = SecAggServer(
            rnd, invited, plan.length, plan.bits, plan.threshold, plan.neighbours
        )
        config = server_json(sa.round_config())
        sec = _SecureRound(
            rnd,
            sa,
            invited,
            Step.ADVERTISE_KEYS,
            cur.deadline,
            dict.fromkeys(invited, config),
        )
        with self._lock:
            self._secure = sec
        logger.info(
            "round %d: secure aggregation of %d clients (k=%d, t=%d)",
            rnd,
            len(invited),
            plan.neighbours,
            plan.threshold,
        )
        try:
            total = self._steps(sec)
        except RoundAbortedError as exc:
            secure.note_aborted(rnd)
            self._fail(rnd, f"secure aggregation aborted: {exc}")
            return self._stats(sec, 0, start)
        finally:
            with self._lock:
                cur.closed = True
                self._secure = None
        included = sa.included
        self._commit(
            rnd, lambda: secure.aggregate_sum(rnd, total, included, len(invited))
        )
        return self._stats(sec, len(included), start)

    def _steps(self, sec: _SecureRound) -> np.ndarray:
        """Advertise keys, share keys, masked input, unmasking; the sum."""
        sa = sec.server
        self._collect(sec)
        with self._lock:
            if self._round is not None:
                self._round.closed = True  # no more tasks or model downloads
        self._next_step(sec, Step.SHARE_KEYS, sa.finish_advertise_keys)
        self._collect(sec)
        self._next_step(sec, Step.MASKED_INPUT, sa.finish_share_keys)
        self._collect(sec)
        self._next_step(sec, Step.UNMASKING, sa.finish_masked_input)
        self._collect(sec)
        return sa.finish_unmasking()

    def _collect(self, sec: _SecureRound) -> None:
        """Wait until every expected client answered the step, or its deadline;
        then close the step to requests."""
        with self._lock:
            while sec.answered < sec.expected() and not self.finished:
                left = sec.deadline - time.time()
                if left <= 0:
                    break
                self._lock.wait(min(left, 1.0))
            sec.closing = True
            if self.finished:  # stopped: the restarted server fails the round
                raise RoundFailedError(
                    f"round {sec.round} interrupted: the server stopped"
                )
        missing = sorted(sec.expected() - sec.answered)
        logger.info(
            "round %d: %s closed, %d answered, silent %s",
            sec.round,
            STEP_NAMES[sec.step],
            len(sec.answered),
            missing,
        )

    def _next_step(
        self, sec: _SecureRound, step: Step, finish: Callable[[], dict[int, bytes]]
    ) -> None:
        """Close the step in the state machine and open ``step`` with its
        messages (the machine is used outside the lock: requests see ``closing``)."""
        outbox = {c: server_json(m) for c, m in finish().items()}
        with self._lock:
            sec.step, sec.outbox = step, outbox
            sec.answered, sec.fetched = set(), set()
            sec.deadline = time.time() + self.step_timeout
            sec.closing = False
            self._lock.notify_all()

    def _small_round(
        self, rnd: int, invited: tuple[int, ...], start: float
    ) -> RoundStats:
        """A round of fewer than 2 clients: none is aggregated as the algorithm
        aggregates an empty round; one is refused (its sum would be its input)."""
        with self._lock:
            if self._round is not None:
                self._round.closed = True
        if not invited:
            self._commit(rnd, lambda: self.algorithm.aggregate(rnd, []))
            return RoundStats(rnd, 0, 0, 0, math.nan, time.perf_counter() - start)
        secure: Any = self.algorithm
        secure.note_aborted(rnd)
        self._fail(
            rnd,
            "a secure sum needs at least 2 clients (the sum of one is its input), "
            "got 1",
        )
        return RoundStats(rnd, 0, 0, 0, math.nan, time.perf_counter() - start)

    def _commit(self, rnd: int, apply: Callable[[], None]) -> None:
        """Apply the round to the algorithm, checkpoint, and commit the round with
        its privacy events (as :class:`FederatedServer` does for plain rounds)."""
        ledger = ledger_of(self.algorithm)
        before = ledger.events if ledger is not None else ()
        apply()
        after = ledger.events if ledger is not None else ()
        events = [e.to_dict() for e in new_events(before, after)]
        name = self.store.write_checkpoint(rnd, *checkpoint_of(self.algorithm, rnd))
        self.store.finish_round(rnd, name, events)
        self.store.prune_checkpoints(name)
        logger.info("round %d: aggregated securely", rnd)

    def _stats(self, sec: _SecureRound, clients: int, start: float) -> RoundStats:
        """Bytes up: every answer's body; down: the model to each client that
        advertised keys, plus every server message fetched (JSON). The server
        never sees a loss, so ``train_loss`` is NaN."""
        seconds = time.perf_counter() - start
        secure: Any = self.algorithm
        secure.note_traffic(sec.bytes_up, sec.bytes_down, clients)
        return RoundStats(
            sec.round, clients, sec.bytes_up, sec.bytes_down, math.nan, seconds
        )
