"""What veil's own modules release about one client, as the attacker receives it.

Gradient inversion is only evidence if it attacks what a defence really emits. Each
function here runs the real module on the victim's data, in the role the module
plays in a run, and decodes what arrives at the attacker into an
:class:`~veil.attacks.ObservedUpdate`, with the attacker's model of the release
(``gradient_scale``, ``clipping_norm``) that :class:`~veil.attacks.InversionConfig`
needs:

- :func:`fedavg_release`: a FedAvg client's upload (:meth:`veil.learning.FedAvg.
  client_fit`, one local SGD pass): the undefended case;
- :func:`dpsgd_release`: the model change of one step of
  :class:`veil.privacy.DPSGDTrainer` (either engine) on the victim's batch;
- :func:`dssgd_release`: a DSSGD turn (:class:`veil.learning.dssgd.ParameterServer`
  download, :meth:`~veil.learning.dssgd.DSSGDClient.turn`), and the exact
  ``veil.sparse/1`` bytes of the upload, decoded as the server decodes them;
- :func:`dp_fedavg_client_release` (the :class:`~veil.learning.ClientResult` a
  DP-FedAvg server receives: clipped, plus the client's noise share under
  distributed noise) and :func:`dp_fedavg_model_release` (the change of the global
  model after :meth:`~veil.learning.DPFedAvg.aggregate` with the victim as the only
  client: clipped update plus the full noise, what the guarantee covers);
- :func:`secagg_round`: one FedAvg round under secure aggregation run through
  :func:`veil.secagg.secure_sum`, recording every message that reaches the server;
  :class:`SecAggRound` holds the masked inputs as the server received them and the
  unmasked sum, each decodable into an observed update.

Nothing here simulates a mechanism: a change to those modules changes what the
attacks see.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from veil.attacks.gradient_inversion import InversionConfig
from veil.attacks.views import ObservedUpdate
from veil.errors import VeilError
from veil.experiment._secagg import SecureFedAvg
from veil.experiment.config import SecAggConfig
from veil.learning import DPFedAvg, FedAvg, SGDTrainer, StateDict
from veil.learning.dssgd import (
    Download,
    DSSGDClient,
    DSSGDSettings,
    ParameterServer,
    SparseVector,
    decode_sparse,
    encode_sparse,
    flatten,
    unflatten,
)
from veil.privacy import DPSGDTrainer, PrivacyLedger
from veil.secagg import SecureSum, Step, secure_sum
from veil.secagg.messages import MaskedInput, decode

__all__ = [
    "ClientRelease",
    "SecAggRound",
    "dp_fedavg_client_release",
    "dp_fedavg_model_release",
    "dpsgd_release",
    "dssgd_release",
    "fedavg_release",
    "secagg_round",
]


@dataclass(frozen=True)
class ClientRelease:
    """One client's release as the attacker received it, and how to invert it.

    Attributes:
        observed: the release decoded into tensors by parameter name (and, for a
            sparse upload, the mask of released coordinates).
        gradient_scale: the attacker's model of the release is ``gradient_scale``
            times the (clipped) mean gradient of the victim's batch (``-lr`` for
            one SGD step).
        clipping_norm: the L2 norm the attacker mirrors on the gradient, in
            gradient units, or ``None``.
        payload: the exact bytes the receiver got, when the module encodes its
            message (a DSSGD upload, a secure aggregation masked input); ``None``
            when it hands over tensors (a ``ClientResult``).
    """

    observed: ObservedUpdate
    gradient_scale: float
    clipping_norm: float | None = None
    payload: bytes | None = None

    def attack(self, **settings: Any) -> InversionConfig:
        """An :class:`InversionConfig` mirroring this release, plus ``settings``."""
        return InversionConfig(
            gradient_scale=self.gradient_scale,
            clipping_norm=self.clipping_norm,
            **settings,
        )


def _parameters(model: nn.Module) -> StateDict:
    """The model's trainable parameters by name, detached copies; models with
    buffers are refused (their flat vector would not be the parameters')."""
    if any(True for _ in model.buffers()):
        raise VeilError(
            "the model must have no buffers (BatchNorm statistics, ...) for its "
            "parameters to form the released vector, got "
            f"{[n for n, _ in model.named_buffers()]}"
        )
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _delta(before: StateDict, after: StateDict) -> StateDict:
    return {n: (after[n] - before[n]).detach() for n in before}


def _check_batch(x: torch.Tensor, y: torch.Tensor) -> None:
    if len(x) != len(y) or len(y) < 1:
        raise VeilError(
            f"x and y must hold the same number >= 1 of examples, got {len(x)} "
            f"and {len(y)}"
        )


def fedavg_release(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, lr: float, seed: int = 0
) -> ClientRelease:
    """A FedAvg client's update after one local pass of SGD over its whole batch.

    Runs :meth:`veil.learning.FedAvg.client_fit` (one epoch, batch size ``len(y)``:
    a single step), so the update is ``-lr`` times the batch's mean gradient.

    Args:
        model: the global model the client starts from; not changed.
        x: the victim's batch, shape ``(B, ...)``.
        y: its labels, shape ``(B,)``.
        lr: the client's learning rate, > 0.
        seed: the run's seed (the client's task seed derives from it).
    """
    _check_batch(x, y)
    state = _parameters(model)
    algorithm = FedAvg(state, 1, 1.0, SGDTrainer(lr, 1, len(y)), seed)
    task = algorithm.configure_round(1)[0]
    result = algorithm.client_fit(task, copy.deepcopy(model), x, y)
    return ClientRelease(ObservedUpdate(dict(result.update)), -lr)


def dpsgd_release(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    trainer: DPSGDTrainer,
    generator: torch.Generator,
) -> ClientRelease:
    """The model change of one DP-SGD step of ``trainer`` on the victim's batch.

    ``trainer`` is run as it is (its clipping norm, noise multiplier, learning rate,
    engine) except that it takes exactly one step with every example in the batch
    (``sample_rate = 1``, ``steps = 1``, no ledger): the worst case for the victim,
    whose example is certainly in the step. The change is ``-lr`` times the clipped,
    noised sum over ``len(y)`` (:func:`veil.privacy.noisy_gradient`).

    Args:
        model: the global model; not changed.
        x: the victim's batch, shape ``(B, ...)``.
        y: its labels, shape ``(B,)``.
        trainer: the run's DP-SGD trainer.
        generator: source of the step's noise.
    """
    _check_batch(x, y)
    step = replace(
        trainer,
        sample_rate=1.0,
        expected_batch_size=None,
        steps=1,
        ledger=None,
        secure_noise=False,
    )
    victim = copy.deepcopy(model)
    before = _parameters(victim)
    step.train(victim, x, y, generator)
    observed = ObservedUpdate(_delta(before, _parameters(victim)))
    return ClientRelease(observed, -trainer.lr / len(y), trainer.clipping_norm)


def _sparse_observation(vector: SparseVector, like: StateDict) -> ObservedUpdate:
    """A decoded sparse vector as tensors by name with the mask of its positions."""
    values = torch.zeros(vector.size)
    known = torch.zeros(vector.size, dtype=torch.bool)
    values[vector.positions()] = vector.values
    known[vector.positions()] = True
    grads = unflatten(values, like)
    masks = {n: m.bool() for n, m in unflatten(known.float(), like).items()}
    return ObservedUpdate(grads, masks)


def dssgd_release(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: DSSGDSettings,
    *,
    lr: float,
    seed: int = 0,
) -> ClientRelease:
    """One DSSGD turn of the victim and the upload as the server decodes it.

    The global model is put on a real :class:`ParameterServer` with the victim as its
    one client; the client downloads (θd), trains one SGD step over its batch
    (batch size ``len(y)``) and uploads by ``settings`` (θu, selection, τ, γ, DP).
    The upload is encoded by :func:`encode_sparse` and decoded by
    :func:`decode_sparse`; :attr:`ClientRelease.payload` holds those bytes.

    Args:
        model: the global model; not changed.
        x: the victim's batch, shape ``(B, ...)``.
        y: its labels, shape ``(B,)``.
        settings: the run's DSSGD settings.
        lr: the client's learning rate, > 0.
        seed: seeds the turn (selection at random, DP noise, tie-breaks).
    """
    _check_batch(x, y)
    like = _parameters(model)
    start = flatten(like)
    server = ParameterServer(start, 1)
    client = DSSGDClient(0, start.clone())
    generator = torch.Generator().manual_seed(seed)
    sent = server.download(0, settings.download_fraction, generator)
    download = Download(0, decode_sparse(encode_sparse(sent.vector)), sent.version)
    trainer = SGDTrainer(lr, 1, len(y))
    upload = client.turn(
        download, copy.deepcopy(model), x, y, trainer, generator, settings
    )
    payload = encode_sparse(upload.vector)
    observed = _sparse_observation(decode_sparse(payload), like)
    return ClientRelease(observed, -lr, payload=payload)


def _dp_fedavg(
    model: nn.Module,
    *,
    lr: float,
    batch: int,
    clipping_norm: float,
    noise_multiplier: float,
    num_clients: int,
    placement: str,
    seed: int,
) -> DPFedAvg:
    return DPFedAvg(
        global_state=_parameters(model),
        num_clients=num_clients,
        sample_rate=1.0,
        clipping_norm=clipping_norm,
        noise_multiplier=noise_multiplier,
        trainer=SGDTrainer(lr, 1, batch),
        ledger=PrivacyLedger(),
        placement=placement,
        seed=seed,
    )


def dp_fedavg_client_release(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lr: float,
    clipping_norm: float,
    noise_multiplier: float,
    placement: str = "central",
    round_clients: int = 10,
    seed: int = 0,
) -> ClientRelease:
    """What a DP-FedAvg server receives from the victim: its ``ClientResult``.

    Runs :meth:`veil.learning.DPFedAvg.client_fit` (one SGD step over the batch)
    in a round of ``round_clients`` clients. Under ``central`` noise the result is
    the clipped update with no noise at all (the server is trusted); under
    ``distributed`` it carries the client's share ``N(0, (z S)^2 / round_clients)``.

    Args:
        model: the global model; not changed.
        x: the victim's batch, shape ``(B, ...)``.
        y: its labels, shape ``(B,)``.
        lr: the client's learning rate, > 0.
        clipping_norm: S, in update units, > 0.
        noise_multiplier: z, >= 0.
        placement: ``"central"`` or ``"distributed"``.
        round_clients: clients in the round (all sampled), >= 1.
        seed: the run's seed.
    """
    _check_batch(x, y)
    algorithm = _dp_fedavg(
        model,
        lr=lr,
        batch=len(y),
        clipping_norm=clipping_norm,
        noise_multiplier=noise_multiplier,
        num_clients=round_clients,
        placement=placement,
        seed=seed,
    )
    task = algorithm.configure_round(1)[0]
    result = algorithm.client_fit(task, copy.deepcopy(model), x, y)
    observed = ObservedUpdate({n: t.float() for n, t in result.update.items()})
    return ClientRelease(observed, -lr, clipping_norm / lr)


def dp_fedavg_model_release(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lr: float,
    clipping_norm: float,
    noise_multiplier: float,
    placement: str = "central",
    seed: int = 0,
) -> ClientRelease:
    """The change of the global model after a DP-FedAvg round of the victim alone.

    One real round (:meth:`~veil.learning.DPFedAvg.configure_round`, ``client_fit``,
    ``aggregate``) with the victim as the population's only client: the model moves
    by its clipped update plus ``N(0, (z S)^2)``. This is what an attacker who knows
    every other client's contribution learns from the model, the worst case the
    user-level guarantee covers. Arguments as :func:`dp_fedavg_client_release`.
    """
    _check_batch(x, y)
    algorithm = _dp_fedavg(
        model,
        lr=lr,
        batch=len(y),
        clipping_norm=clipping_norm,
        noise_multiplier=noise_multiplier,
        num_clients=1,
        placement=placement,
        seed=seed,
    )
    before = dict(algorithm.global_state)
    task = algorithm.configure_round(1)[0]
    result = algorithm.client_fit(task, copy.deepcopy(model), x, y)
    algorithm.aggregate(1, [result])
    observed = ObservedUpdate(_delta(before, algorithm.global_state))
    return ClientRelease(observed, -lr, clipping_norm / lr)


@dataclass(frozen=True)
class SecAggRound:
    """One FedAvg round under secure aggregation, as its server saw it.

    Attributes:
        algorithm: the :class:`~veil.experiment._secagg.SecureFedAvg` whose client
            and server code ran the round.
        inputs: each client's encoded input before masking, by client id (never
            seen by the server; kept to test the protocol against).
        messages: every client-to-server message, as bytes, by step and client.
        masked: each client's masked input vector, decoded from its
            ``MaskedInput`` message: the server's whole per-client view of the
            update.
        result: what the protocol returned (the unmasked sum of the inputs).
        lr: the clients' learning rate.
    """

    algorithm: SecureFedAvg
    inputs: dict[int, np.ndarray]
    messages: dict[Step, dict[int, bytes]]
    masked: dict[int, np.ndarray]
    result: SecureSum
    lr: float
    _like: StateDict = field(repr=False)

    def _observe(self, values: np.ndarray) -> ObservedUpdate:
        flat = torch.from_numpy(np.asarray(values, dtype=np.float64)).float()
        return ObservedUpdate(unflatten(flat, self._like))

    def masked_release(self, client_id: int) -> ClientRelease:
        """Client ``client_id``'s masked input decoded as if it were its update.

        The decoding is the server's own (one client's codes to values, times the
        clip range): what the server would read if masks were not there.
        """
        encoder = self.algorithm.encoder
        values = encoder.decode_sum(self.masked[client_id], 1)[:-1]
        values = values * self.algorithm.secagg.clip_range
        payload = self.messages[Step.MASKED_INPUT][client_id]
        return ClientRelease(self._observe(values), -self.lr, payload=payload)

    def sum_release(self) -> ClientRelease:
        """The mean update the server applies, from the unmasked sum.

        The attacker inverts it as if one client had sent it: a mean over ``n``
        single-step clients is ``-lr / n`` times the sum of their gradients.
        """
        mean = self.algorithm.mean_update(self.result)
        flat = torch.cat([mean[n].flatten() for n in self._like]).double().numpy()
        scale = -self.lr / len(self.result.included)
        return ClientRelease(self._observe(flat), scale)


def secagg_round(
    model: nn.Module,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    lr: float,
    secagg: SecAggConfig | None = None,
    seed: int = 0,
) -> SecAggRound:
    """Run one FedAvg round under secure aggregation and record the server's view.

    Each client (one per batch, ids ``0..n-1``) runs :meth:`FedAvg.client_fit` (one
    SGD step over its batch) and encodes its input with
    :meth:`SecureFedAvg.client_input`; :func:`veil.secagg.secure_sum` runs the
    protocol with an intercept that records each message on its way to the server
    and delivers it unchanged. Every client's weight is 1 (``max_examples`` is the
    largest batch), as in a round of single-example clients.

    Args:
        model: the global model; not changed.
        batches: each client's ``(x, y)``, at least 2.
        lr: the clients' learning rate, > 0.
        secagg: the ``[secagg]`` settings; default ``SecAggConfig()`` (32 bits,
            clip range 1, full graph).
        seed: the run's seed.
    """
    if len(batches) < 2:
        raise VeilError(f"a secure sum needs at least 2 clients, got {len(batches)}")
    like = _parameters(model)
    largest = max(len(y) for _, y in batches)
    algorithm = SecureFedAvg(
        global_state=like,
        num_clients=len(batches),
        client_fraction=1.0,
        trainer=SGDTrainer(lr, 1, largest),
        seed=seed,
        secagg=secagg or SecAggConfig(),
        max_examples=largest,
    )
    results = []
    for task in algorithm.configure_round(1):
        x, y = batches[task.client_id]
        _check_batch(x, y)
        results.append(algorithm.client_fit(task, copy.deepcopy(model), x, y))
    inputs = {r.client_id: algorithm.client_input(r) for r in results}

    messages: dict[Step, dict[int, bytes]] = {step: {} for step in Step}

    def record(step: Step, sender: int, data: bytes) -> list[tuple[int, bytes]]:
        messages[step][sender] = data
        return [(sender, data)]

    result = secure_sum(inputs, algorithm.secagg.bits, round=1, intercept=record)
    masked = {}
    for sender, data in messages[Step.MASKED_INPUT].items():
        message = decode(data)
        if not isinstance(message, MaskedInput):
            raise VeilError(f"expected a MaskedInput message, got {type(message)}")
        masked[sender] = message.vector
    return SecAggRound(algorithm, inputs, messages, masked, result, lr, like)
