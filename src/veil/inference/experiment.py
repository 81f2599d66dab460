"""``veil infer train``: train both parts, measure accuracy against epsilon, report.

The run, for a validated :class:`~veil.inference.config.InferenceConfig`:

1. load the dataset; its training split plays the public data both parts are trained
   on, its test split the private inputs of the devices' queries;
2. pretrain device part + bound + cloud part without noise, freeze the device part;
3. measure test accuracy of the split model without privacy (bound only);
4. compute the frozen device part's representations of the training inputs and of
   ``augmented_copies`` augmented copies of them, once;
5. for every epsilon of the report: accuracy of the plainly trained cloud part on
   perturbed representations; noisy training of a copy of it at that epsilon (fresh
   nullification and noise at every step), and its accuracy on perturbed
   representations;
6. write the parts (:mod:`veil.inference.artifacts`), ``results.json`` and
   ``report.md`` into a fresh run directory.

Every random choice comes from the run's seed (``veil._seeding``), so a config and a
seed give the same parts and numbers.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from veil._seeding import derive_seed, torch_generator
from veil.data import Dataset, load_dataset
from veil.errors import ConfigError
from veil.experiment.rundir import new_run_dir
from veil.inference.artifacts import SplitSpec, save_split
from veil.inference.config import InferenceConfig, dump_inference_config
from veil.inference.training import (
    Augment,
    FitSettings,
    Representations,
    affine_augment,
    evaluate_split,
    fit_cloud,
    pretrain,
    swap_augment,
)
from veil.models.split import SPLIT_LAYERS

__all__ = ["RESULTS_FORMAT", "cloud_name", "run_inference", "write_inference_report"]

logger = logging.getLogger(__name__)

RESULTS_FORMAT = "veil.inference-results/1"

# Random streams of an inference run (kept stable: results depend on them).
_STREAM = 100
_INIT, _PRETRAIN, _NOISY, _EVAL, _POOL = 0, 1, 2, 3, 4


def cloud_name(epsilon: float) -> str:
    """Name of the cloud part noisily trained at ``epsilon``: ``noisy-eps<E>``."""
    return f"noisy-eps{epsilon:g}"


def _capped(data: Dataset, cap: int | None) -> Dataset:
    if cap is None or cap >= len(data):
        return data
    return Dataset(data.x[:cap], data.y[:cap], data.num_classes)


def _augment(config: InferenceConfig, images: bool) -> Augment | None:
    nt = config.noisy_training
    kind = nt.augment
    if kind == "auto":
        kind = "affine" if images else "swap"
    if kind == "affine":
        return affine_augment(nt.rotation, nt.shift)
    if kind == "swap":
        return swap_augment(nt.swap_rate)
    return None


def _spec(config: InferenceConfig, train: Dataset, dataset: str) -> SplitSpec:
    m, p = config.model, config.perturbation
    return SplitSpec(
        model=m.name,
        input_shape=tuple(train.x.shape[1:]),
        num_classes=train.num_classes,
        features=m.features,
        hidden=m.hidden,
        split_layer=m.split_layer or SPLIT_LAYERS[m.name],
        bound=p.bound,
        nullification_rate=p.nullification_rate,
        epsilon=p.epsilon,
        dataset=dataset,
    )


def run_inference(
    config: InferenceConfig,
    out: Path,
    data_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Run the experiment of ``config`` (see the module docstring).

    Returns:
        The run directory.
    """
    say = progress or (lambda _text: None)
    data = load_dataset(config.data.dataset, data_dir or config.data.data_dir)
    train = _capped(data.train, config.data.max_train)
    test = _capped(data.test, config.data.max_test)
    spec = _spec(config, train, data.name)
    seed = config.seed

    # Pretrain both parts on public data, then freeze the device part.
    torch.manual_seed(derive_seed(seed, _STREAM, _INIT))
    device, plain = spec.build()
    start = time.perf_counter()
    fit = config.pretrain
    settings = FitSettings(fit.epochs, fit.lr, fit.batch_size)
    say(f"pretraining on {len(train)} examples")
    pretrain(device, plain, train.x, train.y, settings, _gen(seed, _PRETRAIN))
    pretrain_seconds = time.perf_counter() - start
    baseline = evaluate_split(device, plain, test.x, test.y, None, _gen(seed, _EVAL))
    say(f"split model without privacy: accuracy {baseline:.4f}")

    nt = config.noisy_training
    start = time.perf_counter()
    augment = _augment(config, images=train.x.dim() == 4)
    if nt.augmented_fraction == 0:
        augment = None  # no augmented input is ever drawn: compute none
    pool = Representations.compute(
        device, train.x, _gen(seed, _POOL), augment, nt.augmented_copies
    )
    pool_seconds = time.perf_counter() - start
    rows, clouds = [], {"plain": plain}
    for epsilon in config.epsilons():
        row, noisy = _measure(config, spec, device, plain, pool, train, test, epsilon)
        rows.append(row)
        clouds[cloud_name(epsilon)] = noisy
        say(
            f"epsilon {epsilon:g}: plain {row['plain_accuracy']:.4f}, "
            f"noisy training {row['noisy_accuracy']:.4f}"
        )

    spec = _with_clouds(spec, config)
    run_dir = new_run_dir(out, config.name)
    (run_dir / "config.toml").write_text(dump_inference_config(config))
    save_split(run_dir, spec, device, clouds)
    results = {
        "format": RESULTS_FORMAT,
        "dataset": data.name,
        "train_examples": len(train),
        "test_examples": len(test),
        "baseline_accuracy": baseline,
        "pretrain_seconds": pretrain_seconds,
        "representations_seconds": pool_seconds,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_inference_report(run_dir)
    return run_dir


def _gen(seed: int, stream: int, *keys: int) -> torch.Generator:
    return torch_generator(seed, _STREAM, stream, *keys)


def _measure(
    config: InferenceConfig,
    spec: SplitSpec,
    device: nn.Sequential,
    plain: nn.Sequential,
    pool: Representations,
    train: Dataset,
    test: Dataset,
    epsilon: float,
) -> tuple[dict[str, Any], nn.Sequential]:
    """Accuracy of the plain and of a noisily trained cloud part at ``epsilon``."""
    perturbation = spec.perturbation(epsilon)
    key = round(epsilon * 1000)
    plain_acc = evaluate_split(
        device, plain, test.x, test.y, perturbation, _gen(config.seed, _EVAL, key)
    )
    nt = config.noisy_training
    noisy = copy.deepcopy(plain)
    start = time.perf_counter()
    fit_cloud(
        noisy,
        pool,
        train.y,
        perturbation,
        FitSettings(nt.epochs, nt.lr, nt.batch_size, nt.lr_schedule),
        _gen(config.seed, _NOISY, key),
        nt.augmented_fraction,
    )
    seconds = time.perf_counter() - start
    noisy_acc = evaluate_split(
        device, noisy, test.x, test.y, perturbation, _gen(config.seed, _EVAL, key)
    )
    row = {
        "epsilon": epsilon,
        "laplace_scale": perturbation.scale,
        "sensitivity": perturbation.sensitivity,
        "plain_accuracy": plain_acc,
        "noisy_accuracy": noisy_acc,
        "noisy_training_seconds": seconds,
    }
    return row, noisy


def _with_clouds(spec: SplitSpec, config: InferenceConfig) -> SplitSpec:
    clouds: dict[str, float | None] = {"plain": None}
    clouds.update({cloud_name(e): e for e in config.epsilons()})
    deployed = cloud_name(config.perturbation.epsilon)
    return SplitSpec(**{**spec.__dict__, "clouds": clouds, "deployed": deployed})


def write_inference_report(run_dir: Path) -> Path:
    """Write ``report.md`` from ``results.json`` and ``split-model.json``."""
    try:
        return _inference_report(
            run_dir,
            json.loads((run_dir / "results.json").read_text()),
            json.loads((run_dir / "split-model.json").read_text()),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"cannot rebuild the report of {run_dir} from results.json and "
            f"split-model.json ({type(exc).__name__}: {exc}); they should be the "
            "files `veil infer run` wrote"
        ) from None


def _inference_report(
    run_dir: Path, results: dict[str, Any], spec: dict[str, Any]
) -> Path:
    base = results["baseline_accuracy"]
    lines = [
        f"# Private inference: {results['dataset']}",
        "",
        f"Split model `{spec['model']}` cut at layer {spec['split_layer']}; the "
        f"device sends a {spec['features']}-element representation. Trained on "
        f"{results['train_examples']} examples, measured on "
        f"{results['test_examples']} test inputs (one query each).",
        "",
        "Mechanism per query: scale the representation to L1 norm "
        f"B = {spec['bound']:g}, zero a random {spec['nullification_rate']:g} of its "
        "elements (drawn independently of the input), add i.i.d. Laplace noise of "
        "scale b = 2B / epsilon to every element. Neighbouring inputs: any two "
        "inputs (the query input replaced by any other); L1 sensitivity 2B; each "
        "query is epsilon-DP (pure). No amplification is claimed for nullification.",
        "",
        f"Split model without privacy (bound only): **{100 * base:.2f}%**.",
        "",
        "| epsilon per query | Laplace scale b | plainly trained cloud part | "
        "noisily trained cloud part | plain loses | noisy loses |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in results["rows"]:
        p, n = row["plain_accuracy"], row["noisy_accuracy"]
        lines.append(
            f"| {row['epsilon']:g} | {row['laplace_scale']:.4g} | {100 * p:.2f}% | "
            f"{100 * n:.2f}% | {100 * (base - p):.2f} | {100 * (base - n):.2f} |"
        )
    lines += ["", _must_show(results["rows"], base), ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _must_show(rows: list[dict[str, Any]], base: float) -> str:
    hits = [
        r["epsilon"]
        for r in rows
        if base - r["plain_accuracy"] >= 0.05 and base - r["noisy_accuracy"] <= 0.02
    ]
    if hits:
        listed = ", ".join(f"{e:g}" for e in hits)
        return (
            f"At epsilon {listed} the plainly trained cloud part loses at least 5 "
            "points and the noisily trained one at most 2."
        )
    return (
        "At no measured epsilon does the plainly trained cloud part lose at least 5 "
        "points while the noisily trained one loses at most 2."
    )
