"""``veil privacy``: privacy accounting from the command line.

Two commands, both thin wrappers over :mod:`veil.privacy.accounting`:

- ``veil privacy epsilon``: the epsilon that DP-SGD with a noise multiplier, sample rate
  and number of steps spends at a delta;
- ``veil privacy calibrate``: the smallest noise multiplier that keeps epsilon at or
  below a target.

With ``--json`` each prints one JSON object holding the answer (``epsilon`` or
``noise_multiplier``) and every input; an infinite epsilon (no noise) is ``null``.
Errors veil raises on purpose print one message and exit with status 2.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any

import typer

from veil.errors import VeilError
from veil.privacy.accounting import (
    Accountant,
    NeighbouringRelation,
    calibrate_noise_multiplier,
    dpsgd_epsilon,
)

__all__ = ["app", "calibrate", "epsilon"]

app = typer.Typer(
    name="privacy",
    help="Differential-privacy accounting for DP-SGD (epsilon, calibration).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

SampleRate = Annotated[
    float,
    typer.Option(
        "--sample-rate",
        help="Probability that an example is in a step's batch (Poisson), in (0, 1].",
    ),
]
Steps = Annotated[int, typer.Option("--steps", help="Number of DP-SGD steps, >= 0.")]
Delta = Annotated[float, typer.Option("--delta", help="Target delta, in (0, 1).")]
AccountantOpt = Annotated[
    Accountant,
    typer.Option(
        "--accountant",
        help="pld (privacy loss distributions, tightest) or rdp (Renyi DP).",
    ),
]
Relation = Annotated[
    NeighbouringRelation,
    typer.Option(
        "--relation",
        help="Neighbouring datasets: add_or_remove_one example, or replace_one.",
    ),
]
Json = Annotated[
    bool, typer.Option("--json", help="Print one JSON object instead of text.")
]


@app.command()
def epsilon(
    noise_multiplier: Annotated[
        float,
        typer.Option(
            "--noise-multiplier",
            help="Noise standard deviation divided by the clipping norm, >= 0.",
        ),
    ],
    sample_rate: SampleRate,
    steps: Steps,
    delta: Delta,
    accountant: AccountantOpt = Accountant.PLD,
    relation: Relation = NeighbouringRelation.ADD_OR_REMOVE_ONE,
    as_json: Json = False,
) -> None:
    """Epsilon spent by STEPS steps of DP-SGD at DELTA."""
    try:
        value = dpsgd_epsilon(
            noise_multiplier,
            sample_rate,
            steps,
            delta,
            accountant.value,
            relation.value,
        )
    except VeilError as exc:
        raise _fail(exc) from None
    inputs = {
        "noise_multiplier": noise_multiplier,
        "sample_rate": sample_rate,
        "steps": steps,
        "delta": delta,
        "accountant": accountant.value,
        "relation": relation.value,
    }
    shown = None if math.isinf(value) else value
    _print({"epsilon": shown, **inputs}, as_json, f"epsilon = {value:.6g}", inputs)


@app.command()
def calibrate(
    target_epsilon: Annotated[
        float, typer.Option("--target-epsilon", help="The epsilon to meet, > 0.")
    ],
    sample_rate: SampleRate,
    steps: Steps,
    delta: Delta,
    accountant: AccountantOpt = Accountant.PLD,
    relation: Relation = NeighbouringRelation.ADD_OR_REMOVE_ONE,
    tolerance: Annotated[
        float,
        typer.Option("--tolerance", help="Absolute precision of the answer, > 0."),
    ] = 1e-3,
    as_json: Json = False,
) -> None:
    """Smallest noise multiplier whose epsilon is at most TARGET_EPSILON."""
    try:
        value = calibrate_noise_multiplier(
            target_epsilon,
            sample_rate,
            steps,
            delta,
            accountant.value,
            relation.value,
            tolerance,
        )
        reached = dpsgd_epsilon(
            value, sample_rate, steps, delta, accountant.value, relation.value
        )
    except VeilError as exc:
        raise _fail(exc) from None
    inputs = {
        "target_epsilon": target_epsilon,
        "sample_rate": sample_rate,
        "steps": steps,
        "delta": delta,
        "accountant": accountant.value,
        "relation": relation.value,
        "tolerance": tolerance,
    }
    text = f"noise_multiplier = {value:.6g} (epsilon = {reached:.6g})"
    result = {"noise_multiplier": value, "epsilon": reached, **inputs}
    _print(result, as_json, text, inputs)


def _print(result: dict[str, Any], as_json: bool, text: str, inputs: dict) -> None:
    if as_json:
        typer.echo(json.dumps(result))
    else:
        details = ", ".join(f"{k}={v}" for k, v in inputs.items())
        typer.echo(f"{text}  [{details}]")


def _fail(exc: VeilError) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(code=2)
