"""Local training: what a client does with its own data between two rounds.

:class:`SGDTrainer` runs plain mini-batch SGD for ``epochs`` passes over the client's
examples in batches of ``batch_size``, shuffled by the client's own generator. It is the
``ClientUpdate`` step of McMahan et al. (2017) and the inner loop of every baseline.
Privacy-preserving trainers (DP-SGD) follow the same :class:`LocalTrainer` protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torch.nn import functional as F

from veil.errors import ConfigError

__all__ = ["LocalTrainer", "SGDTrainer", "TrainStats", "evaluate"]


@dataclass(frozen=True)
class TrainStats:
    """Summary of one call to a local trainer."""

    loss: float
    steps: int
    examples_seen: int


class LocalTrainer(Protocol):
    """Trains ``model`` in place on ``(x, y)``."""

    def train(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
    ) -> TrainStats: ...


@dataclass(frozen=True)
class SGDTrainer:
    """Mini-batch SGD with cross-entropy loss.

    Attributes:
        lr: learning rate, > 0.
        epochs: passes over the local data (E in McMahan et al.), >= 1.
        batch_size: examples per step (B), >= 1; the last batch of an epoch is
            smaller when B does not divide the data.
        max_steps: stop after this many steps in total, or ``None`` for no limit.
    """

    lr: float
    epochs: int = 1
    batch_size: int = 10
    max_steps: int | None = None

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")

    def train(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
    ) -> TrainStats:
        """Run SGD in place; batch order comes from ``generator`` only."""
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=self.lr)
        total_loss = torch.zeros(())
        steps, seen = 0, 0
        n = len(y)
        for _ in range(self.epochs):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, self.batch_size):
                if self.max_steps is not None and steps >= self.max_steps:
                    return TrainStats(float(total_loss) / max(steps, 1), steps, seen)
                idx = order[start : start + self.batch_size]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total_loss += loss.detach()
                steps += 1
                seen += len(idx)
        return TrainStats(float(total_loss) / max(steps, 1), steps, seen)


@torch.inference_mode()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2000
) -> tuple[float, float]:
    """Accuracy (a fraction in [0, 1]) and mean cross-entropy on ``(x, y)``."""
    model.eval()
    correct, loss = 0, 0.0
    for start in range(0, len(y), batch_size):
        logits = model(x[start : start + batch_size])
        target = y[start : start + batch_size]
        loss += F.cross_entropy(logits, target, reduction="sum").item()
        correct += int((logits.argmax(1) == target).sum())
    return correct / max(len(y), 1), loss / max(len(y), 1)
