"""Centralised DP-SGD on MNIST with the tanh CNN: accuracy at a fixed (epsilon, delta).

Calibrates the noise multiplier for the target epsilon (PLD accountant), trains with
:class:`veil.privacy.DPSGDTrainer` on the full training set (Poisson sampling) with a
budget-enforcing ledger, and prints test accuracy and epsilon spent after every epoch,
then one JSON line with the settings and results.

Run: ``nice -n 10 python benchmarks/mnist_dpsgd.py`` (tens of minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
import warnings

import torch

from veil.data import load_mnist
from veil.learning import evaluate
from veil.models import build_model
from veil.privacy import (
    DPSGDTrainer,
    PrivacyBudget,
    PrivacyLedger,
    calibrate_noise_multiplier,
)

__all__ = ["main"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch", type=int, default=512, help="expected batch size")
    parser.add_argument("--lr", type=float, default=2.0)
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument(
        "--final-lr",
        type=float,
        default=None,
        help="decay the learning rate along a cosine to this value (default: constant)",
    )
    parser.add_argument("--clipping-norm", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all)")
    parser.add_argument("--engine", default="auto", help="auto, ghost or functional")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)

    data = load_mnist()
    n = len(data.train)
    sample_rate = args.batch / n
    steps_per_epoch = round(1 / sample_rate)
    total_steps = steps_per_epoch * args.epochs
    start = time.perf_counter()
    sigma = calibrate_noise_multiplier(
        args.epsilon, sample_rate, total_steps, args.delta
    )
    print(
        f"sample_rate={sample_rate:.6f} steps={total_steps} "
        f"noise_multiplier={sigma:.4f} "
        f"(calibrated in {time.perf_counter() - start:.1f}s)",
        flush=True,
    )

    torch.manual_seed(args.seed)
    model = build_model("tanh-cnn")
    ledger = PrivacyLedger(budget=PrivacyBudget(args.epsilon, args.delta))
    trainer = DPSGDTrainer(
        lr=args.lr,
        clipping_norm=args.clipping_norm,
        noise_multiplier=sigma,
        sample_rate=sample_rate,
        steps=steps_per_epoch,
        momentum=args.momentum,
        ledger=ledger,
        engine=args.engine,
    )
    generator = torch.Generator().manual_seed(args.seed)
    accuracy = 0.0
    for epoch in range(1, args.epochs + 1):
        lr = args.lr
        if args.final_lr is not None:
            progress = (epoch - 1) / max(args.epochs - 1, 1)
            lr = args.final_lr + (args.lr - args.final_lr) * 0.5 * (
                1 + math.cos(math.pi * progress)
            )
        # Post-processing: the learning rate does not touch the accounting.
        trainer = dataclasses.replace(trainer, lr=lr)
        stats = trainer.train(model, data.train.x, data.train.y, generator)
        accuracy, _ = evaluate(model, data.test.x, data.test.y)
        print(
            f"epoch {epoch:3d} loss {stats.loss:.4f} test acc {accuracy:.4f} "
            f"epsilon {ledger.epsilon():.3f} "
            f"elapsed {time.perf_counter() - start:.0f}s",
            flush=True,
        )
    result = {
        **vars(args),
        "noise_multiplier": sigma,
        "sample_rate": sample_rate,
        "steps": total_steps,
        "test_accuracy": accuracy,
        "epsilon_spent": ledger.epsilon(),
        "seconds": time.perf_counter() - start,
        "ledger": ledger.to_dict(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
