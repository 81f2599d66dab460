"""Distributed selective SGD with a global parameter server (Shokri & Shmatikov 2015).

Clients train on their own data and share only a small part of what they learn.
The server keeps the global parameters (one flat vector of ``P`` values) and, for
each parameter, how often an upload has changed it. A client's *turn*:

1. download: the fraction ``download_fraction`` (θd) of the global parameters that
   were updated most since the client last downloaded them (all of them at θd = 1),
   written into the client's own local parameters;
2. train: local SGD on the client's data (one epoch, or a set number of
   mini-batches), from its local parameters;
3. upload: the change of its parameters against what it had after the download,
   for ``ceil(upload_fraction * P)`` parameters (θu), chosen as the largest in
   magnitude or at random among those above a threshold τ; the server adds the
   values to the global parameters and counts one update for each.

Everything travels as a :class:`SparseVector` (indices + values; the indices are left
out when every parameter is sent), encoded by :func:`encode_sparse` into safetensors
bytes whose length is the exact traffic.

Differential privacy as in the paper (:class:`SelectiveDP`): uploaded values are
truncated to ``[-γ, γ]`` and both the choice of parameters and their values are
released through the sparse vector technique with Laplace noise (Lyu, Su and Li 2017,
Algorithm 1, with numeric answers). The paper states its budget per *uploaded
parameter*; one upload of ``c`` parameters spends ``c`` times that, and a client
spends it again at every upload. Each upload is recorded in the client's
:class:`~veil.privacy.PrivacyLedger` (see :func:`upload_events` for exactly what).

The classes here do no I/O and start no threads: a driver (``veil.experiment._dssgd``
today; a Ray or network runtime later) decides where turns run. The server is safe to
call from several threads: each download and each upload is applied atomically.
"""

from __future__ import annotations

import json
import math
import os
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import torch
from safetensors.torch import load, save
from torch import nn

from veil._seeding import derive_seed, numpy_rng
from veil.errors import ConfigError, UpdateError
from veil.learning._types import StateDict
from veil.learning.local import LocalTrainer
from veil.privacy import InsecureNoiseWarning, PrivacyEvent, PrivacyLedger

__all__ = [
    "ORDERS",
    "SELECTIONS",
    "SPARSE_FORMAT",
    "DSSGDClient",
    "DSSGDSettings",
    "Download",
    "GeneratorLaplace",
    "LaplaceNoise",
    "ParameterServer",
    "SecureLaplace",
    "SelectiveDP",
    "ServerState",
    "SparseVector",
    "Upload",
    "decode_sparse",
    "dominating_laplace_epsilon",
    "download_tie_break",
    "encode_sparse",
    "flatten",
    "select_above_threshold",
    "select_largest",
    "sparse_vector_technique",
    "turn_order",
    "turn_seed",
    "unflatten",
    "upload_count",
    "upload_events",
]

#: Participant orders: every client once per round, in client order
#: (``round_robin``), in a fresh random order each round (``random``), or all at
#: once on concurrent workers (``async``).
ORDERS = ("round_robin", "random", "async")
#: How a client chooses the parameters it uploads.
SELECTIONS = ("largest", "threshold")
#: ``format`` metadata of an encoded :class:`SparseVector`.
SPARSE_FORMAT = "veil.sparse/1"

# Random streams of DSSGD, below one key of their own so that they never meet the
# streams of :class:`veil._seeding.Stream`.
_STREAM = 0xD55
_TURN, _ORDER = 0, 1


# --------------------------------------------------------------------------------
# Flat parameter vectors
# --------------------------------------------------------------------------------


def flatten(state: StateDict) -> torch.Tensor:
    """All tensors of ``state``, in its order, as one float32 vector."""
    return torch.cat([t.detach().reshape(-1).to(torch.float32) for t in state.values()])


def unflatten(vector: torch.Tensor, like: StateDict) -> StateDict:
    """The inverse of :func:`flatten`: tensors shaped and typed as ``like``."""
    total = sum(t.numel() for t in like.values())
    if vector.numel() != total:
        raise UpdateError(
            f"vector must hold {total} values for this model, got {vector.numel()}"
        )
    out: StateDict = {}
    start = 0
    for name, t in like.items():
        out[name] = vector[start : start + t.numel()].reshape(t.shape).to(t.dtype)
        start += t.numel()
    return out


# --------------------------------------------------------------------------------
# Sparse encoding
# --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SparseVector:
    """Some entries of a vector of ``size`` values.

    Attributes:
        size: length ``P`` of the full vector, >= 1.
        indices: int64 positions, strictly increasing, in ``[0, size)``; ``None``
            means every position, in order (a dense vector).
        values: float32 values, one per index (``size`` of them when dense).
    """

    size: int
    indices: torch.Tensor | None
    values: torch.Tensor

    @property
    def count(self) -> int:
        """How many entries are carried."""
        return self.values.numel()

    def positions(self) -> torch.Tensor:
        """The indices, spelled out also for a dense vector."""
        if self.indices is None:
            return torch.arange(self.size)
        return self.indices

    def check(self) -> None:
        """Refuse an inconsistent vector (:class:`UpdateError`)."""
        if self.size < 1:
            raise UpdateError(f"sparse vector size must be >= 1, got {self.size}")
        if self.values.dim() != 1 or self.values.dtype != torch.float32:
            raise UpdateError(
                "sparse vector values must be a 1-d float32 tensor, got "
                f"{self.values.dtype} of shape {tuple(self.values.shape)}"
            )
        if not bool(torch.isfinite(self.values).all()):
            raise UpdateError("sparse vector values hold NaN or Inf")
        if self.indices is None:
            if self.count != self.size:
                raise UpdateError(
                    f"a dense vector must hold {self.size} values, got {self.count}"
                )
            return
        idx = self.indices
        if idx.dim() != 1 or idx.numel() != self.count:
            raise UpdateError(
                f"sparse vector needs one index per value; got {idx.numel()} "
                f"indices for {self.count} values"
            )
        if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= self.size):
            raise UpdateError(f"sparse vector indices must be in [0, {self.size})")
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise UpdateError("sparse vector indices must be strictly increasing")


def encode_sparse(vector: SparseVector) -> bytes:
    """The safetensors bytes of ``vector``: ``values`` (float32), ``indices`` (int32,
    or int64 when ``size`` >= 2**31; left out for a dense vector) and metadata
    ``format`` and ``size``. Their length is the exact traffic of a message."""
    tensors = {"values": vector.values.contiguous()}
    if vector.indices is not None:
        dtype = torch.int32 if vector.size < 2**31 else torch.int64
        tensors["indices"] = vector.indices.to(dtype).contiguous()
    return save(tensors, metadata={"format": SPARSE_FORMAT, "size": str(vector.size)})


def decode_sparse(payload: bytes) -> SparseVector:
    """The vector of :func:`encode_sparse`'s bytes, checked; anything else is an
    :class:`UpdateError`."""
    try:
        tensors = load(payload)
        header_len = int.from_bytes(payload[:8], "little")
        metadata = json.loads(payload[8 : 8 + header_len]).get("__metadata__", {})
        size = int(metadata["size"])
    except Exception as exc:  # safetensors and json raise their own types
        raise UpdateError(f"payload is not an encoded sparse vector ({exc})") from None
    if metadata.get("format") != SPARSE_FORMAT or set(tensors) - {"values", "indices"}:
        raise UpdateError(f"payload must be a {SPARSE_FORMAT!r} sparse vector")
    indices = tensors.get("indices")
    vector = SparseVector(
        size, None if indices is None else indices.to(torch.int64), tensors["values"]
    )
    vector.check()
    return vector


# --------------------------------------------------------------------------------
# Choosing what to upload
# --------------------------------------------------------------------------------


def upload_count(fraction: float, size: int) -> int:
    """``ceil(fraction * size)``, the number of parameters a fraction asks for
    (rounded at 1e-9 first, so that 0.1 * 199210 is 19921, not 19922)."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"fraction must be in (0, 1], got {fraction}")
    return max(1, math.ceil(round(fraction * size, 9)))


def select_largest(delta: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of the ``count`` entries of ``delta`` largest in magnitude, sorted
    (ties go to the lower position)."""
    count = min(count, delta.numel())
    if count == delta.numel():
        return torch.arange(delta.numel())
    _, idx = torch.topk(delta.abs(), count, sorted=False)
    return idx.sort().values


def select_above_threshold(
    delta: torch.Tensor, count: int, threshold: float, generator: torch.Generator
) -> torch.Tensor:
    """At most ``count`` positions drawn at random (without replacement) among those
    where ``|delta| > threshold``; sorted."""
    above = torch.nonzero(delta.abs() > threshold).flatten()
    if above.numel() <= count:
        return above
    pick = torch.randperm(above.numel(), generator=generator)[:count]
    return above[pick].sort().values


# --------------------------------------------------------------------------------
# Laplace noise and the sparse vector technique
# --------------------------------------------------------------------------------

_warned_insecure = False


class LaplaceNoise(Protocol):
    """Draws Laplace noise for a DP mechanism."""

    def laplace(self, n: int, scale: float) -> torch.Tensor:
        """``n`` i.i.d. Laplace(0, ``scale``) values, float64."""
        ...


def _laplace_from_uniform(
    u1: torch.Tensor, u2: torch.Tensor, scale: float
) -> torch.Tensor:
    # The difference of two Exp(1) variables, -log U with U in (0, 1], is Laplace(1).
    return (torch.log(u2) - torch.log(u1)) * scale


class GeneratorLaplace:
    """Laplace noise from a seeded ``torch.Generator``: reproducible, not secure
    (whoever knows the seed can remove the noise). Warns once per process."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def laplace(self, n: int, scale: float) -> torch.Tensor:
        """``n`` i.i.d. Laplace(0, ``scale``) values, float64."""
        global _warned_insecure
        if not _warned_insecure:
            _warned_insecure = True
            warnings.warn(
                "DSSGD's Laplace noise is drawn from a seeded torch.Generator, which "
                "is not cryptographically secure. Fine for experiments; for "
                "deployment set secure_noise.",
                InsecureNoiseWarning,
                stacklevel=2,
            )
        u = 1.0 - torch.rand(2, n, generator=self.generator, dtype=torch.float64)
        return _laplace_from_uniform(u[0], u[1], scale)


class SecureLaplace:
    """Laplace noise from ``os.urandom`` (53 random bits per uniform); not
    reproducible. Like every float sampler it is open to the floating-point attacks
    of Mironov (2012)."""

    def laplace(self, n: int, scale: float) -> torch.Tensor:
        """``n`` i.i.d. Laplace(0, ``scale``) values, float64."""
        bits = np.frombuffer(os.urandom(16 * n), dtype=np.uint64) >> np.uint64(11)
        u = torch.from_numpy((bits.astype(np.float64) + 1.0) * 2.0**-53)
        return _laplace_from_uniform(u[:n], u[n:], scale)


def sparse_vector_technique(
    queries: torch.Tensor,
    threshold: float,
    count: int,
    threshold_scale: float,
    query_scale: float,
    noise: LaplaceNoise,
    order: torch.Tensor,
) -> tuple[torch.Tensor, int]:
    """Answer ``queries`` in ``order`` against a noisy threshold; stop after
    ``count`` positive answers (Lyu, Su and Li 2017, Algorithm 1).

    One noise ``rho ~ Lap(threshold_scale)`` is drawn for the threshold, a fresh
    ``nu_i ~ Lap(query_scale)`` for each query; query ``i`` is answered positively
    when ``queries[i] + nu_i >= threshold + rho``. With queries of sensitivity
    ``Δ``, ``threshold_scale = Δ / ε1`` and ``query_scale = 2 * count * Δ / ε2``
    the positions answered positively are (ε1 + ε2)-DP.

    Args:
        queries: float64 values, one per position.
        threshold: the public threshold τ.
        count: most positive answers, >= 1.
        threshold_scale: Laplace scale of the threshold noise, > 0.
        query_scale: Laplace scale of each query's noise, > 0.
        noise: where the Laplace noise comes from.
        order: a permutation of the positions: the order queries are asked in.

    Returns:
        The positions answered positively (sorted) and the number of queries asked
        (the algorithm halts at the ``count``-th positive answer).
    """
    rho = float(noise.laplace(1, threshold_scale)[0])
    nu = noise.laplace(order.numel(), query_scale)
    positive = queries[order] + nu >= threshold + rho
    hits = torch.nonzero(positive).flatten()[:count]
    asked = order.numel() if hits.numel() < count else int(hits[-1]) + 1
    return order[hits].sort().values, asked


def dominating_laplace_epsilon(epsilon: float) -> float:
    """The epsilon of a Laplace mechanism that dominates *every* ε-DP mechanism.

    A ledger knows Gaussian and Laplace mechanisms only; the sparse vector technique
    is neither, but it is ε-DP, and every ε-DP mechanism is dominated by randomized
    response of ε (Kairouz, Oh and Viswanath 2015). A Laplace mechanism of
    ``ε_L = 2 log((1 + e^ε) / 2)`` has a hockey-stick divergence at least that of
    randomized response at every order (equal at e^0 and with a flatter slope
    above), so recording the selection as that Laplace mechanism never understates
    what it spends. ``ε_L`` is ``ε + ε²/4 + ...`` for small ε and ``2ε - 2 log 2``
    for large ε (then the record is loose by up to a factor 2; the report also gives
    the plain sum of pure epsilons).
    """
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ConfigError(f"epsilon must be finite and > 0, got {epsilon}")
    # log((1 + e^ε) / 2) computed stably for large ε.
    return 2.0 * (np.logaddexp(0.0, epsilon) - math.log(2.0))


@dataclass(frozen=True)
class SelectiveDP:
    """Differentially private uploads, as in Shokri & Shmatikov (2015), Algorithm 2.

    One upload of at most ``c`` parameters (``c = ceil(θu * P)``) spends
    ``ε_upload = c * epsilon_per_parameter``: ``selection_share`` of it on choosing
    the parameters (the sparse vector technique, queries ``|clip(Δw_j, γ)|`` of
    sensitivity γ against the threshold τ, the threshold/query split of Lyu et al.,
    1 : (2c)^(2/3)), the rest on their values (``clip(clip(Δw_j, γ) + Lap(2cγ /
    ε_values), γ)``, each value of sensitivity 2γ). The guarantee protects any change
    of one client's data (every value is truncated, so no neighbouring relation is
    needed), for one upload; the client's total is the composition over its uploads.

    Attributes:
        epsilon_per_parameter: the paper's budget per uploaded parameter, > 0.
        bound: γ, > 0: every query and value is truncated to ``[-γ, γ]``.
        threshold: τ, the public threshold of the selection, >= 0.
        selection_share: share of ``ε_upload`` spent on the selection, in (0, 1);
            default 8/9 (the paper's split).
        secure_noise: draw noise from ``os.urandom`` instead of the turn's seeded
            generator; default False.
    """

    epsilon_per_parameter: float
    bound: float
    threshold: float = 0.0
    selection_share: float = 8 / 9
    secure_noise: bool = False

    def __post_init__(self) -> None:
        if not (
            math.isfinite(self.epsilon_per_parameter) and self.epsilon_per_parameter > 0
        ):
            raise ConfigError(
                "epsilon_per_parameter must be finite and > 0, got "
                f"{self.epsilon_per_parameter}"
            )
        if not (math.isfinite(self.bound) and self.bound > 0):
            raise ConfigError(f"bound (γ) must be finite and > 0, got {self.bound}")
        if not (math.isfinite(self.threshold) and self.threshold >= 0):
            raise ConfigError(f"threshold (τ) must be >= 0, got {self.threshold}")
        if not 0 < self.selection_share < 1:
            raise ConfigError(
                f"selection_share must be in (0, 1), got {self.selection_share}"
            )

    def epsilons(self, capacity: int) -> tuple[float, float, float]:
        """``(ε_threshold, ε_queries, ε_values)`` of one upload of at most
        ``capacity`` parameters; they sum to ``capacity * epsilon_per_parameter``."""
        total = capacity * self.epsilon_per_parameter
        selection = self.selection_share * total
        eps_threshold = selection / (1.0 + (2.0 * capacity) ** (2.0 / 3.0))
        return eps_threshold, selection - eps_threshold, total - selection

    def scales(self, capacity: int) -> tuple[float, float, float]:
        """Laplace scales ``(threshold, query, value)`` for ``capacity`` slots."""
        eps_threshold, eps_queries, eps_values = self.epsilons(capacity)
        gamma = self.bound
        return (
            gamma / eps_threshold,
            2.0 * capacity * gamma / eps_queries,
            capacity * 2.0 * gamma / eps_values,
        )


def upload_events(dp: SelectiveDP, capacity: int, uploaded: int) -> list[PrivacyEvent]:
    """What one DP upload spends, as ledger events.

    - the selection (sparse vector technique, pure ``ε_threshold + ε_queries``) as
      the Laplace mechanism that dominates it (:func:`dominating_laplace_epsilon`),
      source ``"dssgd-selection"``;
    - the ``uploaded`` values, each a Laplace mechanism of noise multiplier
      ``capacity / ε_values`` (scale over the sensitivity 2γ), source
      ``"dssgd-values"``; nothing when no value was uploaded.
    """
    eps_threshold, eps_queries, eps_values = dp.epsilons(capacity)
    selection = dominating_laplace_epsilon(eps_threshold + eps_queries)
    events = [PrivacyEvent("laplace", 1.0 / selection, 1.0, 1, "dssgd-selection")]
    if uploaded:
        events.append(
            PrivacyEvent(
                "laplace", capacity / eps_values, 1.0, uploaded, "dssgd-values"
            )
        )
    return events


# --------------------------------------------------------------------------------
# Settings and messages
# --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DSSGDSettings:
    """What every client's turn does.

    Attributes:
        upload_fraction: θu in (0, 1]: a client uploads ``ceil(θu * P)`` parameters
            (at most that many with ``selection = "threshold"``).
        download_fraction: θd in (0, 1]: a client downloads ``ceil(θd * P)``
            parameters, those updated most since it last downloaded them.
        selection: ``"largest"`` (largest ``|Δw|``) or ``"threshold"`` (at random
            among ``|Δw| > τ``; the only choice with ``dp``).
        threshold: τ >= 0, for ``selection = "threshold"`` and for ``dp``.
        bound: γ > 0 truncates uploaded values to ``[-γ, γ]``; ``None`` (default)
            leaves them as they are. Required with ``dp``.
        dp: differentially private uploads, or ``None`` (default).
        residual: keep what a turn did not upload (the unselected changes and the
            part truncated by γ) and add it to the next turn's change before
            selecting (error feedback: Stich et al. 2018, Lin et al. 2018). Not in
            Shokri & Shmatikov's algorithm; off by default, refused with ``dp``.
    """

    upload_fraction: float = 0.1
    download_fraction: float = 1.0
    selection: Literal["largest", "threshold"] = "largest"
    threshold: float = 0.0
    bound: float | None = None
    dp: SelectiveDP | None = None
    residual: bool = False

    def __post_init__(self) -> None:
        for name in ("upload_fraction", "download_fraction"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ConfigError(f"{name} must be in (0, 1], got {value}")
        if self.selection not in SELECTIONS:
            raise ConfigError(
                f"selection must be one of {list(SELECTIONS)}, got {self.selection!r}"
            )
        if not (math.isfinite(self.threshold) and self.threshold >= 0):
            raise ConfigError(f"threshold (τ) must be >= 0, got {self.threshold}")
        if self.bound is not None and not (
            math.isfinite(self.bound) and self.bound > 0
        ):
            raise ConfigError(f"bound (γ) must be > 0 or None, got {self.bound}")
        if self.dp is not None and self.selection != "threshold":
            raise ConfigError(
                "selection must be 'threshold' with dp: choosing the largest values "
                "is not differentially private; got 'largest'"
            )
        if self.dp is not None and self.residual:
            raise ConfigError(
                "residual must be false with dp: the privacy analysis of a DP upload "
                "assumes it depends on the turn's own change only"
            )


@dataclass(frozen=True)
class Download:
    """What the server sends a client: some global parameters.

    Attributes:
        client_id: the client it is for.
        vector: the parameters' positions and values.
        version: uploads the server had applied when it was made.
    """

    client_id: int
    vector: SparseVector
    version: int


@dataclass(frozen=True)
class Upload:
    """What a client sends the server after a turn.

    Attributes:
        client_id: the client that trained.
        vector: changes to add to the global parameters, by position.
        base_version: the ``version`` of the download the client trained from.
        loss: mean training loss of the turn (not released under DP: metrics only).
        metrics: further numbers about the turn (steps, queries asked, ...).
    """

    client_id: int
    vector: SparseVector
    base_version: int
    loss: float = math.nan
    metrics: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------
# The parameter server
# --------------------------------------------------------------------------------


def download_tie_break(
    generator: torch.Generator, count: int, size: int
) -> torch.Tensor | None:
    """The random tie-break of a download of ``count`` of ``size`` parameters:
    ``size`` uniform float64 values drawn from ``generator``, or nothing (and no
    draw) when every parameter is sent. A client that must continue the turn's
    generator where the server's download left it calls this with the same
    arguments."""
    if count >= size:
        return None
    return torch.rand(size, generator=generator, dtype=torch.float64)


@dataclass(frozen=True)
class ServerState:
    """Everything a :class:`ParameterServer` holds, as plain tensors.

    Attributes:
        parameters: the global parameters, float32, shape ``(P,)``.
        counts: per-parameter update counts, int64, shape ``(P,)``.
        seen: by client id, the counts as of that client's downloads (θd < 1).
        version: uploads applied so far.
    """

    parameters: torch.Tensor
    counts: torch.Tensor
    seen: dict[int, torch.Tensor]
    version: int


class ParameterServer:
    """The global parameters and how often each has been updated.

    Thread-safe: :meth:`download` and :meth:`apply` each hold one lock while they
    read or change the state, so every upload is applied atomically.

    Args:
        parameters: the initial global parameters, a flat float32 vector (copied).
        num_clients: K, >= 1.
    """

    def __init__(self, parameters: torch.Tensor, num_clients: int) -> None:
        if num_clients < 1:
            raise ConfigError(f"num_clients must be >= 1, got {num_clients}")
        self._params = parameters.detach().to(torch.float32).clone().reshape(-1)
        self._counts = torch.zeros(self._params.numel(), dtype=torch.int64)
        self._seen: dict[int, torch.Tensor] = {}  # counts at each client's download
        self._num_clients = num_clients
        self._version = 0
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        """P, the number of global parameters."""
        return self._params.numel()

    @property
    def version(self) -> int:
        """Uploads applied so far."""
        return self._version

    def parameters(self) -> torch.Tensor:
        """A copy of the global parameters."""
        with self._lock:
            return self._params.clone()

    def counts(self) -> torch.Tensor:
        """A copy of the per-parameter update counts."""
        with self._lock:
            return self._counts.clone()

    def download(
        self, client_id: int, fraction: float, generator: torch.Generator
    ) -> Download:
        """The ``ceil(fraction * P)`` parameters updated most since ``client_id``
        last downloaded them (ties broken at random by ``generator``); every
        parameter, densely, at ``fraction = 1``."""
        self._check_client(client_id)
        count = upload_count(fraction, self.size)
        # Drawn before taking the lock: the tie-break needs no shared state.
        jitter = download_tie_break(generator, count, self.size)
        with self._lock:
            if jitter is None:
                vector = SparseVector(self.size, None, self._params.clone())
                return Download(client_id, vector, self._version)
            seen = self._seen.setdefault(client_id, torch.zeros_like(self._counts))
            since = (self._counts - seen).to(torch.float64) + jitter
            idx = torch.topk(since, count, sorted=False).indices.sort().values
            seen[idx] = self._counts[idx]
            vector = SparseVector(self.size, idx, self._params[idx].clone())
            return Download(client_id, vector, self._version)

    def apply(self, upload: Upload) -> int:
        """Add an upload's values to the global parameters, atomically.

        Returns:
            The upload's staleness: uploads applied by others between the client's
            download and this upload.

        Raises:
            UpdateError: an unknown client, a vector of another size, bad indices,
                NaN or Inf, or a version from the future; nothing is changed.
        """
        self._check_client(upload.client_id)
        vector = upload.vector
        vector.check()
        if vector.size != self.size:
            raise UpdateError(
                f"client {upload.client_id}: upload must be over {self.size} "
                f"parameters, got {vector.size}"
            )
        idx = vector.positions()
        with self._lock:
            if not 0 <= upload.base_version <= self._version:
                raise UpdateError(
                    f"client {upload.client_id}: base_version must be in "
                    f"[0, {self._version}], got {upload.base_version}"
                )
            self._params.index_add_(0, idx, vector.values)
            self._counts[idx] += 1
            staleness = self._version - upload.base_version
            self._version += 1
        return staleness

    def snapshot(self) -> ServerState:
        """The whole state, copied, for a durable checkpoint."""
        with self._lock:
            seen = {k: v.clone() for k, v in self._seen.items()}
            return ServerState(
                self._params.clone(), self._counts.clone(), seen, self._version
            )

    def seen(self, client_id: int) -> torch.Tensor | None:
        """A copy of the update counts at ``client_id``'s downloads (``None``
        before its first download at θd < 1)."""
        with self._lock:
            found = self._seen.get(client_id)
            return None if found is None else found.clone()

    def restore(self, state: ServerState) -> None:
        """Replace the state by ``state`` (of :meth:`snapshot`, or read back from
        a checkpoint); refused when its shapes do not fit this server."""
        shapes = [state.parameters.shape, state.counts.shape]
        shapes += [v.shape for v in state.seen.values()]
        if any(s != self._params.shape for s in shapes):
            raise UpdateError(
                f"a restored state must hold {self.size} values per tensor, got "
                f"shapes {[tuple(s) for s in shapes]}"
            )
        for k in state.seen:
            self._check_client(k)
        if state.version < 0:
            raise UpdateError(f"version must be >= 0, got {state.version}")
        with self._lock:
            self._params = state.parameters.to(torch.float32).clone()
            self._counts = state.counts.to(torch.int64).clone()
            self._seen = {k: v.to(torch.int64).clone() for k, v in state.seen.items()}
            self._version = state.version

    def _check_client(self, client_id: int) -> None:
        if not 0 <= client_id < self._num_clients:
            raise UpdateError(
                f"client_id must be in [0, {self._num_clients}), got {client_id}"
            )


# --------------------------------------------------------------------------------
# A client
# --------------------------------------------------------------------------------


@dataclass
class DSSGDClient:
    """One client's state between turns: its own parameters and privacy ledger.

    Attributes:
        client_id: the client's index.
        parameters: the client's local parameters, a flat float32 vector; they
            persist between turns (only downloaded positions are overwritten).
        ledger: where DP uploads are recorded; ``None`` without DP.
        uploads: turns that ended in an upload so far.
        pure_epsilon: the sum of the pure epsilons of the client's DP uploads
            (basic composition: an (ε, 0) guarantee for all of them together).
        residual: with ``settings.residual``, the changes not uploaded so far (flat
            float32, like ``parameters``); ``None`` before the first such turn.
    """

    client_id: int
    parameters: torch.Tensor
    ledger: PrivacyLedger | None = None
    uploads: int = 0
    pure_epsilon: float = 0.0
    residual: torch.Tensor | None = None

    def receive(self, download: Download) -> None:
        """Write the downloaded values into the local parameters."""
        vector = download.vector
        vector.check()
        if vector.size != self.parameters.numel():
            raise UpdateError(
                f"download must be over {self.parameters.numel()} parameters, got "
                f"{vector.size}"
            )
        if vector.indices is None:
            self.parameters = vector.values.clone()
        else:
            self.parameters[vector.indices] = vector.values

    def train(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        trainer: LocalTrainer,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, float, int]:
        """Train ``model`` from the local parameters; keep the result.

        Returns:
            The change of the local parameters (float32), the mean training loss and
            the number of SGD steps.
        """
        before = self.parameters
        torch.nn.utils.vector_to_parameters(before.clone(), model.parameters())
        stats = trainer.train(model, x, y, generator)
        with torch.no_grad():
            after = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
        self.parameters = after.clone()
        return after - before, stats.loss, stats.steps

    def make_upload(
        self,
        delta: torch.Tensor,
        settings: DSSGDSettings,
        generator: torch.Generator,
        base_version: int,
    ) -> Upload:
        """Choose, truncate and (under DP) noise the parameters to upload."""
        capacity = upload_count(settings.upload_fraction, delta.numel())
        if settings.dp is not None:
            return self._dp_upload(
                delta, settings.dp, capacity, generator, base_version
            )
        if settings.residual and self.residual is not None:
            delta = delta + self.residual
        if settings.selection == "largest":
            idx = select_largest(delta, capacity)
        else:
            idx = select_above_threshold(delta, capacity, settings.threshold, generator)
        values = delta[idx]
        if settings.bound is not None:
            values = values.clamp(-settings.bound, settings.bound)
        if settings.residual:
            left = delta.clone()
            left[idx] -= values
            self.residual = left
        self.uploads += 1
        return Upload(self.client_id, _sparse(delta.numel(), idx, values), base_version)

    def turn(
        self,
        download: Download,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        trainer: LocalTrainer,
        generator: torch.Generator,
        settings: DSSGDSettings,
    ) -> Upload:
        """Receive ``download``, train, and return the upload of the turn."""
        self.receive(download)
        delta, loss, steps = self.train(model, x, y, trainer, generator)
        upload = self.make_upload(delta, settings, generator, download.version)
        upload.metrics["steps"] = float(steps)
        return Upload(
            upload.client_id,
            upload.vector,
            upload.base_version,
            loss,
            upload.metrics,
        )

    def _dp_upload(
        self,
        delta: torch.Tensor,
        dp: SelectiveDP,
        capacity: int,
        generator: torch.Generator,
        base_version: int,
    ) -> Upload:
        # The budget is checked for the most this upload could spend, before
        # anything is released; a client out of budget uploads nothing.
        empty = Upload(self.client_id, _sparse(delta.numel(), None, None), base_version)
        if self.ledger is not None and not _affordable(
            self.ledger, upload_events(dp, capacity, capacity)
        ):
            empty.metrics["over_budget"] = 1.0
            return empty
        noise: LaplaceNoise = (
            SecureLaplace() if dp.secure_noise else GeneratorLaplace(generator)
        )
        gamma = dp.bound
        clipped = delta.to(torch.float64).clamp(-gamma, gamma)
        threshold_scale, query_scale, value_scale = dp.scales(capacity)
        order = torch.randperm(delta.numel(), generator=generator)
        idx, asked = sparse_vector_technique(
            clipped.abs(),
            dp.threshold,
            capacity,
            threshold_scale,
            query_scale,
            noise,
            order,
        )
        noisy = clipped[idx] + noise.laplace(idx.numel(), value_scale)
        values = noisy.clamp(-gamma, gamma).to(torch.float32)
        if self.ledger is not None:
            for event in upload_events(dp, capacity, idx.numel()):
                self.ledger.record(event)
        eps_threshold, eps_queries, eps_values = dp.epsilons(capacity)
        self.pure_epsilon += eps_threshold + eps_queries
        self.pure_epsilon += idx.numel() * eps_values / capacity
        self.uploads += 1
        upload = Upload(
            self.client_id, _sparse(delta.numel(), idx, values), base_version
        )
        upload.metrics["queries"] = float(asked)
        return upload


def _sparse(
    size: int, idx: torch.Tensor | None, values: torch.Tensor | None
) -> SparseVector:
    """A vector, dense when every position is carried; empty when ``idx`` is None
    and ``values`` is None."""
    if idx is None or values is None:
        return SparseVector(size, torch.zeros(0, dtype=torch.int64), torch.zeros(0))
    values = values.detach().to(torch.float32).contiguous()
    if idx.numel() == size:
        return SparseVector(size, None, values)
    return SparseVector(size, idx.to(torch.int64), values)


def _affordable(ledger: PrivacyLedger, events: Sequence[PrivacyEvent]) -> bool:
    budget = ledger.budget
    if budget is None:
        return True
    probe = PrivacyLedger(ledger.accountant, ledger.relation, None, ledger.events)
    for event in events:
        probe.record(event)
    return probe.epsilon(budget.delta) <= budget.epsilon


# --------------------------------------------------------------------------------
# Orders and seeds
# --------------------------------------------------------------------------------


def turn_order(order: str, num_clients: int, rnd: int, seed: int) -> list[int]:
    """The clients of round ``rnd`` in the order their turns start.

    ``round_robin``: ``0 .. K-1``; ``random`` and ``async``: a permutation drawn from
    the run's seed and the round.
    """
    if order not in ORDERS:
        raise ConfigError(f"order must be one of {list(ORDERS)}, got {order!r}")
    if order == "round_robin":
        return list(range(num_clients))
    rng = numpy_rng(seed, _STREAM, _ORDER, rnd)
    return [int(k) for k in rng.permutation(num_clients)]


def turn_seed(seed: int, rnd: int, client_id: int) -> int:
    """The seed of a client's turn in round ``rnd`` (batch order, selection and
    download tie-breaks, seeded noise)."""
    return derive_seed(seed, _STREAM, _TURN, rnd, client_id)
