"""The framework-free FedAvg pieces the benchmarks measure veil and Flower against.

A client's local training as a bare PyTorch loop (plain SGD, shuffled mini-batches
from the client's own generator) and FedAvg's example-weighted mean of the clients'
models. ``simulation_overhead.py`` and ``scale.py`` build their bare baseline from
these, and ``flower_task.py`` runs the same local training inside Flower, so every
variant of a benchmark does exactly the same arithmetic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["local_sgd", "snapshot", "weighted_mean"]


def local_sgd(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lr: float,
    epochs: int,
    batch: int,
    generator: torch.Generator,
) -> None:
    """Load ``state`` into ``model`` and train it in place on ``(x, y)``."""
    model.load_state_dict(state)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for s in range(0, len(y), batch):
            idx = order[s : s + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``model``'s state, detached from later training."""
    return {name: v.detach().clone() for name, v in model.state_dict().items()}


def weighted_mean(
    states: Sequence[Mapping[str, torch.Tensor]], sizes: Sequence[int]
) -> dict[str, torch.Tensor]:
    """FedAvg's aggregate: the clients' models weighted by their example counts."""
    total = sum(sizes)
    return {
        name: sum(s[name] * (n / total) for s, n in zip(states, sizes, strict=True))
        for name in states[0]
    }
