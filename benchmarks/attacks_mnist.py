"""The attacks of :mod:`veil.attacks` on MNIST: what each defence stops, measured.

Five experiments, each printing its results and writing ``OUT/attacks_mnist.json``
and PNG figures:

1. Gradient inversion (iDLG) against one client's batch-of-one upload, on the 2NN and
   the tanh CNN at their initial weights (a FedAvg client's first round): plain,
   DP-SGD at the noise multiplier that gives epsilon = 3 in mnist_dpsgd.toml,
   DSSGD sparse uploads (theta_u = 0.1, 0.01), a DP-FedAvg contribution (clip to S,
   noise z S) and a secure-aggregation sum over 10 clients. DSSGD, DP-FedAvg and
   secure aggregation are simulated from their definitions (veil.attacks.views).
2. Membership inference: an overfit 2NN (500 examples, 100 epochs) and a DP-SGD 2NN
   at epsilon <= 3 on the same 500 examples (30 epochs), loss threshold and
   calibrated with 4 reference models; non-members are 500 other training examples.
   A second pass (``secagg``) scores the inversion of each summed round against every
   participant, to see whose example, if anyone's, comes back.
3. Representation inversion: a decoder against the tanh CNN's first block with the
   Laplace perturbation at several epsilons.
4. Auditing: empirical lower bounds on epsilon for veil's DP-SGD trainer and for a
   simulated DP-FedAvg, beside the accountant's epsilon.

Run: ``nice .venv/bin/python benchmarks/attacks_mnist.py --out runs/attacks-mnist``
(about 90 minutes of one core on a busy 2-core machine, most of it the tanh CNN
inversions; ``--only`` picks parts: inversion, secagg, membership, representation,
audit).
"""

from __future__ import annotations

import argparse
import json
import math
import time
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
    InversionConfig,
    ObservedUpdate,
    audit_epsilon,
    calibrated_scores,
    clipped_noised_view,
    dpfedavg_canary_release,
    dpsgd_canary_release,
    dpsgd_view,
    invert_gradients,
    invert_representations,
    label_accuracy,
    laplace_perturbation,
    loss_threshold_scores,
    membership_report,
    per_example_losses,
    plain_view,
    psnr,
    sparse_view,
    ssim,
    summed_view,
    train_decoder,
)
from veil.data import load_mnist
from veil.data._datasets import MNIST_MEAN, MNIST_STD
from veil.learning import SGDTrainer, evaluate
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


def attack_config(model_name: str, **kwargs: Any) -> InversionConfig:
    if model_name == "2nn":
        return InversionConfig(iterations=50, input_bounds=(LOW, HIGH), **kwargs)
    return InversionConfig(
        iterations=40, restarts=2, tv_weight=0.01, input_bounds=(LOW, HIGH), **kwargs
    )


def views(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    others: tuple[torch.Tensor, torch.Tensor],
    sigma: float,
    g: torch.Generator,
) -> dict[str, tuple[ObservedUpdate, dict[str, Any]]]:
    """Every defence's view of the victim's upload, with the attacker's mirror."""
    plain = plain_view(model, x, y)
    peers = [
        plain_view(model, ox[None], oy[None]) for ox, oy in zip(*others, strict=True)
    ]
    return {
        "plain": (plain, {}),
        f"DP-SGD (z={sigma:.2f}, C=1)": (
            dpsgd_view(
                model,
                x,
                y,
                clipping_norm=1.0,
                noise_multiplier=sigma,
                expected_batch_size=1.0,
                generator=g,
            ),
            {"clipping_norm": 1.0},
        ),
        "DSSGD theta_u=0.1": (sparse_view(plain, 0.1), {}),
        "DSSGD theta_u=0.01": (sparse_view(plain, 0.01), {}),
        "DP-FedAvg (z=1, S=1)": (
            clipped_noised_view(
                plain, clipping_norm=1.0, noise_multiplier=1.0, generator=g
            ),
            {"clipping_norm": 1.0},
        ),
        "secure aggregation (sum of 10)": (summed_view([plain, *peers]), {}),
    }


def gradient_inversion(
    data: Any, sigma: float, out: Path, victims: int
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for model_name in ("2nn", "tanh-cnn"):
        torch.manual_seed(0)
        model = build_model(model_name)
        rows: dict[str, list[dict[str, float]]] = {}
        images: dict[str, list[torch.Tensor]] = {}
        for i in range(victims):
            x, y = data.train.x[i : i + 1], data.train.y[i : i + 1]
            peers = slice(100 + 9 * i, 109 + 9 * i)
            others = (data.train.x[peers], data.train.y[peers])
            g = torch.Generator().manual_seed(i)
            for name, (obs, mirror) in views(model, x, y, others, sigma, g).items():
                start = time.perf_counter()
                rec = invert_gradients(
                    model,
                    obs,
                    input_shape=(1, 28, 28),
                    config=attack_config(model_name, **mirror),
                    generator=torch.Generator().manual_seed(i),
                )
                row = {
                    "psnr": float(psnr(pixels(rec.x), pixels(x))),
                    "ssim": float(ssim(pixels(rec.x), pixels(x))),
                    "label_accuracy": label_accuracy(rec.labels, y),
                    "seconds": time.perf_counter() - start,
                }
                rows.setdefault(name, []).append(row)
                images.setdefault(name, []).append(pixels(rec.x)[0, 0])
                print(f"{model_name} victim {i} {name}: {row}", flush=True)
        images["original"] = [
            pixels(data.train.x[i : i + 1])[0, 0] for i in range(victims)
        ]
        title = f"iDLG reconstructions, {model_name}"
        _figure(images, out / f"inversion_{model_name}.png", title)
        results[model_name] = {
            name: {
                "psnr_mean": float(np.mean([r["psnr"] for r in rs])),
                "psnr_min": float(np.min([r["psnr"] for r in rs])),
                "ssim_mean": float(np.mean([r["ssim"] for r in rs])),
                "label_accuracy": float(np.mean([r["label_accuracy"] for r in rs])),
                "seconds_mean": float(np.mean([r["seconds"] for r in rs])),
                "victims": len(rs),
            }
            for name, rs in rows.items()
        }
    return results


def secure_aggregation(data: Any, victims: int, clients: int = 10) -> dict[str, Any]:
    """Whom does an inversion of the summed round show? PSNR of the reconstruction
    against the victim and against the best-matching participant of the round."""
    results: dict[str, Any] = {}
    for model_name in ("2nn", "tanh-cnn"):
        torch.manual_seed(0)
        model = build_model(model_name)
        rows = []
        for i in range(victims):
            idx = [i, *range(100 + 9 * i, 100 + 9 * i + clients - 1)]
            xs, ys = data.train.x[idx], data.train.y[idx]
            ups = [
                plain_view(model, xs[k : k + 1], ys[k : k + 1]) for k in idx_range(xs)
            ]
            rec = invert_gradients(
                model,
                summed_view(ups),
                input_shape=(1, 28, 28),
                config=attack_config(model_name),
                generator=torch.Generator().manual_seed(i),
            )
            scores = psnr(pixels(rec.x).expand_as(xs), pixels(xs))
            best = int(scores.argmax())
            rows.append(
                {
                    "psnr_victim": float(scores[0]),
                    "psnr_best_participant": float(scores[best]),
                    "best_is_victim": best == 0,
                    "label": int(rec.labels[0]),
                    "label_in_round": bool((ys == rec.labels[0]).any()),
                }
            )
            print(f"{model_name} secure aggregation, round {i}: {rows[-1]}", flush=True)
        results[model_name] = rows
    return results


def idx_range(xs: torch.Tensor) -> range:
    return range(len(xs))


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
    for z, q, rounds in ((1.0, 1.0, 1), (1.0, 0.5, 5)):
        settings.append(
            (
                f"DP-FedAvg (simulated) z={z}, q={q}, rounds={rounds}",
                dpfedavg_canary_release(
                    noise_multiplier=z, sample_rate=q, rounds=rounds
                ),
                dpsgd_epsilon(z, q, rounds, DELTA),
            )
        )
    broken = DPSGDTrainer(
        lr=1.0, clipping_norm=1.0, noise_multiplier=0.1, sample_rate=1.0, steps=1
    )
    settings.append(
        (
            "broken: noise 10x below the claim (z=0.1 claimed as 1)",
            dpsgd_canary_release(broken),
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
    parser.add_argument(
        "--only", default="inversion,secagg,membership,representation,audit"
    )
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    data = load_mnist()
    q = 512 / len(data.train)
    sigma = calibrate_noise_multiplier(3.0, q, round(40 / q), DELTA)
    print(f"mnist_dpsgd.toml noise multiplier for epsilon=3: {sigma:.4f}", flush=True)

    path = args.out / "attacks_mnist.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    results["dpsgd_noise_multiplier"] = sigma
    parts = args.only.split(",")
    if "inversion" in parts:
        mean = pixels(data.train.x[:10_000].mean(0, keepdim=True))
        victims = pixels(data.train.x[: args.victims])
        results["mean_image_psnr"] = float(
            psnr(mean.expand_as(victims), victims).mean()
        )
        results["inversion"] = gradient_inversion(data, sigma, args.out, args.victims)
    if "secagg" in parts:
        results["secure_aggregation"] = secure_aggregation(data, args.victims)
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
