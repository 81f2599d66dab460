"""The attacks of :mod:`veil.attacks` on MNIST: what each defence stops, measured.

Every gradient-inversion target is produced by veil's own code
(:mod:`veil.attacks.releases`), never simulated:

1. ``inversion``: iDLG (cosine match) against one client's batch-of-one release at
   the models' initial weights (a client's first round): a FedAvg update (SGD,
   lr 0.1); one ``DPSGDTrainer`` step at the noise multiplier and clipping norm of
   the epsilon-3 run in docs/results/mnist-dpsgd (read from its ledger and
   config); DSSGD uploads (theta_u = 0.1 and 0.01 largest, 0.1 at random above
   tau = 1e-4 as in mnist_dssgd_dp.toml, and with that file's selective DP); what a
   DP-FedAvg server receives (central: clipped only; distributed: with the noise
   share of a 10-client round) and the model release of a round with the noise of
   z = 1; a secure aggregation masked input and the sum of a 10-client round, both
   from ``veil.secagg.secure_sum``.
2. ``secagg``: whose example, if anyone's, comes back from the sum of a round, and
   the round's label histogram read from the sum.
3. ``membership``: an overfit 2NN (500 examples, 100 epochs) and a DP-SGD 2NN at
   epsilon <= 3 on the same 500 examples (30 epochs).
4. ``representation``: a decoder against the tanh CNN's first block.
5. ``analytic``: the first-layer attack (:func:`veil.attacks.analytic_first_layer`,
   no search) on the 2NN against every release.
6. ``audit``: empirical lower bounds on epsilon for ``DPSGDTrainer`` and ``DPFedAvg``
   (central and distributed), and for both with their noise scaled down.

Run: ``nice .venv/bin/python benchmarks/attacks_mnist.py --out runs/attacks-mnist``
(``--only`` picks parts; ``--models`` picks 2nn, tanh-cnn).
"""

from __future__ import annotations

import argparse
import json
import math
import time
import tomllib
import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

from veil.attacks import (
    ClientRelease,
    analytic_first_layer,
    audit_epsilon,
    calibrated_scores,
    dp_fedavg_client_release,
    dp_fedavg_model_release,
    dpfedavg_canary_release,
    dpsgd_canary_release,
    dpsgd_release,
    dssgd_release,
    fedavg_release,
    invert_gradients,
    invert_representations,
    label_accuracy,
    laplace_perturbation,
    loss_threshold_scores,
    membership_report,
    per_example_losses,
    psnr,
    secagg_round,
    ssim,
    train_decoder,
)
from veil.data import load_mnist
from veil.data._datasets import MNIST_MEAN, MNIST_STD
from veil.learning import SGDTrainer, evaluate
from veil.learning.dssgd import DSSGDSettings, SelectiveDP, decode_sparse, flatten
from veil.models import build_model
from veil.privacy import (
    DPSGDTrainer,
    calibrate_noise_multiplier,
    dpsgd_epsilon,
)

__all__ = ["main"]

LOW, HIGH = (0 - MNIST_MEAN) / MNIST_STD, (1 - MNIST_MEAN) / MNIST_STD
DELTA = 1e-5


def pixels(x: torch.Tensor) -> torch.Tensor:
    """Model inputs back to pixel values in [0, 1]."""
    return (x.float() * MNIST_STD + MNIST_MEAN).clamp(0, 1)


LR = 0.1  # the clients' learning rate (mnist_dssgd_*.toml, mnist_dp_fedavg_*.toml)
RUN = Path(__file__).resolve().parents[1] / "docs" / "results" / "mnist-dpsgd"


def run_dpsgd() -> tuple[float, float, float, float]:
    """Noise multiplier, clipping norm, learning rate and epsilon of the epsilon-3
    DP-SGD run in docs/results/mnist-dpsgd, from its ledger and config."""
    ledger = json.loads(next((RUN / "privacy").glob("*.json")).read_text())
    event = ledger["ledger"]["events"][0]
    z, q, steps = event["noise_multiplier"], event["sample_rate"], event["count"]
    config = tomllib.loads((RUN / "config.toml").read_text())
    eps = dpsgd_epsilon(z, q, steps, ledger["delta"])
    return z, config["dp"]["clipping_norm"], config["central_dp"]["lr"], eps


MATCH = ["cosine"]  # set by --match


def attack_config(model_name: str, release: ClientRelease) -> Any:
    if model_name == "2nn":
        return release.attack(match=MATCH[0], iterations=50, input_bounds=(LOW, HIGH))
    return release.attack(
        match=MATCH[0],
        iterations=40,
        restarts=2,
        tv_weight=0.01,
        input_bounds=(LOW, HIGH),
    )


def releases(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    peers: list[tuple[torch.Tensor, torch.Tensor]],
    dpsgd: tuple[float, float, float, float],
    seed: int,
) -> dict[str, ClientRelease]:
    """Every defence's release of the victim's example, from veil's own modules."""
    z, c, lr, eps = dpsgd
    trainer = DPSGDTrainer(lr=lr, clipping_norm=c, noise_multiplier=z, sample_rate=1.0)
    g = torch.Generator().manual_seed(seed)
    selective = SelectiveDP(100.0, bound=0.01, threshold=1e-4)
    secagg = secagg_round(model, [(x, y), *peers], lr=LR, seed=seed)
    dpfa = {"lr": LR, "clipping_norm": 0.1, "noise_multiplier": 1.0, "seed": seed}
    return {
        "plain (FedAvg update)": fedavg_release(model, x, y, lr=LR, seed=seed),
        f"DP-SGD step (z={z:.3f}, C={c:g}; eps {eps:.2f} run)": dpsgd_release(
            model, x, y, trainer, g
        ),
        "DSSGD theta_u=0.1 largest": dssgd_release(
            model, x, y, DSSGDSettings(0.1), lr=LR, seed=seed
        ),
        "DSSGD theta_u=0.01 largest": dssgd_release(
            model, x, y, DSSGDSettings(0.01), lr=LR, seed=seed
        ),
        "DSSGD theta_u=0.1 random above tau=1e-4": dssgd_release(
            model,
            x,
            y,
            DSSGDSettings(0.1, selection="threshold", threshold=1e-4),
            lr=LR,
            seed=seed,
        ),
        "DSSGD theta_u=0.1 selective DP (eps/param 100)": dssgd_release(
            model,
            x,
            y,
            DSSGDSettings(
                0.1, selection="threshold", threshold=1e-4, bound=0.01, dp=selective
            ),
            lr=LR,
            seed=seed,
        ),
        "DP-FedAvg central, server's view (S=0.1)": dp_fedavg_client_release(
            model, x, y, **dpfa
        ),
        "DP-FedAvg distributed share, 10 clients (z=1, S=0.1)": (
            dp_fedavg_client_release(
                model, x, y, placement="distributed", round_clients=10, **dpfa
            )
        ),
        "DP-FedAvg model release (z=1, S=0.1)": dp_fedavg_model_release(
            model, x, y, **dpfa
        ),
        "secure aggregation: masked input": secagg.masked_release(0),
        "secure aggregation: sum of 10": secagg.sum_release(),
    }


def gradient_inversion(
    data: Any, out: Path, victims: int, models: list[str], skip: set[str]
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    dpsgd = run_dpsgd()
    for model_name in models:
        torch.manual_seed(0)
        model = build_model(model_name)
        size = flatten(dict(model.named_parameters())).numel()
        rows: dict[str, list[dict[str, float]]] = {}
        images: dict[str, list[torch.Tensor]] = {}
        for i in range(victims):
            x, y = data.train.x[i : i + 1], data.train.y[i : i + 1]
            lo = 100 + 9 * i
            peers = [
                (data.train.x[k : k + 1], data.train.y[k : k + 1])
                for k in range(lo, lo + 9)
            ]
            for name, rel in releases(model, x, y, peers, dpsgd, i).items():
                if any(s in name for s in skip):
                    continue
                start = time.perf_counter()
                rec = invert_gradients(
                    model,
                    rel.observed,
                    input_shape=(1, 28, 28),
                    config=attack_config(model_name, rel),
                    generator=torch.Generator().manual_seed(i),
                )
                row = {
                    "psnr": float(psnr(pixels(rec.x), pixels(x))),
                    "ssim": float(ssim(pixels(rec.x), pixels(x))),
                    "label_accuracy": label_accuracy(rec.labels, y),
                    "seconds": time.perf_counter() - start,
                    "released_fraction": rel.observed.released_fraction(),
                }
                if rel.payload is not None and "DSSGD" in name:
                    row["upload_entries"] = decode_sparse(rel.payload).count
                    row["upload_bytes"] = len(rel.payload)
                rows.setdefault(name, []).append(row)
                images.setdefault(name, []).append(pixels(rec.x)[0, 0])
                print(f"{model_name} victim {i} {name}: {row}", flush=True)
        images["original"] = [
            pixels(data.train.x[i : i + 1])[0, 0] for i in range(victims)
        ]
        title = f"iDLG reconstructions, {model_name}"
        _figure(images, out / f"inversion_{model_name}.png", title)
        results[model_name] = {"parameters": size} | {
            name: {
                "psnr_mean": float(np.mean([r["psnr"] for r in rs])),
                "psnr_min": float(np.min([r["psnr"] for r in rs])),
                "ssim_mean": float(np.mean([r["ssim"] for r in rs])),
                "label_accuracy": float(np.mean([r["label_accuracy"] for r in rs])),
                "seconds_mean": float(np.mean([r["seconds"] for r in rs])),
                "released_fraction": rs[0]["released_fraction"],
                "upload_entries": rs[0].get("upload_entries"),
                "victims": len(rs),
            }
            for name, rs in rows.items()
        }
    return results


def analytic(data: Any, victims: int) -> dict[str, Any]:
    """The first-layer attack (no search) on the 2NN against every release."""
    dpsgd = run_dpsgd()
    torch.manual_seed(0)
    model = build_model("2nn")
    rows: dict[str, list[dict[str, float]]] = {}
    for i in range(victims):
        x, y = data.train.x[i : i + 1], data.train.y[i : i + 1]
        lo = 100 + 9 * i
        peers = [
            (data.train.x[k : k + 1], data.train.y[k : k + 1])
            for k in range(lo, lo + 9)
        ]
        for name, rel in releases(model, x, y, peers, dpsgd, i).items():
            rec = analytic_first_layer(model, rel.observed, (1, 28, 28), fill=LOW)
            row = {
                "psnr": float(psnr(pixels(rec), pixels(x))),
                "ssim": float(ssim(pixels(rec), pixels(x))),
            }
            rows.setdefault(name, []).append(row)
            print(f"analytic 2nn victim {i} {name}: {row}", flush=True)
    return {
        name: {
            "psnr_mean": float(np.mean([r["psnr"] for r in rs])),
            "psnr_min": float(np.min([r["psnr"] for r in rs])),
            "ssim_mean": float(np.mean([r["ssim"] for r in rs])),
            "victims": len(rs),
        }
        for name, rs in rows.items()
    }


def secure_aggregation(
    data: Any, victims: int, models: list[str], clients: int = 10
) -> dict[str, Any]:
    """Whom does an inversion of the summed round show, and which labels does the
    sum give away? PSNR of the reconstruction against every participant; the label
    histogram estimated from the sum's last bias as ``n * mean softmax - n * b /
    (-lr)`` with the mean softmax over 1000 public (test) images."""
    results: dict[str, Any] = {}
    for model_name in models:
        torch.manual_seed(0)
        model = build_model(model_name)
        with torch.no_grad():
            public = torch.softmax(model(data.test.x[:1000]), -1).mean(0).double()
        rows = []
        for i in range(victims):
            idx = [i, *range(100 + 9 * i, 100 + 9 * i + clients - 1)]
            xs, ys = data.train.x[idx], data.train.y[idx]
            batches = [(xs[k : k + 1], ys[k : k + 1]) for k in range(len(idx))]
            run = secagg_round(model, batches, lr=LR, seed=i)
            rel = run.sum_release()
            rec = invert_gradients(
                model,
                rel.observed,
                input_shape=(1, 28, 28),
                config=attack_config(model_name, rel),
                generator=torch.Generator().manual_seed(i),
            )
            scores = psnr(pixels(rec.x).expand_as(xs), pixels(xs))
            best = int(scores.argmax())
            bias = list(rel.observed.grads.values())[-1].double()
            n = len(idx)
            # mean update = -lr/n * sum_k (p_k - onehot_k)
            counts = torch.round(n * public + bias * n / LR).clamp(min=0)
            truth = torch.bincount(ys, minlength=len(bias)).double()
            rows.append(
                {
                    "psnr_victim": float(scores[0]),
                    "psnr_best_participant": float(scores[best]),
                    "best_is_victim": best == 0,
                    "label_histogram_exact": bool(torch.equal(counts, truth)),
                    "label_histogram_l1_error": float((counts - truth).abs().sum()),
                }
            )
            print(f"{model_name} secure aggregation, round {i}: {rows[-1]}", flush=True)
        results[model_name] = rows
    return results


def _figure(images: dict[str, list[torch.Tensor]], path: Path, title: str) -> None:
    names = ["original", *[n for n in images if n != "original"]]
    cols = len(images["original"])
    fig, axes = plt.subplots(
        len(names), cols, figsize=(1.3 * cols + 2.4, 1.3 * len(names))
    )
    for r, name in enumerate(names):
        for c in range(cols):
            ax = axes[r, c]
            ax.imshow(images[name][c].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fit(trainer: Any, x: torch.Tensor, y: torch.Tensor, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model("2nn")
    trainer.train(model, x, y, torch.Generator().manual_seed(seed))
    return model


def membership(data: Any, size: int, references: int) -> dict[str, Any]:
    train, test = data.train, data.test
    # Members and non-members come from one pool (the first 2 * size training
    # examples), so that only membership tells them apart.
    x_in, y_in = train.x[:size], train.y[:size]
    x_out, y_out = train.x[size : 2 * size], train.y[size : 2 * size]
    x_all, y_all = torch.cat([x_in, x_out]), torch.cat([y_in, y_out])
    members = np.r_[np.ones(size, bool), np.zeros(size, bool)]

    q = 50 / size
    steps = round(30 / q)
    sigma = calibrate_noise_multiplier(3.0, q, steps, DELTA)
    eps = dpsgd_epsilon(sigma, q, steps, DELTA)
    trainers: dict[str, tuple[Any, float]] = {
        "overfit 2NN (no DP)": (SGDTrainer(0.1, epochs=100, batch_size=10), math.inf),
        f"DP-SGD 2NN (epsilon={eps:.2f})": (
            DPSGDTrainer(
                lr=0.2,
                clipping_norm=1.0,
                noise_multiplier=sigma,
                sample_rate=q,
                steps=steps,
            ),
            eps,
        ),
    }
    results: dict[str, Any] = {}
    for name, (trainer, epsilon) in trainers.items():
        target = _fit(trainer, x_in, y_in, seed=0)
        losses = per_example_losses(target, x_all, y_all)
        refs = []
        for r in range(references):
            lo = 10_000 + r * size
            ref = _fit(trainer, train.x[lo : lo + size], train.y[lo : lo + size], r + 1)
            refs.append(per_example_losses(ref, x_all, y_all))
        acc, _ = evaluate(target, test.x, test.y)
        reports = [
            membership_report(
                "loss threshold", loss_threshold_scores(losses), members, epsilon, DELTA
            ),
            membership_report(
                f"calibrated ({references} references)",
                calibrated_scores(losses, np.stack(refs)),
                members,
                epsilon,
                DELTA,
            ),
        ]
        results[name] = {
            "test_accuracy": acc,
            "attacks": [r.to_dict() for r in reports],
        }
        for rep in reports:
            m = rep.metrics
            print(
                f"{name} / {rep.attack}: AUC {m.auc:.3f}, advantage {m.advantage:.3f} "
                f"(bound {rep.advantage_bound:.3f}), TPR@0.1% {m.tpr_at_low_fpr:.3f} "
                f"(bound {rep.tpr_bound:.3f}); test accuracy {acc:.3f}",
                flush=True,
            )
    return results


def representation(data: Any, out: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build_model("tanh-cnn")
    SGDTrainer(0.1, epochs=1, batch_size=32).train(
        model, data.train.x[:10_000], data.train.y[:10_000], torch.Generator()
    )
    model.eval()
    device = model[:3]  # conv, tanh, max-pool: a (16, 13, 13) representation
    public = data.train.x[10_000:20_000]
    victims = data.test.x[:500]
    with torch.no_grad():
        bound = float(device(public).flatten(1).abs().sum(1).median())
    baseline = pixels(public.mean(0, keepdim=True)).expand(len(victims), -1, -1, -1)
    results: dict[str, Any] = {
        "l1_bound": bound,
        "mean_image_psnr": float(psnr(baseline, pixels(victims)).mean()),
        "mean_image_ssim": float(ssim(baseline, pixels(victims)).mean()),
    }
    shown = {"original": [pixels(victims[i : i + 1])[0, 0] for i in range(6)]}
    for eps in (math.inf, 1e4, 1e3, 1e2, 10.0):
        perturb = laplace_perturbation(bound, eps)
        g = torch.Generator().manual_seed(0)
        decoder = train_decoder(device, perturb, public, epochs=5, generator=g)
        rec = pixels(invert_representations(decoder, device, perturb, victims))
        row = {
            "psnr": float(psnr(rec, pixels(victims)).mean()),
            "ssim": float(ssim(rec, pixels(victims)).mean()),
        }
        results[f"epsilon={eps:g}"] = row
        shown[f"eps={eps:g}"] = [rec[i, 0] for i in range(6)]
        print(f"representation inversion, epsilon {eps:g}: {row}", flush=True)
    title = "Decoder reconstructions, tanh CNN device part + Laplace"
    _figure(shown, out / "representation.png", title)
    return results


def audits(trials: int) -> dict[str, Any]:
    settings: list[tuple[str, Any, float]] = []
    for sigma, q, steps in ((1.0, 1.0, 1), (2.0, 1.0, 4), (1.0, 0.2, 10)):
        trainer = DPSGDTrainer(
            lr=1.0,
            clipping_norm=1.0,
            noise_multiplier=sigma,
            sample_rate=q,
            steps=steps,
        )
        settings.append(
            (
                f"veil DP-SGD z={sigma}, q={q}, steps={steps}",
                dpsgd_canary_release(trainer),
                dpsgd_epsilon(sigma, q, steps, DELTA),
            )
        )
    for z, q, rounds, placement in (
        (1.0, 1.0, 1, "central"),
        (1.0, 1.0, 1, "distributed"),
        (1.0, 0.5, 5, "central"),
    ):
        settings.append(
            (
                f"veil DPFedAvg ({placement}) z={z}, q={q}, rounds={rounds}",
                dpfedavg_canary_release(
                    noise_multiplier=z,
                    sample_rate=q,
                    rounds=rounds,
                    placement=placement,
                ),
                dpsgd_epsilon(z, q, rounds, DELTA),
            )
        )
    broken = DPSGDTrainer(
        lr=1.0, clipping_norm=1.0, noise_multiplier=0.1, sample_rate=1.0, steps=1
    )
    settings.append(
        (
            "broken DP-SGD: noise 10x below the claim (z=0.1 claimed as 1)",
            dpsgd_canary_release(broken),
            dpsgd_epsilon(1.0, 1.0, 1, DELTA),
        )
    )
    settings.append(
        (
            "broken DPFedAvg: noise 10x below the claim (z=0.1 claimed as 1)",
            dpfedavg_canary_release(noise_multiplier=0.1, sample_rate=1.0, rounds=1),
            dpsgd_epsilon(1.0, 1.0, 1, DELTA),
        )
    )
    results = {}
    for name, release, claimed in settings:
        start = time.perf_counter()
        res = audit_epsilon(
            release, claimed_epsilon=claimed, delta=DELTA, trials=trials
        )
        results[name] = {**res.to_dict(), "seconds": time.perf_counter() - start}
        print(
            f"audit {name}: lower bound {res.epsilon_lower_bound:.3f} vs accountant "
            f"{claimed:.3f} ({'pass' if res.passed else 'FAIL'})",
            flush=True,
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/attacks-mnist"))
    parser.add_argument("--victims", type=int, default=4)
    parser.add_argument("--members", type=int, default=500)
    parser.add_argument("--references", type=int, default=4)
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--models", default="2nn,tanh-cnn")
    parser.add_argument("--skip", default="", help="views to leave out (substrings)")
    parser.add_argument("--match", default="cosine", choices=["cosine", "euclidean"])
    parser.add_argument(
        "--only", default="inversion,secagg,membership,representation,audit"
    )
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    data = load_mnist()
    models = args.models.split(",")
    skip = {s for s in args.skip.split(",") if s}
    MATCH[0] = args.match

    path = args.out / "attacks_mnist.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    parts = args.only.split(",")
    if "inversion" in parts:
        mean = pixels(data.train.x[:10_000].mean(0, keepdim=True))
        victims = pixels(data.train.x[: args.victims])
        results["mean_image_psnr"] = float(
            psnr(mean.expand_as(victims), victims).mean()
        )
        found = gradient_inversion(data, args.out, args.victims, models, skip)
        results.setdefault("inversion", {}).update(found)
    if "analytic" in parts:
        results["analytic_2nn"] = analytic(data, args.victims)
    if "secagg" in parts:
        found = secure_aggregation(data, args.victims, models)
        results.setdefault("secure_aggregation", {}).update(found)
    if "membership" in parts:
        results["membership"] = membership(data, args.members, args.references)
    if "representation" in parts:
        results["representation"] = representation(data, args.out)
    if "audit" in parts:
        results["audit"] = audits(args.trials)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
