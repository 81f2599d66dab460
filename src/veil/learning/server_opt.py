"""The server's step on the averaged update: learning rate and momentum.

FedAvg and DP-FedAvg both end a round with an averaged update ``mean`` (FedAvg the
example-weighted mean of the updates, DP-FedAvg the noisy sum over the expected
number of clients). Plain FedAvg adds it to the global model. With a server
optimizer (FedAvgM, Hsu et al. 2019; DP-FedAvg with server momentum, McMahan et al.
2018, Andrew et al. 2021) the server keeps a velocity ``v`` and steps

    v <- momentum * v + mean
    w <- w + lr * v

``lr = 1, momentum = 0`` is plain averaging, bit for bit. Under DP the step is
post-processing of the released ``mean``: it changes no epsilon. Momentum lets the
noise of successive rounds average out while the signal adds up, which is why it
helps DP-FedAvg with few clients per round.
"""

from __future__ import annotations

import math

import torch

from veil.errors import ConfigError
from veil.learning._types import StateDict

__all__ = ["check_server_optimizer", "server_step"]


def check_server_optimizer(lr: float, momentum: float) -> None:
    """Refuse a server learning rate that is not finite and > 0, or a momentum
    outside [0, 1)."""
    if not (math.isfinite(lr) and lr > 0 and 0 <= momentum < 1):
        raise ConfigError(
            "server_lr must be finite and > 0 and server_momentum in [0, 1), got "
            f"{lr} and {momentum}"
        )


def server_step(
    global_state: StateDict,
    mean: StateDict,
    velocity: StateDict | None,
    lr: float = 1.0,
    momentum: float = 0.0,
) -> tuple[StateDict, StateDict]:
    """The new global model and velocity after one server step.

    Args:
        global_state: the current global model (left untouched).
        mean: the round's averaged update, one tensor per model tensor; the step
            is taken in its dtype (float64 for DP-FedAvg's noisy mean) and cast back
            to each model tensor's dtype.
        velocity: the previous velocity, or ``None`` in the first round (zeros).
        lr: the server learning rate, > 0.
        momentum: the server momentum, in [0, 1).

    Returns:
        ``(new_global_state, new_velocity)``; neither aliases the inputs.
    """
    check_server_optimizer(lr, momentum)
    new_velocity = {
        name: m.clone()
        if velocity is None or momentum == 0
        else velocity[name] * momentum + m
        for name, m in mean.items()
    }
    with torch.no_grad():
        new_state = {
            name: (value.to(new_velocity[name].dtype) + lr * new_velocity[name]).to(
                value.dtype
            )
            for name, value in global_state.items()
        }
    return new_state, new_velocity
