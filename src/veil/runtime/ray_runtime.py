"""The Ray runtime: every client's local work is a Ray task.

Where the simulation runtime runs clients one after another in this process, this
runtime hands each client's ``client_fit`` to Ray, which runs the tasks on as many
processes (and machines) as it has CPUs for. The algorithm code is the same; only
where it runs changes.

What travels, and how often:

- the training set is put in Ray's object store once, when the runtime starts, as
  NumPy arrays that workers read without copying; a task receives its client's
  example indices and gathers only those rows;
- the global model travels once per round, inside the algorithm object, and is
  shared by every task of the round (tasks travel with an empty ``global_state``;
  a task whose model is not the algorithm's own gets its own object);
- the algorithm object is put once per round, so client-side state it carries (a
  DP client's privacy ledger) is current when a task starts. State a client changes
  comes back with its result and is loaded into the driver's algorithm: the ledger
  stays where the accounting is done, as it would on a phone that reports it.

Turn-based algorithms (DSSGD's synchronous orders) run one client's step at a time
(:meth:`RayRuntime.run_client`), each as one Ray task. The client's state stays in
the object store between its turns: the driver keeps a reference and passes it to
the client's next step, so it crosses to the driver only when asked for
(:meth:`RayRuntime.fetch`: evaluation of privacy ledgers, the end of a run). Turns
that must follow one another gain no parallelism from Ray, only its placement.

For the same seed the result equals the simulation runtime's: every task draws its
randomness from its own seed, results are aggregated in the order of the tasks, and
a worker uses the driver's number of torch threads unless told otherwise.

Ray moves Python objects with its own serialiser (pickle). That is safe only between
processes of one trusted cluster, which is what this runtime is for; whatever comes
from a device over a network goes through the network runtime's safetensors/JSON
validation instead.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from veil.data import Dataset
from veil.errors import ConfigError, DataError
from veil.learning._types import ClientResult, ClientTask
from veil.runtime._base import (
    ClientStep,
    FederatedAlgorithm,
    RoundStats,
    check_client,
    check_clients,
    client_state_hooks,
    round_stats,
)

__all__ = ["RayRuntime"]

logger = logging.getLogger(__name__)

ModelFn = Callable[[], nn.Module]

# One scratch model per worker process, built on first use and reused by later tasks
# (Ray keeps worker processes alive between tasks). Keyed by the runtime that asked
# for it: the model function arrives as a fresh copy in every task, so its id() is
# no key.
_MODELS: dict[str, nn.Module] = {}


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "runtime 'ray' needs Ray: pip install 'veil[ray]' (or pip install ray)"
        ) from None
    return ray


def _worker_model(model_key: str, model_fn: ModelFn, threads: int) -> nn.Module:
    """This worker's scratch model for the runtime ``model_key``, built once."""
    if threads:
        torch.set_num_threads(threads)
    model = _MODELS.get(model_key)
    if model is None:
        model = _MODELS[model_key] = model_fn()
    return model


def _client_step(
    model_key: str,
    model_fn: ModelFn,
    threads: int,
    x: np.ndarray,
    y: np.ndarray,
    indices: np.ndarray,
    fn: ClientStep,
    state: Any,
    *args: Any,
) -> tuple[Any, tuple[Any, BaseException | None]]:
    """Run one client's step in a Ray worker: ``(state, (reply, error))``.

    An error comes back as a value beside the state as it stood when it was raised,
    so the driver re-raises the client's own exception, as the simulation would.
    """
    model = _worker_model(model_key, model_fn, threads)
    cx, cy = torch.from_numpy(x[indices]), torch.from_numpy(y[indices])
    try:
        state, reply = fn(state, model, cx, cy, *args)
    except Exception as exc:  # returned, re-raised by the driver
        return state, (None, exc)
    return state, (reply, None)


def _client_task(
    algorithm: FederatedAlgorithm,
    model_key: str,
    model_fn: ModelFn,
    task: ClientTask,
    global_state: dict[str, torch.Tensor] | None,
    x: np.ndarray,
    y: np.ndarray,
    indices: np.ndarray,
    threads: int,
) -> tuple[ClientResult | None, BaseException | None, Any]:
    """Run one client in a Ray worker: ``(result, error, client state)``.

    A veil error (a client whose next step would exceed its privacy budget) comes back
    as a value, with the client's state as it stood when the error was raised, so the
    driver records exactly what the simulation runtime would have.
    """
    model = _worker_model(model_key, model_fn, threads)
    # None: the task's model is the algorithm's own, which came with the algorithm.
    state = algorithm.global_state if global_state is None else global_state  # type: ignore[attr-defined]
    task = dataclasses.replace(task, global_state=state)
    # Gather the client's rows: a copy of its examples only, never of the dataset.
    cx, cy = torch.from_numpy(x[indices]), torch.from_numpy(y[indices])
    get_state, _ = client_state_hooks(algorithm)
    try:
        result = algorithm.client_fit(task, model, cx, cy)
    except Exception as exc:  # returned, re-raised by the driver
        return None, exc, get_state(task.client_id)
    return result, None, get_state(task.client_id)


class RayRuntime:
    """Runs every client of a round as a Ray task.

    Args:
        model_fn: builds the model architecture clients train (weights are
            overwritten by each task). Must be picklable (a module-level function or
            a ``functools.partial`` of one; a lambda works with Ray's cloudpickle).
        train: the training set; put in the object store once.
        client_indices: for each client, the indices of its examples in ``train``.
        address: an existing Ray cluster (``"auto"``, ``"ray://host:10001"``, ...);
            ``None`` starts a local Ray, or joins the one already running in this
            process.
        num_cpus: CPUs of a local Ray started here (``None``: all of this machine's).
        cpus_per_client: CPUs Ray reserves for one client task (> 0; may be a
            fraction to run several clients per CPU).
        memory_per_client: bytes of memory Ray reserves for one client task, or
            ``None`` for no reservation.
        threads: torch threads inside a task; ``None`` uses the driver's current
            number, so results match the simulation runtime bit for bit.
    """

    def __init__(
        self,
        model_fn: ModelFn,
        train: Dataset,
        client_indices: Sequence[np.ndarray],
        *,
        address: str | None = None,
        num_cpus: int | None = None,
        cpus_per_client: float = 1.0,
        memory_per_client: int | None = None,
        threads: int | None = None,
    ) -> None:
        empty = [k for k, idx in enumerate(client_indices) if len(idx) == 0]
        if empty:
            raise DataError(
                f"clients {empty[:10]} have no examples; choose fewer clients or "
                "another partition"
            )
        if not cpus_per_client > 0:
            raise ConfigError(f"cpus_per_client must be > 0, got {cpus_per_client}")
        if memory_per_client is not None and memory_per_client <= 0:
            raise ConfigError(
                f"memory_per_client must be > 0 bytes, got {memory_per_client}"
            )
        self._ray = ray = _import_ray()
        self._started = not ray.is_initialized()
        if self._started:
            ray.init(
                address=address,
                num_cpus=None if address else num_cpus,
                include_dashboard=False,
                logging_level=logging.WARNING,
                log_to_driver=False,
            )
        resources: dict[str, Any] = {"num_cpus": cpus_per_client}
        if memory_per_client is not None:
            resources["memory"] = memory_per_client
        self._remote = ray.remote(_client_task).options(**resources)
        self._remote_step = ray.remote(_client_step).options(num_returns=2, **resources)
        self._model_fn = ray.put(model_fn)
        self._model_key = uuid.uuid4().hex
        self._x = ray.put(train.x.numpy())
        self._y = ray.put(train.y.numpy())
        self._indices = [np.asarray(i, dtype=np.int64) for i in client_indices]
        self._threads = torch.get_num_threads() if threads is None else threads

    @property
    def num_clients(self) -> int:
        return len(self._indices)

    def run_round(self, algorithm: FederatedAlgorithm, rnd: int) -> RoundStats:
        """Configure, run the chosen clients as Ray tasks, aggregate.

        Raises:
            DataError: a task names a client this runtime does not hold.
            Exception: the first error a client raised (in task order), after the
                state of every client that ran has been loaded back; nothing is
                aggregated.
        """
        ray = self._ray
        start = time.perf_counter()
        tasks = algorithm.configure_round(rnd)
        check_clients(tasks, self.num_clients)
        algorithm_ref = ray.put(algorithm)
        # The algorithm carries its global model; a task sent another model (by
        # identity) gets one object per distinct model.
        own = getattr(algorithm, "global_state", None)
        states: dict[int, Any] = {}
        for task in tasks:
            if task.global_state is not own and id(task.global_state) not in states:
                states[id(task.global_state)] = ray.put(task.global_state)
        refs = [
            self._remote.remote(
                algorithm_ref,
                self._model_key,
                self._model_fn,
                dataclasses.replace(task, global_state={}),
                states.get(id(task.global_state)),
                self._x,
                self._y,
                self._indices[task.client_id],
                self._threads,
            )
            for task in tasks
        ]
        outcomes = ray.get(refs)

        _, load_state = client_state_hooks(algorithm)
        results: list[ClientResult] = []
        errors: list[BaseException] = []
        for task, (result, error, state) in zip(tasks, outcomes, strict=True):
            load_state(task.client_id, state)
            if error is not None:
                errors.append(error)
            elif result is not None:
                results.append(result)
        if errors:
            raise errors[0]
        algorithm.aggregate(rnd, results)
        return round_stats(rnd, tasks, results, time.perf_counter() - start)

    def run_client(
        self, fn: ClientStep, client_id: int, state: Any, *args: Any
    ) -> tuple[Any, Any]:
        """Run ``fn(state, model, x, y, *args)`` for one client as a Ray task.

        ``state`` is the client's state or the reference a previous call returned.
        Returns a reference to the client's new state, which stays in the object
        store, and the reply (``fn`` and ``args`` must be picklable).

        Raises:
            DataError: ``client_id`` is not a client this runtime holds.
            Exception: the error ``fn`` raised.
        """
        check_client(client_id, self.num_clients)
        state_ref, reply_ref = self._remote_step.remote(
            self._model_key,
            self._model_fn,
            self._threads,
            self._x,
            self._y,
            self._indices[client_id],
            fn,
            state,
            *args,
        )
        reply, error = self._ray.get(reply_ref)
        if error is not None:
            raise error
        return state_ref, reply

    def fetch(self, states: Sequence[Any]) -> list[Any]:
        """The client states behind ``states``: references are fetched from the
        object store (in one call), anything else is returned as it is."""
        ray = self._ray
        refs = [i for i, s in enumerate(states) if isinstance(s, ray.ObjectRef)]
        out = list(states)
        for i, value in zip(refs, ray.get([out[i] for i in refs]), strict=True):
            out[i] = value
        return out

    def shutdown(self) -> None:
        """Disconnect from Ray if this runtime connected (stopping a local Ray it
        started); a Ray that was already running in this process is left running."""
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
        self._started = False
