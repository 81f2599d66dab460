"""FedAvg with secure aggregation in ``veil run`` (``fedavg.secure_aggregation``).

The server gets only the sum of the round's clipped, weighted updates
(:mod:`veil.secagg`). FedAvg weights update ``u_k`` by the client's example count
``n_k``; to keep that inside the sum each client sends the vector

    [w_k * clip(u_k, r) / r,  w_k],    w_k = n_k / max_examples,

every entry in [-1, 1], fixed-point encoded modulo ``2**bits`` for the round's
clients. The server decodes the two sums and applies
``r * sum_k w_k clip(u_k) / r / sum_k w_k``: FedAvg's weighted mean over the clients
whose input reached the sum, up to clipping at ``r = secagg.clip_range`` and the
quantisation step.

In the simulation runtime the protocol's client steps run inside ``aggregate``, each
on its own client's result only; messages travel as bytes, exactly as they would over
the network. Simulated dropouts are drawn from the run's seed. A round that falls
below the threshold is not aggregated (the global model is kept) and counted in
``secagg_aborted``. Metrics per evaluation: ``secagg_bytes_up`` and
``secagg_bytes_down`` (every protocol message, masked vectors included: what clients
send and receive instead of plain updates), ``secagg_expansion`` (secagg bytes up,
dropped clients' messages included, over the plain bytes of the updates that reached
the sum), ``secagg_clients`` (inputs in the last sum),
``secagg_dropped``, ``secagg_aborted`` and ``secagg_seconds``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from veil._seeding import numpy_rng
from veil.errors import ConfigError, RoundAbortedError, SecAggError, UpdateError
from veil.experiment.config import ExperimentConfig, SecAggConfig
from veil.learning import ClientResult, FedAvg, StateDict, check_update, encoded_size
from veil.learning._types import ClientTask
from veil.secagg import (
    FixedPoint,
    SecureSum,
    Step,
    choose_degree,
    secure_sum,
    threshold_for,
)

__all__ = [
    "SecureFedAvg",
    "SecurePlan",
    "round_graph",
    "secure_fedavg",
    "simulated_dropouts",
]

logger = logging.getLogger(__name__)

# Random stream of simulated dropouts, well clear of veil._seeding.Stream's numbers.
_DROPOUT_STREAM = 1001


@dataclasses.dataclass(frozen=True)
class SecurePlan:
    """The protocol parameters of one secure round, public to every party.

    Attributes:
        bits: width b of the modulus ``2**b``.
        length: elements of every client's input vector.
        neighbours: k for SecAgg+; 0 for the full graph.
        threshold: t, shares needed to reconstruct a client's secret.
    """

    bits: int
    length: int
    neighbours: int
    threshold: int


@dataclasses.dataclass
class SecureFedAvg(FedAvg):
    """FedAvg whose server sees only the sum of the clients' weighted updates.

    Attributes (beyond :class:`~veil.learning.FedAvg`'s):
        secagg: the ``[secagg]`` settings.
        max_examples: public bound on a client's example count (weights are
            ``n_k / max_examples``), >= 1.
    """

    secagg: SecAggConfig = dataclasses.field(default_factory=SecAggConfig)
    max_examples: int = 1
    encoder: FixedPoint = dataclasses.field(init=False, repr=False)
    last_included: tuple[int, ...] = dataclasses.field(default=(), init=False)
    _totals: dict[str, float] = dataclasses.field(
        default_factory=dict, init=False, repr=False
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, t in self.global_state.items():
            if not t.is_floating_point():
                raise ConfigError(
                    f"secure aggregation sums floating-point tensors only; tensor "
                    f"{name!r} is {t.dtype}"
                )
        if self.clients_per_round < 2:
            raise ConfigError(
                "secure aggregation needs at least 2 clients per round (the sum of "
                f"one is its update), got {self.clients_per_round}; raise "
                "fedavg.client_fraction"
            )
        if self.max_examples < 1:
            raise ConfigError(f"max_examples must be >= 1, got {self.max_examples}")
        try:
            self.encoder = FixedPoint(1.0, self.secagg.bits, self.clients_per_round)
        except SecAggError as exc:
            raise ConfigError(f"'secagg.bits': {exc}") from None

    # ---- client side ----------------------------------------------------------

    def client_values(self, result: ClientResult) -> np.ndarray:
        """The client's vector before encoding: weighted, clipped update over the
        clip range, then the weight; every entry in [-1, 1] (float64)."""
        if not 0 < result.num_examples <= self.max_examples:
            raise UpdateError(
                f"client {result.client_id}: num_examples must be in "
                f"[1, {self.max_examples}] (secagg.max_examples), got "
                f"{result.num_examples}"
            )
        r = self.secagg.clip_range
        w = result.num_examples / self.max_examples
        flat = torch.cat(
            [
                result.update[n].detach().to(torch.float64).flatten()
                for n in self.global_state
            ]
        ).numpy()
        return np.append(w * np.clip(flat, -r, r) / r, w)

    def client_input(self, result: ClientResult) -> np.ndarray:
        """The client's encoded input (what it masks): :meth:`client_values`,
        fixed-point encoded. DP-FedAvg's distributed noise would be added here."""
        return self.encoder.encode(self.client_values(result))

    # ---- server side ----------------------------------------------------------

    def _dropouts(self, rnd: int, clients: Sequence[int]) -> dict[Step, list[int]]:
        return simulated_dropouts(self.secagg, self.seed, rnd, clients)

    def _graph(self, m: int) -> tuple[int, int]:
        return round_graph(self.secagg, m)

    def mean_update(self, result: SecureSum) -> StateDict:
        """FedAvg's weighted mean update from the unmasked sum."""
        return self.mean_of_sum(result.total, len(result.included))

    def mean_of_sum(self, total: np.ndarray, count: int) -> StateDict:
        """FedAvg's weighted mean update from ``total``, the unmasked sum of
        ``count`` clients' encoded inputs (1-D, the inputs' unsigned type)."""
        sums = self.encoder.decode_sum(total, count)
        weight = sums[-1]
        if weight <= 0:
            raise UpdateError(f"the weights in the secure sum add to {weight}, not > 0")
        flat = torch.from_numpy(sums[:-1] * (self.secagg.clip_range / weight))
        mean, offset = {}, 0
        for name, ref in self.global_state.items():
            size = ref.numel()
            mean[name] = flat[offset : offset + size].reshape(ref.shape).to(ref.dtype)
            offset += size
        return mean

    def aggregate(self, rnd: int, results: Sequence[ClientResult]) -> None:
        """Securely sum the clients' inputs and apply the weighted mean update.

        Raises:
            UpdateError: a result from another round or of the wrong shape; the
                global model is left unchanged.
        """
        for r in results:
            if r.round != rnd:
                raise UpdateError(
                    f"client {r.client_id} sent an update for round {r.round} "
                    f"during round {rnd}"
                )
            check_update(r.update, self.global_state, who=f"client {r.client_id}")
        inputs = {r.client_id: self.client_input(r) for r in results}
        k, t = self._graph(len(inputs))
        try:
            result = secure_sum(
                inputs,
                self.secagg.bits,
                threshold=t,
                neighbours=k,
                round=rnd,
                dropouts=self._dropouts(rnd, sorted(inputs)),
            )
        except RoundAbortedError as exc:
            logger.warning("round %d not aggregated: %s", rnd, exc)
            self._add("secagg_aborted", 1)
            self._add("secagg_bytes_up", exc.bytes_up)
            self._add("secagg_bytes_down", exc.bytes_down)
            return
        self.apply_mean(self.mean_update(result))
        self._record(result)
        logger.info(
            "round %d: securely aggregated %d of %d updates (k=%d, t=%d)",
            rnd,
            len(result.included),
            len(results),
            k,
            t,
        )

    # ---- the network runtime's hooks (veil.network.secagg) ---------------------

    def secure_plan(self, invited: int) -> SecurePlan:
        """The protocol parameters of a round that invites ``invited`` clients."""
        k, t = self._graph(invited)
        length = sum(p.numel() for p in self.global_state.values()) + 1
        return SecurePlan(self.secagg.bits, length, k, t)

    def secure_input(
        self, task: ClientTask, result: ClientResult, invited: int
    ) -> np.ndarray:
        """A device's encoded input for ``task`` (the same as in simulation)."""
        return self.client_input(result)

    def aggregate_sum(
        self, rnd: int, total: np.ndarray, included: Sequence[int], invited: int
    ) -> None:
        """Apply the mean update from ``total``, the unmasked sum of the inputs of
        ``included`` (the network server's secure round; the model changes exactly
        as :meth:`aggregate` changes it for the same sum)."""
        self.apply_mean(self.mean_of_sum(total, len(included)))
        self._totals["secagg_clients"] = len(included)
        self._add("secagg_dropped", invited - len(included))
        self.last_included = tuple(sorted(included))
        logger.info(
            "round %d: securely aggregated %d of %d inputs over the network",
            rnd,
            len(included),
            invited,
        )

    def note_aborted(self, rnd: int) -> None:
        """Count a round whose protocol aborted (the model is unchanged)."""
        self._add("secagg_aborted", 1)

    def note_traffic(self, bytes_up: int, bytes_down: int, included: int) -> None:
        """Count a network round's protocol bytes (``included`` inputs summed)."""
        self._add("secagg_bytes_up", bytes_up)
        self._add("secagg_bytes_down", bytes_down)
        self._add("secagg_plain_bytes", included * encoded_size(self.global_state))

    # ---- metrics --------------------------------------------------------------

    def _add(self, key: str, value: float) -> None:
        self._totals[key] = self._totals.get(key, 0) + value

    def _record(self, result: SecureSum) -> None:
        self._add("secagg_bytes_up", sum(result.bytes_up.values()))
        self._add("secagg_bytes_down", sum(result.bytes_down.values()))
        self._add("secagg_dropped", len(result.dropped) + len(result.refused))
        self._add(
            "secagg_seconds",
            result.server_seconds + sum(result.client_seconds.values()),
        )
        self._totals["secagg_clients"] = len(result.included)
        update_bytes = encoded_size(self.global_state)  # one plain update
        self._add("secagg_plain_bytes", len(result.included) * update_bytes)
        self.last_included = result.included

    def take_metrics(self) -> dict[str, Any]:
        """The secure aggregation metrics since the last call."""
        totals, self._totals = self._totals, {}
        out: dict[str, Any] = {
            "secagg_bytes_up": int(totals.get("secagg_bytes_up", 0)),
            "secagg_bytes_down": int(totals.get("secagg_bytes_down", 0)),
            "secagg_clients": int(totals.get("secagg_clients", 0)),
            "secagg_dropped": int(totals.get("secagg_dropped", 0)),
            "secagg_aborted": int(totals.get("secagg_aborted", 0)),
            "secagg_seconds": float(totals.get("secagg_seconds", 0.0)),
        }
        plain = totals.get("secagg_plain_bytes", 0)
        out["secagg_expansion"] = out["secagg_bytes_up"] / plain if plain else math.nan
        return out


def simulated_dropouts(
    secagg: SecAggConfig, seed: int, rnd: int, clients: Sequence[int]
) -> dict[Step, list[int]]:
    """Which of ``clients`` drop out before which step of round ``rnd``: each with
    probability ``secagg.dropout_rate``, at a step drawn uniformly (from ``seed``)."""
    rng = numpy_rng(seed, _DROPOUT_STREAM, rnd)
    plan: dict[Step, list[int]] = {s: [] for s in Step}
    for c in clients:
        leaves, step = rng.random() < secagg.dropout_rate, rng.integers(1, 5)
        if leaves:
            plan[Step(int(step))].append(c)
    return plan


def round_graph(secagg: SecAggConfig, m: int) -> tuple[int, int]:
    """(k, t) for a round of ``m`` clients: k = 0 for the full graph."""
    setting = secagg.neighbours
    if setting == "full":
        k = 0
    elif setting == "auto":
        k = choose_degree(m, secagg.dropout_rate, secagg.threshold)
    else:
        k = int(setting) if int(setting) < m - 1 else 0
    holders = m if k == 0 else k + 1
    return k, threshold_for(holders, secagg.threshold)


def secure_fedavg(
    base: FedAvg, config: ExperimentConfig, client_indices: Sequence[np.ndarray]
) -> SecureFedAvg:
    """``base`` (a configured FedAvg) turned secure with ``config.secagg``."""
    s = config.secagg
    largest = max(len(idx) for idx in client_indices)
    if s.max_examples is not None and s.max_examples < largest:
        raise ConfigError(
            f"'secagg.max_examples' must be >= the largest client's example count "
            f"{largest}, got {s.max_examples}"
        )
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(FedAvg)}
    return SecureFedAvg(**fields, secagg=s, max_examples=s.max_examples or largest)
