"""``veil infer``: private cloud inference (ARDEN) from the command line.

Five commands, thin wrappers over :mod:`veil.inference`:

- ``veil infer train CONFIG``: train the device and cloud parts, measure accuracy
  against epsilon, write the parts (safetensors + JSON) and ``report.md`` into a run
  directory;
- ``veil infer evaluate RUN_DIR``: re-measure the run's accuracies over several
  independent perturbations of the test set (mean, sd, range);
- ``veil infer serve RUN_DIR``: serve a cloud part over HTTP (FastAPI + uvicorn);
- ``veil infer export RUN_DIR``: write the device part to ONNX, check it with
  onnxruntime against PyTorch, print size, parameter count and latency;
- ``veil infer query RUN_DIR``: run the device part on inputs, perturb them, ask the
  cloud, print the predictions and the epsilon spent. The device's privacy ledger is
  kept in a JSON file, so its budget holds across calls.

Errors veil raises on purpose print one message and exit with status 2.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer

from veil.errors import VeilError

__all__ = ["app", "evaluate", "export", "query", "serve", "train"]

app = typer.Typer(
    name="infer",
    help="Private cloud inference: device-side perturbation and noisy training.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

RunDir = Annotated[
    Path, typer.Argument(help="Run directory written by `veil infer train`.")
]
Cloud = Annotated[
    str | None,
    typer.Option("--cloud", help="Cloud part to use (default: the deployed one)."),
]


def _fail(exc: VeilError) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(code=2)


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="Inference config (TOML).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the run.")] = Path(
        "runs"
    ),
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", envvar="VEIL_DATA", help="Folder of datasets."),
    ] = None,
) -> None:
    """Train both parts of CONFIG's split model and report accuracy against epsilon."""
    from veil.inference.config import load_inference_config
    from veil.inference.experiment import run_inference

    try:
        cfg = load_inference_config(config)
        run_dir = run_inference(cfg, out, data_dir, progress=typer.echo)
    except VeilError as exc:
        raise _fail(exc) from None
    typer.echo(f"done: {run_dir}/report.md")


@app.command()
def evaluate(
    run_dir: RunDir,
    draws: Annotated[
        int, typer.Option("--draws", min=1, help="Perturbations of the test set.")
    ] = 5,
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", envvar="VEIL_DATA", help="Folder of datasets."),
    ] = None,
) -> None:
    """Re-measure RUN_DIR's accuracies against epsilon over several noise draws."""
    from veil.inference.evaluate import evaluate_run, format_evaluation

    try:
        result = evaluate_run(run_dir, draws, data_dir)
    except VeilError as exc:
        raise _fail(exc) from None
    typer.echo(format_evaluation(result))
    typer.echo(f"written: {run_dir}/evaluation.json")


@app.command()
def serve(
    run_dir: RunDir,
    cloud: Cloud = None,
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8000,
    max_batch: Annotated[
        int, typer.Option("--max-batch", min=1, help="Most inputs per request.")
    ] = 256,
) -> None:
    """Serve a cloud part of RUN_DIR over HTTP (POST /predict, GET /info)."""
    import uvicorn

    from veil.inference.artifacts import load_split, read_spec
    from veil.inference.service import create_app

    try:
        name = cloud or read_spec(run_dir).deployed
        split = load_split(run_dir, [name])
    except VeilError as exc:
        raise _fail(exc) from None
    spec = split.spec
    service = create_app(split.clouds[name], spec.features, spec.num_classes, max_batch)
    typer.echo(f"serving cloud part {name!r} of {run_dir} on http://{host}:{port}")
    uvicorn.run(service, host=host, port=port, log_level="warning")


@app.command()
def export(
    run_dir: RunDir,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="ONNX file (default RUN_DIR/device.onnx)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Write the device part of RUN_DIR to ONNX and check it against PyTorch."""
    import torch

    from veil.inference.artifacts import load_split
    from veil.inference.export import export_device

    try:
        split = load_split(run_dir, clouds=[])
        generator = torch.Generator().manual_seed(0)
        example = torch.randn(16, *split.spec.input_shape, generator=generator)
        report = export_device(
            split.device_part, example, out or run_dir / "device.onnx"
        )
    except VeilError as exc:
        raise _fail(exc) from None
    result = {
        "path": str(report.path),
        "size_bytes": report.size_bytes,
        "parameters": report.parameters,
        "max_abs_diff": report.max_abs_diff,
        "onnx_ms": report.onnx_ms,
        "torch_ms": report.torch_ms,
    }
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo(
        f"{report.path}: {report.size_bytes} bytes, {report.parameters} parameters; "
        f"onnxruntime matches PyTorch (max difference {report.max_abs_diff:.2e}); "
        f"latency per input: onnxruntime {report.onnx_ms:.3f} ms, "
        f"PyTorch {report.torch_ms:.3f} ms"
    )


@app.command()
def query(
    run_dir: RunDir,
    url: Annotated[str, typer.Option("--url", help="The cloud service.")] = (
        "http://127.0.0.1:8000"
    ),
    inputs: Annotated[
        Path | None,
        typer.Option(
            "--inputs",
            help="safetensors file with a tensor 'x' of inputs (N, *input_shape), "
            "preprocessed as in training; default: test inputs of the dataset.",
        ),
    ] = None,
    count: Annotated[
        int, typer.Option("--count", min=1, help="Test inputs to send (no --inputs).")
    ] = 8,
    epsilon: Annotated[
        float | None,
        typer.Option("--epsilon", help="Per-query epsilon (default: the deployed)."),
    ] = None,
    budget: Annotated[
        float | None,
        typer.Option(
            "--budget", help="The device's total epsilon (basic composition)."
        ),
    ] = None,
    ledger: Annotated[
        Path | None,
        typer.Option("--ledger", help="JSON file of the device's privacy ledger."),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", envvar="VEIL_DATA", help="Folder of datasets."),
    ] = None,
) -> None:
    """Run the device part on inputs, perturb them and ask the cloud at URL."""
    from veil.inference.query import run_query

    try:
        result = run_query(
            run_dir, url, inputs, count, epsilon, budget, ledger, data_dir
        )
    except VeilError as exc:
        raise _fail(exc) from None
    shown = {
        k: (None if isinstance(v, float) and math.isinf(v) else v)
        for k, v in result.items()
    }
    typer.echo(json.dumps(shown))
