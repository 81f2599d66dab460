"""DP-FedAvg with distributed noise under secure aggregation
(``dp_fedavg.secure_aggregation = true``, ``placement = "distributed"``).

Each sampled client trains, clips its update to ``S`` and adds its noise share
``N(0, (z S)^2 / n)`` exactly as in plain distributed DP-FedAvg
(:meth:`veil.learning.DPFedAvg.client_fit`). Its input to secure aggregation
(:func:`veil.secagg.secure_sum`) is then the vector

    [clip(u_k + e_k, r) / r,  clip(b_k, r_b) / r_b],

fixed-point encoded in ``[-1, 1]`` for the round's clients, where ``b_k`` is the
client's centred, noised unclipped indicator (the last coordinate exists only with
adaptive clipping). The server learns only the sum of the included clients' inputs:
it unmasks, decodes, tops up the noise of sampled clients whose input is not in the
sum (dropouts, as plain distributed DP-FedAvg does), divides by ``q N`` and takes its
step. The ledger records the same Gaussian event as without secure aggregation.
In the simulation runtime the clients' encoding and protocol steps run inside
``aggregate``, each on its own client's result only; messages travel as bytes.

Ranges: ``r`` is ``[secagg] clip_range`` when set, else ``S + 6 s`` per round (``s``
the client's noise std), which covers any clipped coordinate (``|u_i| <= S``) plus
six standard deviations of noise; ``r_b = 1/2 + 6 s_b``. A coordinate beyond its range
is clipped to it *after* the noise was added: post-processing of the client's own
output, so the DP guarantee is unchanged; it only biases the sum. Rounding adds at
most ``n * step / 2`` per coordinate of the sum (``step = 2 r / levels``,
``levels = (2**bits - 1) // n``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from veil.errors import ConfigError, RoundAbortedError, SecAggError
from veil.experiment._secagg import SecurePlan, round_graph, simulated_dropouts
from veil.experiment.config import ExperimentConfig, SecAggConfig
from veil.learning import ClientResult, DPFedAvg, StateDict
from veil.learning._types import ClientTask
from veil.learning.dp_fedavg import UNCLIPPED, RoundRecord
from veil.learning.user_dp import NoisePlacement, add_noise
from veil.secagg import FixedPoint, SecureSum, secure_sum

__all__ = [
    "COUNT_RANGE",
    "RANGE_SIGMAS",
    "UPDATE_RANGE",
    "SecureDPFedAvg",
    "secure_dp_fedavg",
]

logger = logging.getLogger(__name__)

#: Standard deviations of a client's noise share that the default ranges leave room
#: for beyond the clipped value.
RANGE_SIGMAS = 6.0
#: Task settings carrying the round's encoding ranges ``r`` and ``r_b``.
UPDATE_RANGE = "secagg_update_range"
COUNT_RANGE = "secagg_count_range"


@dataclasses.dataclass
class SecureDPFedAvg(DPFedAvg):
    """Distributed DP-FedAvg whose server sees only the sum of the noised updates.

    Attributes (beyond :class:`~veil.learning.DPFedAvg`'s):
        secagg: the ``[secagg]`` settings (threshold, neighbours, bits,
            dropout_rate).
        clip_range: ``r``, the encoding range of an update coordinate; ``None``
            (default): ``S + 6 s`` per round.
        last_included: the clients in the last secure sum.
    """

    secagg: SecAggConfig = dataclasses.field(default_factory=SecAggConfig)
    clip_range: float | None = None
    last_included: tuple[int, ...] = dataclasses.field(default=(), init=False)
    _totals: dict[str, float] = dataclasses.field(
        default_factory=dict, init=False, repr=False
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if NoisePlacement(self.placement) is not NoisePlacement.DISTRIBUTED:
            raise ConfigError(
                "dp_fedavg.secure_aggregation needs placement = 'distributed' (the "
                f"clients add the noise before masking), got {self.placement!r}"
            )
        if self.clip_range is not None and not self.clip_range > 0:
            raise ConfigError(f"clip_range must be > 0, got {self.clip_range}")
        self.encoder(self.num_clients)  # refuses a bits too small for the sum
        for name, t in self.global_state.items():
            if not t.is_floating_point():
                raise ConfigError(
                    f"secure aggregation sums floating-point tensors only; tensor "
                    f"{name!r} is {t.dtype}"
                )

    # ---- encoding (what each client does before masking) -----------------------

    def ranges(self, rnd: int) -> tuple[float, float]:
        """``(r, r_b)``: encoding ranges of an update coordinate and of the
        indicator in round ``rnd`` (public: from ``S`` and the noise plan)."""
        plan = self.noise_plan(self._sampled.get(rnd, 0))
        r = self.clipping_norm + RANGE_SIGMAS * plan.client_update_std
        return self.clip_range or r, 0.5 + RANGE_SIGMAS * plan.client_count_std

    def encoder(self, count: int) -> FixedPoint:
        """The fixed-point code of ``[-1, 1]`` for a sum of ``count`` inputs."""
        try:
            return FixedPoint(1.0, self.secagg.bits, max(count, 1))
        except SecAggError as exc:
            raise ConfigError(f"'secagg.bits': {exc}") from None

    def configure_round(self, rnd: int) -> list[ClientTask]:
        """DP-FedAvg's tasks, each also carrying the round's public encoding ranges
        ``(r, r_b)`` (:data:`UPDATE_RANGE`, :data:`COUNT_RANGE`), so a device
        encodes exactly as the server decodes."""
        tasks = super().configure_round(rnd)
        r, r_b = self.ranges(rnd)
        for task in tasks:
            task.settings[UPDATE_RANGE], task.settings[COUNT_RANGE] = r, r_b
        return tasks

    @staticmethod
    def task_ranges(settings: dict[str, float]) -> tuple[float, float]:
        """``(r, r_b)`` as a task carries them (equal to :meth:`ranges`)."""
        try:
            return settings[UPDATE_RANGE], settings[COUNT_RANGE]
        except KeyError:
            raise ConfigError(
                f"a secure DP-FedAvg task must carry {UPDATE_RANGE!r} and "
                f"{COUNT_RANGE!r}; got settings {sorted(settings)}"
            ) from None

    def client_values(self, rnd: int, result: ClientResult) -> np.ndarray:
        """The client's vector before encoding: its clipped, noised update over
        ``r`` (then the indicator over ``r_b`` with adaptive clipping), every entry
        clipped to ``[-1, 1]`` (float64)."""
        return self._values(result, *self.ranges(rnd))

    def _values(self, result: ClientResult, r: float, r_b: float) -> np.ndarray:
        flat = torch.cat(
            [
                result.update[n].detach().to(torch.float64).flatten()
                for n in self.global_state
            ]
        ).numpy()
        values = flat / r
        if self.adaptive is not None:
            values = np.append(values, result.metrics[UNCLIPPED] / r_b)
        return np.clip(values, -1.0, 1.0)

    # ---- server side ------------------------------------------------------------

    def secure_total(
        self, rnd: int, results: Sequence[ClientResult]
    ) -> tuple[StateDict, float, int]:
        """Securely sum the clients' inputs; return the decoded update sum, the
        summed indicator (0 without adaptive clipping) and the clients in the sum.

        Raises:
            RoundAbortedError: too few clients remained for the protocol.
        """
        total = {
            name: torch.zeros_like(t, dtype=torch.float64)
            for name, t in self.global_state.items()
        }
        if not results:
            self.last_included = ()
            return total, 0.0, 0
        if len(results) == 1:
            raise RoundAbortedError(
                "a secure sum needs at least 2 clients (the sum of one is its "
                "input); the round is not aggregated"
            )
        fp = self.encoder(len(results))
        inputs = {r.client_id: fp.encode(self.client_values(rnd, r)) for r in results}
        k, t = round_graph(self.secagg, len(inputs))
        dropouts = simulated_dropouts(self.secagg, self.seed, rnd, sorted(inputs))
        result = secure_sum(
            inputs, self.secagg.bits, threshold=t, neighbours=k, round=rnd,
            dropouts=dropouts,
        )  # fmt: skip
        self._record(result)
        total, count = self.decode_total(rnd, result.total, len(result.included), fp)
        return total, count, len(result.included)

    def decode_total(
        self, rnd: int, code_sum: np.ndarray, included: int, fp: FixedPoint
    ) -> tuple[StateDict, float]:
        """The update sum (float64 tensors) and the summed indicator (0 without
        adaptive clipping) from the unmasked sum of ``included`` inputs."""
        sums = fp.decode_sum(code_sum, included)
        r, r_b = self.ranges(rnd)
        flat, offset, total = torch.from_numpy(sums * r), 0, {}
        for name, ref in self.global_state.items():
            size = ref.numel()
            total[name] = flat[offset : offset + size].reshape(ref.shape).clone()
            offset += size
        count = float(sums[-1] * r_b) if self.adaptive is not None else 0.0
        return total, count

    def aggregate(self, rnd: int, results: Sequence[ClientResult]) -> None:
        """Securely sum the noised updates, top up dropped clients' noise, divide by
        ``q N``, take the server step, record the round and adapt ``S``.

        A round aborted by the protocol, or with a single result (whose sum would
        be that client's input), releases nothing: the model, ``S`` and the ledger
        are left unchanged.

        Raises:
            UpdateError: a result from another round or a malformed update; nothing
                changes.
        """
        self._check_results(rnd, results)
        try:
            total, count, included = self.secure_total(rnd, results)
        except RoundAbortedError as exc:
            logger.warning("dp-fedavg round %d not aggregated: %s", rnd, exc)
            self.note_aborted(rnd)
            return
        self._apply_total(rnd, total, count, included, len(results))

    def _apply_total(
        self, rnd: int, total: StateDict, count: float, included: int, invited: int
    ) -> None:
        used_norm = self.clipping_norm
        update_std, count_std = self._server_noise(rnd, included)
        total = add_noise(total, update_std, self._noise(rnd, 0))
        mean = {name: t / self.expected_clients for name, t in total.items()}
        self._server_step(mean)
        self.ledger.record(self.round_event())
        unclipped = math.nan
        if self.adaptive is not None:
            unclipped = self._adapt_to_count(rnd, count, count_std)
        self.history.append(RoundRecord(rnd, included, used_norm, unclipped, math.nan))
        logger.info(
            "dp-fedavg round %d: securely summed %d of %d updates", rnd, included,
            invited,
        )  # fmt: skip

    # ---- the network runtime's hooks (veil.network.secagg) -----------------------

    def secure_plan(self, invited: int) -> SecurePlan:
        """The protocol parameters of a round that invites ``invited`` clients."""
        k, t = round_graph(self.secagg, invited)
        length = sum(p.numel() for p in self.global_state.values())
        length += 1 if self.adaptive is not None else 0
        return SecurePlan(self.secagg.bits, length, k, t)

    def secure_input(
        self, task: ClientTask, result: ClientResult, invited: int
    ) -> np.ndarray:
        """A device's encoded input for ``task``, equal to what :meth:`aggregate`
        encodes in simulation for a round of ``invited`` clients."""
        values = self._values(result, *self.task_ranges(task.settings))
        return self.encoder(invited).encode(values)

    def aggregate_sum(
        self, rnd: int, total: np.ndarray, included: Sequence[int], invited: int
    ) -> None:
        """Decode ``total``, the unmasked sum of the inputs of ``included`` in a
        round that invited ``invited`` clients, and apply it exactly as
        :meth:`aggregate` does (noise top-up, server step, ledger, ``S``)."""
        fp = self.encoder(invited)
        update, count = self.decode_total(rnd, total, len(included), fp)
        self._totals["secagg_clients"] = len(included)
        dropped = self._totals.get("secagg_dropped", 0) + invited - len(included)
        self._totals["secagg_dropped"] = dropped
        self.last_included = tuple(sorted(included))
        self._apply_total(rnd, update, count, len(included), invited)

    def note_aborted(self, rnd: int) -> None:
        """Count a round whose protocol aborted (nothing released)."""
        self._totals["secagg_aborted"] = self._totals.get("secagg_aborted", 0) + 1

    def note_traffic(self, bytes_up: int, bytes_down: int, included: int) -> None:
        """Count a network round's protocol bytes."""
        t = self._totals
        t["secagg_bytes_up"] = t.get("secagg_bytes_up", 0) + bytes_up
        t["secagg_bytes_down"] = t.get("secagg_bytes_down", 0) + bytes_down

    # ---- metrics ----------------------------------------------------------------

    def _record(self, result: SecureSum) -> None:
        t = self._totals
        dropped = len(result.dropped) + len(result.refused)
        for key, value in (
            ("secagg_bytes_up", sum(result.bytes_up.values())),
            ("secagg_bytes_down", sum(result.bytes_down.values())),
            ("secagg_dropped", dropped),
        ):
            t[key] = t.get(key, 0) + value
        t["secagg_clients"] = len(result.included)
        self.last_included = result.included

    def take_metrics(self) -> dict[str, Any]:
        """Secure aggregation metrics since the last call."""
        totals, self._totals = self._totals, {}
        keys = ("bytes_up", "bytes_down", "clients", "dropped", "aborted")
        return {f"secagg_{k}": int(totals.get(f"secagg_{k}", 0)) for k in keys}


def secure_dp_fedavg(base: DPFedAvg, config: ExperimentConfig) -> SecureDPFedAvg:
    """``base`` (a configured DP-FedAvg) with secure aggregation from
    ``config.secagg``; ``clip_range`` only when the ``[secagg]`` section sets it."""
    s = config.secagg
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(DPFedAvg)}
    clip_range = s.clip_range if "clip_range" in s.model_fields_set else None
    return SecureDPFedAvg(**fields, secagg=s, clip_range=clip_range)
