"""``veil attack RUN_DIR``: the attacks against a finished run, written into it.

Reads the run's config, models and privacy ledgers (never anything pickled), and
writes ``RUN_DIR/attacks/attacks.json`` (format :data:`ATTACKS_FORMAT`) and PNG
figures; the run's report then shows them in an *Attacks* section
(:mod:`veil.experiment._attacks`). Two attacks:

- gradient inversion (iDLG, cosine match) against the first examples of client 0,
  one at a time, as its first-round upload (the run's initial weights), produced by
  veil's own code (:mod:`veil.attacks.releases`): a FedAvg client's one-step update
  and, when the run used DP-SGD, one :class:`~veil.privacy.DPSGDTrainer` step at the
  run's noise multiplier and clipping norm; a DSSGD upload per θu of the run; a
  secure aggregation masked input (a round of two); DP-FedAvg's model release and,
  without secure aggregation, what its server receives (batch of one, the worst
  case for the client);
- membership inference against every final model in ``models/``: loss threshold,
  and, with ``references >= 1``, difficulty calibration with reference models
  trained on half of the test set. Members are training examples, non-members test
  examples that no reference model saw; each method's bound comes from its epsilon.
"""

from __future__ import annotations

import json
import logging
import math
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from safetensors.torch import load_file

from veil._seeding import Stream, numpy_rng
from veil.attacks.gradient_inversion import invert_gradients
from veil.attacks.membership import (
    calibrated_scores,
    loss_threshold_scores,
    membership_report,
    per_example_losses,
)
from veil.attacks.metrics import label_accuracy, psnr, ssim
from veil.attacks.releases import (
    ClientRelease,
    dp_fedavg_client_release,
    dp_fedavg_model_release,
    dpsgd_release,
    dssgd_release,
    fedavg_release,
    secagg_round,
)
from veil.data import FederatedDataset, load_dataset, partition
from veil.errors import ConfigError
from veil.experiment._attacks import ATTACKS_FORMAT
from veil.experiment._dp import read_privacy
from veil.experiment._dssgd import settings_from_config
from veil.experiment.config import ExperimentConfig, parse_config
from veil.experiment.runner import initial_state
from veil.learning import SGDTrainer
from veil.learning.dssgd import DSSGDSettings
from veil.models import build_model
from veil.privacy import DPSGDTrainer

__all__ = ["ATTACKS_FORMAT", "AttackSettings", "attack_run"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttackSettings:
    """What ``veil attack`` runs.

    Attributes:
        victims: examples of client 0 attacked by gradient inversion, >= 0.
        members: members (and as many non-members) scored per model, >= 1.
        references: reference models for the calibrated attack, >= 0 (0 skips it).
        reference_epochs: SGD epochs of each reference model, >= 1.
        iterations: L-BFGS steps of each inversion, >= 1.
        restarts: random starts of each inversion, >= 1.
        seed: seeds the choice of examples and the attacks.
    """

    victims: int = 4
    members: int = 2000
    references: int = 2
    reference_epochs: int = 3
    iterations: int = 40
    restarts: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.victims < 0 or self.references < 0:
            raise ConfigError(
                "victims and references must be >= 0, got "
                f"{self.victims} and {self.references}"
            )
        if min(self.members, self.reference_epochs, self.iterations, self.restarts) < 1:
            raise ConfigError(
                "members, reference_epochs, iterations and restarts must be >= 1"
            )


def _load(run_dir: Path) -> ExperimentConfig:
    path = run_dir / "config.toml"
    if not path.exists():
        raise ConfigError(f"{run_dir} is not a run directory: config.toml is missing")
    return parse_config(tomllib.loads(path.read_text()))


def attack_run(
    run_dir: str | Path,
    settings: AttackSettings | None = None,
    data_dir: str | Path | None = None,
) -> Path:
    """Run the attacks against ``run_dir`` and write ``attacks/attacks.json``."""
    run_dir = Path(run_dir)
    settings = settings or AttackSettings()
    config = _load(run_dir)
    dataset = load_dataset(config.data.dataset, data_dir or config.data.data_dir)
    out = run_dir / "attacks"
    out.mkdir(exist_ok=True)
    privacy = read_privacy(run_dir)
    record: dict[str, Any] = {"format": ATTACKS_FORMAT, "settings": vars(settings)}
    if settings.victims:
        record["inversion"] = _inversion(config, dataset, privacy, settings, out)
    record["membership"] = _membership(run_dir, config, dataset, privacy, settings)
    path = out / "attacks.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def _inversion(
    config: ExperimentConfig,
    dataset: FederatedDataset,
    privacy: dict[str, dict[str, Any]],
    settings: AttackSettings,
    out: Path,
) -> dict[str, Any]:
    """iDLG against client 0's first examples, at the run's initial weights."""
    model = build_model(config.model.name)
    model.load_state_dict(initial_state(config))
    train = dataset.train
    d = config.data
    clients = partition(
        d.partition,
        train.y.numpy(),
        d.num_clients,
        numpy_rng(config.seed, Stream.PARTITION),
        users=train.users,
        alpha=d.alpha,
        shards_per_client=d.shards_per_client,
    )
    victims = torch.as_tensor(clients[0][: settings.victims])
    low, high = float(train.x.min()), float(train.x.max())
    image = train.x.dim() == 4
    defences = _defences(config, privacy)
    rows: dict[str, list[dict[str, float | None]]] = {name: [] for name in defences}
    shown: dict[str, list[torch.Tensor]] = {name: [] for name in defences}
    for i, index in enumerate(victims.tolist()):
        x, y = train.x[index : index + 1], train.y[index : index + 1]
        for name, release_of in defences.items():
            release = release_of(model, x, y, i)
            attack = release.attack(
                match="cosine",
                iterations=settings.iterations,
                restarts=settings.restarts,
                tv_weight=0.01 if image else 0.0,
                input_bounds=(low, high),
            )
            rec = invert_gradients(
                model,
                release.observed,
                input_shape=tuple(x.shape[1:]),
                config=attack,
                generator=torch.Generator().manual_seed(settings.seed + i),
            )
            a, b = (rec.x - low) / (high - low), (x - low) / (high - low)
            rows[name].append(
                {
                    "psnr": float(psnr(a, b)),
                    "ssim": float(ssim(a, b))
                    if image and min(x.shape[-2:]) >= 11
                    else None,
                    "label_accuracy": label_accuracy(rec.labels, y),
                }
            )
            shown[name].append(a[0])
            logger.info("inversion %s, victim %d: %s", name, i, rows[name][-1])
        shown.setdefault("original", []).append(((x - low) / (high - low))[0])
    if image:
        _figure(shown, out / "inversion.png")
    return {
        "model": config.model.name,
        "weights": "initial (a client's first-round upload)",
        "victims": [int(v) for v in victims],
        "views": {name: _mean_rows(r) for name, r in rows.items()},
        "figure": "attacks/inversion.png" if image else None,
    }


#: One defence's release of a victim's batch: ``(model, x, y, victim index)``.
ReleaseOf = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, int], ClientRelease]


def _defences(
    config: ExperimentConfig, privacy: dict[str, dict[str, Any]]
) -> dict[str, ReleaseOf]:
    """The releases to attack, by name, each produced by veil's own module: a
    FedAvg client's one-step update at the run's local learning rate and, when the
    run used DP-SGD, one step of :class:`~veil.privacy.DPSGDTrainer` at the run's
    noise multiplier and clipping norm."""
    lr = config.local.lr
    views: dict[str, ReleaseOf] = {
        "undefended": lambda m, x, y, i: fedavg_release(m, x, y, lr=lr)
    }
    views.update(_module_defences(config, privacy))
    z = _noise_multiplier(privacy)
    if z is not None and config.dp is not None:
        trainer = DPSGDTrainer(
            lr=lr,
            clipping_norm=config.dp.clipping_norm,
            noise_multiplier=z,
            sample_rate=1.0,
        )
        views[f"DP-SGD step (z={z:.3g}, C={config.dp.clipping_norm:g})"] = (
            lambda m, x, y, i: dpsgd_release(
                m, x, y, trainer, torch.Generator().manual_seed(10_000 + i)
            )
        )
    return views


def _module_defences(
    config: ExperimentConfig, privacy: dict[str, dict[str, Any]]
) -> dict[str, ReleaseOf]:
    """The releases of the run's DSSGD, DP-FedAvg and secure aggregation, each by
    its own module, at the run's settings (a client's first turn on one example)."""
    lr = config.local.lr
    views: dict[str, ReleaseOf] = {}
    if "dssgd" in config.methods:
        for u in config.dssgd.upload_fractions:
            settings = settings_from_config(config.dssgd, u)
            name = f"DSSGD upload (theta_u={u:g}, {settings.selection})"
            views[name] = _dssgd_view(settings, lr)
    if "fedavg" in config.methods and config.fedavg.secure_aggregation:
        views["secure aggregation: masked input"] = lambda m, x, y, i: secagg_round(
            m, [(x, y), (x, (y + 1) % _classes(m, x))], lr=lr, secagg=config.secagg
        ).masked_release(0)
    dp = config.dp_fedavg
    ledger = privacy.get("dp-fedavg", {}).get("noise_multiplier", [])
    if "dp-fedavg" in config.methods and dp is not None and ledger:
        # A fixed-size round is recorded with z / 2 (replace-one; see DPFedAvg).
        z = float(ledger[0]) * (2.0 if dp.sampling == "fixed" else 1.0)
        where = "distributed" if dp.placement == "distributed" else "central"
        views[f"DP-FedAvg model release (z={z:.3g}, S={dp.clipping_norm:g})"] = (
            lambda m, x, y, i: dp_fedavg_model_release(
                m,
                x,
                y,
                lr=lr,
                clipping_norm=dp.clipping_norm,
                noise_multiplier=z,
                placement=where,
                seed=i,
            )
        )
        if not dp.secure_aggregation:
            views[f"DP-FedAvg server's view ({where})"] = lambda m, x, y, i: (
                dp_fedavg_client_release(
                    m,
                    x,
                    y,
                    lr=lr,
                    clipping_norm=dp.clipping_norm,
                    noise_multiplier=z,
                    placement=where,
                    seed=i,
                )
            )
    return views


def _dssgd_view(settings: DSSGDSettings, lr: float) -> ReleaseOf:
    def release(
        m: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, i: int
    ) -> ClientRelease:
        return dssgd_release(m, x, y, settings, lr=lr, seed=i)

    return release


def _classes(model: torch.nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        return int(model(x).shape[-1])


def _noise_multiplier(privacy: dict[str, dict[str, Any]]) -> float | None:
    """The smallest Gaussian noise multiplier any of the run's ledgers used."""
    values = [z for p in privacy.values() for z in p.get("noise_multiplier", [])]
    return min(values) if values else None


def _mean_rows(rows: list[dict[str, float | None]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in rows[0]:
        values = [float(v) for r in rows if (v := r[key]) is not None]
        out[key] = float(np.mean(values)) if values else None
    out["psnr_min"] = float(min(r["psnr"] or 0.0 for r in rows))
    return out


def _figure(shown: dict[str, list[torch.Tensor]], path: Path) -> None:
    names = ["original", *[n for n in shown if n != "original"]]
    cols = len(shown["original"])
    fig, axes = plt.subplots(
        len(names), cols, figsize=(1.2 * cols + 2.6, 1.2 * len(names)), squeeze=False
    )
    for r, name in enumerate(names):
        for c, img in enumerate(shown[name]):
            axes[r, c].imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _membership(
    run_dir: Path,
    config: ExperimentConfig,
    dataset: FederatedDataset,
    privacy: dict[str, dict[str, Any]],
    settings: AttackSettings,
) -> dict[str, Any]:
    """Both membership attacks against every final model except standalone's."""
    train, test = dataset.train, dataset.test
    rng = np.random.default_rng(settings.seed)
    order = rng.permutation(len(test))
    held_out, pool = order[: len(test) // 2], order[len(test) // 2 :]
    n = min(settings.members, len(pool), len(train))
    inside = torch.as_tensor(rng.choice(len(train), n, replace=False))
    outside = torch.as_tensor(pool[:n])
    x = torch.cat([train.x[inside], test.x[outside]])
    y = torch.cat([train.y[inside], test.y[outside]])
    members = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    references = _reference_losses(config, test, held_out, x, y, settings)

    results: dict[str, Any] = {}
    for path in sorted((run_dir / "models").glob("*.safetensors")):
        method = path.stem
        if method == "standalone":
            continue  # trained on one client's data, not the training set
        model = build_model(config.model.name)
        model.load_state_dict(load_file(path))
        losses = per_example_losses(model, x, y)
        p = privacy.get(method, {})
        eps = math.inf if p.get("epsilon") is None else float(p["epsilon"])
        delta = float(p.get("delta", 0.0)) if p else 0.0
        reports = [
            membership_report(
                "loss threshold", loss_threshold_scores(losses), members, eps, delta
            )
        ]
        if references is not None:
            name = f"calibrated ({len(references)} references)"
            scores = calibrated_scores(losses, references)
            reports.append(membership_report(name, scores, members, eps, delta))
        results[method] = [r.to_dict() for r in reports]
    return {"members": n, "non_members": n, "models": results}


def _reference_losses(
    config: ExperimentConfig,
    test: Any,
    held_out: np.ndarray,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: AttackSettings,
) -> np.ndarray | None:
    """Losses of reference models trained on ``held_out`` test examples, ``(R, N)``."""
    if settings.references == 0:
        return None
    local = config.local
    trainer = SGDTrainer(local.lr, settings.reference_epochs, local.batch_size)
    idx = torch.as_tensor(held_out)
    out = []
    for r in range(settings.references):
        with torch.random.fork_rng():
            torch.manual_seed(settings.seed * 1000 + r)
            model = build_model(config.model.name)
        generator = torch.Generator().manual_seed(settings.seed * 1000 + r)
        trainer.train(model, test.x[idx], test.y[idx], generator)
        out.append(per_example_losses(model, x, y))
        logger.info("reference model %d trained", r)
    return np.stack(out)
