"""The ``veil`` command: parses arguments, calls the library, prints results.

Errors veil raises on purpose (bad config, missing data, refused update) are printed as
one clear message and exit with status 2; anything else is a bug and shows a traceback.
"""

from __future__ import annotations

import logging
import os
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from veil.commands.attack import app as attack_app
from veil.commands.infer import app as infer_app
from veil.commands.network import certs, join, serve
from veil.commands.privacy import app as privacy_app
from veil.errors import VeilError

#: The files that mark a run directory of `veil infer` (its report is built from them).
INFERENCE_RUN_FILES = ("results.json", "split-model.json")

__all__ = ["app", "demo", "report", "run"]

app = typer.Typer(
    name="veil",
    help="Privacy-preserving deep learning for mobile devices.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(privacy_app, name="privacy")
app.add_typer(attack_app, name="attack")
app.add_typer(infer_app, name="infer")
app.command()(serve)
app.command()(join)
app.command()(certs)
err = Console(stderr=True)

DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        envvar="VEIL_DATA",
        help="Folder holding the datasets (e.g. DIR/mnist/); default: ./data, then "
        "the data/ folder of the veil checkout.",
    ),
]
OutRoot = Annotated[
    Path, typer.Option("--out", help="Folder in which the run directory is created.")
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
RayAddress = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        help="Run the clients on this existing Ray cluster ('auto', "
        "'ray://host:10001'): sets runtime = 'ray' and [ray] address.",
    ),
]


def _fail(exc: VeilError) -> typer.Exit:
    err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


def _run(
    config_text: str | Path,
    out: Path,
    data_dir: Path | None,
    quiet: bool,
    ray_address: str | None = None,
) -> None:
    from veil.experiment import load_config, run_experiment
    from veil.experiment.config import with_ray_address

    config = load_config(config_text)
    if data_dir is not None and config.runtime == "network":
        os.environ["VEIL_DATA"] = str(data_dir)  # the device processes read it
    if ray_address is not None:
        config = with_ray_address(config, ray_address)
    run_dir = run_experiment(config, out, data_dir=data_dir, progress=not quiet)
    summary = (run_dir / "summary.json").read_text()
    err.print(f"[bold green]done:[/] {run_dir}/report.md")
    if quiet:
        typer.echo(summary)


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="Experiment config (TOML).")],
    out: OutRoot = Path("runs"),
    data_dir: DataDir = None,
    quiet: Quiet = False,
    ray_address: RayAddress = None,
) -> None:
    """Run the experiment CONFIG and write a run directory with its report."""
    try:
        _run(config, out, data_dir, quiet, ray_address)
    except VeilError as exc:
        raise _fail(exc) from None


@app.command()
def demo(
    out: OutRoot = Path("runs"),
    data_dir: DataDir = None,
    quiet: Quiet = False,
    network: Annotated[
        bool,
        typer.Option(
            "--network",
            help="Run FedAvg over HTTP: a server and device processes on 127.0.0.1.",
        ),
    ] = False,
) -> None:
    """Run the bundled demo: FedAvg on full MNIST, 100 clients, with both baselines."""
    demo_config = resources.files("veil.experiment") / "configs" / "demo.toml"
    try:
        with resources.as_file(demo_config) as path:
            if network:
                path = _with_network(path)
            _run(path, out, data_dir, quiet)
    except VeilError as exc:
        raise _fail(exc) from None


def _with_network(config: Path) -> Path:
    """The demo config with ``runtime = "network"``."""
    import tempfile

    text = 'runtime = "network"\n' + config.read_text()
    out = Path(tempfile.mkdtemp(prefix="veil-demo-")) / "demo-network.toml"
    out.write_text(text)
    return out


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory of `veil run`.")],
) -> None:
    """Rebuild the report of RUN_DIR from its config and metrics (or, for a run of
    `veil infer`, from its results.json and split-model.json)."""
    from veil.experiment import write_report
    from veil.inference.experiment import write_inference_report

    inference = all((run_dir / f).is_file() for f in INFERENCE_RUN_FILES)
    try:
        path = write_inference_report(run_dir) if inference else write_report(run_dir)
    except VeilError as exc:
        raise _fail(exc) from None
    typer.echo(str(path))


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log INFO.")] = False,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            min=1,
            help="Torch threads per process (default: torch's choice). Small models "
            "with small batches run fastest on 1, especially on a busy machine.",
        ),
    ] = None,
) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
