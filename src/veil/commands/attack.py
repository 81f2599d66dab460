"""``veil attack RUN_DIR``: attack a finished run and add the results to its report.

A thin wrapper over :func:`veil.attacks.run.attack_run`, then
:func:`veil.experiment.write_report`. Errors veil raises on purpose print one
message and exit with status 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from veil.errors import VeilError

__all__ = ["app", "attack"]

app = typer.Typer(
    name="attack",
    help="Attack a finished run (gradient inversion, membership inference) and add "
    "an Attacks section to its report.",
    add_completion=False,
    pretty_exceptions_enable=False,
    # One command, no subcommands: options may follow RUN_DIR.
    context_settings={"allow_interspersed_args": True},
    subcommand_metavar="",
)


@app.callback(invoke_without_command=True)
def attack(
    run_dir: Annotated[Path, typer.Argument(help="A run directory of `veil run`.")],
    victims: Annotated[
        int, typer.Option(help="Examples of client 0 to reconstruct (0 skips).")
    ] = 4,
    members: Annotated[
        int, typer.Option(help="Members (and as many non-members) scored per model.")
    ] = 2000,
    references: Annotated[
        int, typer.Option(help="Reference models for the calibrated attack (0 skips).")
    ] = 2,
    reference_epochs: Annotated[
        int, typer.Option(help="SGD epochs of each reference model.")
    ] = 3,
    iterations: Annotated[
        int, typer.Option(help="L-BFGS steps of each reconstruction.")
    ] = 40,
    restarts: Annotated[
        int, typer.Option(help="Random starts per reconstruction.")
    ] = 2,
    seed: Annotated[int, typer.Option(help="Seed of the attacks.")] = 0,
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", envvar="VEIL_DATA", help="Folder of the datasets."),
    ] = None,
) -> None:
    """Attack RUN_DIR and add an Attacks section to its report.md."""
    from veil.attacks.run import AttackSettings, attack_run
    from veil.experiment import write_report

    try:
        settings = AttackSettings(
            victims=victims,
            members=members,
            references=references,
            reference_epochs=reference_epochs,
            iterations=iterations,
            restarts=restarts,
            seed=seed,
        )
        path = attack_run(run_dir, settings, data_dir)
        report = write_report(run_dir)
    except VeilError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    typer.echo(f"{path}\n{report}")
