"""Benchmark: the cost of one DP-SGD step against one plain SGD step.

For the tanh CNN and the 2NN, on one batch of 256 MNIST-shaped examples, this measures
in the same run

- time per step: CPU time of this process (all its threads) over interleaved rounds,
  so that other processes sharing the machine change the ratios as little as
  possible; the best round (least disturbed by other processes) and the median
  round are printed, and the median wall-clock time too, and
- peak extra memory of a step (resident-set high-water mark of a fresh child process
  during three steps, minus its resident set after setup; Linux only),

for plain SGD, veil's DP-SGD step with each engine (set up once with
``NoisyGradientStep``, as ``DPSGDTrainer`` does for a training run; ``ghost``:
clipped sums from layer inputs and output gradients; ``functional``: per-example
gradients with ``torch.func``;
``ghost-secure``: ghost with noise from ``os.urandom``, the cost of ``secure_noise``;
``ghost-clip-only``: ghost with noise multiplier 0, which is *not private* and is
there only to separate the cost of clipping from the cost of drawing the noise)
and, when Opacus is installed (``pip install -e '.[bench]'``), Opacus's
grad-sample modes. It prints each variant's ratio to the plain step; veil's target is
at most 1.3.

Run: ``python benchmarks/dpsgd.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from veil.models import build_model
from veil.privacy import GeneratorNoise, NoiseSource, NoisyGradientStep, SecureNoise

__all__ = ["main"]

BATCH = 256
LR, CLIPPING_NORM, NOISE_MULTIPLIER = 0.1, 1.0, 1.0
MODELS = ("tanh-cnn", "2nn")
OPACUS_MODES = ("hooks", "ew", "functorch", "ghost")

Step = Callable[[], None]


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(BATCH, 1, 28, 28, generator=g), torch.randint(
        0, 10, (BATCH,), generator=g
    )


def plain_step(model: nn.Module) -> Step:
    x, y = batch()
    opt = torch.optim.SGD(model.parameters(), lr=LR)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def veil_step(
    model: nn.Module,
    engine: str,
    secure: bool = False,
    noise_multiplier: float = NOISE_MULTIPLIER,
) -> Step:
    x, y = batch()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    params = dict(model.named_parameters())
    noise: NoiseSource = (
        SecureNoise() if secure else GeneratorNoise(torch.Generator().manual_seed(1))
    )

    # Set up once, as DPSGDTrainer does for a train() call.
    noisy_gradient = NoisyGradientStep(
        model,
        clipping_norm=CLIPPING_NORM,
        noise_multiplier=noise_multiplier,
        noise=noise,
        max_physical_batch=BATCH,
        engine=engine,
    )

    def step() -> None:
        result = noisy_gradient(x, y, expected_batch_size=float(BATCH))
        for name, g in result.grads.items():
            params[name].grad = g
        opt.step()

    return step


def opacus_step(model: nn.Module, mode: str) -> Step:
    from opacus import PrivacyEngine  # optional: only in the `bench` extra

    x, y = batch()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=BATCH
    )
    engine = PrivacyEngine(accountant="rdp", secure_mode=False)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    made = engine.make_private(
        module=model,
        optimizer=opt,
        data_loader=loader,
        noise_multiplier=NOISE_MULTIPLIER,
        max_grad_norm=CLIPPING_NORM,
        poisson_sampling=False,
        grad_sample_mode=mode,
        **({"criterion": nn.CrossEntropyLoss()} if mode == "ghost" else {}),
    )
    private, private_opt = made[0], made[1]
    criterion = made[2] if mode == "ghost" else nn.CrossEntropyLoss()

    def step() -> None:
        private_opt.zero_grad(set_to_none=True)
        criterion(private(x), y).backward()
        private_opt.step()

    return step


def variants(opacus: bool) -> list[str]:
    names = [
        "plain",
        "veil-ghost",
        "veil-ghost-secure",
        "veil-ghost-clip-only",
        "veil-functional",
    ]
    return names + [f"opacus-{m}" for m in OPACUS_MODES] if opacus else names


def make_step(model_name: str, variant: str) -> Step:
    torch.manual_seed(0)
    model = build_model(model_name)
    if variant == "plain":
        return plain_step(model)
    if variant == "veil-ghost-secure":
        return veil_step(model, "ghost", secure=True)
    if variant == "veil-ghost-clip-only":  # noise_multiplier 0: not private
        return veil_step(model, "ghost", noise_multiplier=0.0)
    if variant.startswith("veil-"):
        return veil_step(model, variant.removeprefix("veil-"))
    return opacus_step(model, variant.removeprefix("opacus-"))


def time_steps(
    model_name: str, names: list[str], rounds: int, steps: int
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Best and median CPU seconds and median wall-clock seconds per step of each
    variant."""
    runners = {v: make_step(model_name, v) for v in names}
    for run in runners.values():  # warm up (lazy initialisation, caches)
        run()
        run()
    cpu: dict[str, list[float]] = {v: [] for v in names}
    wall: dict[str, list[float]] = {v: [] for v in names}
    for _ in range(rounds):
        for v, run in runners.items():
            start_cpu, start_wall = time.process_time(), time.perf_counter()
            for _ in range(steps):
                run()
            cpu[v].append((time.process_time() - start_cpu) / steps)
            wall[v].append((time.perf_counter() - start_wall) / steps)
    median = statistics.median
    return (
        {v: min(s) for v, s in cpu.items()},
        {v: median(s) for v, s in cpu.items()},
        {v: median(s) for v, s in wall.items()},
    )


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child_memory(model_name: str, variant: str) -> None:
    """In a fresh process: peak resident memory (bytes) during three steps, above the
    resident memory after setup. Linux only: resets the high-water mark through
    /proc/self/clear_refs."""
    run = make_step(model_name, variant)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset VmHWM to the current resident set
    before = _status_kb("VmRSS")
    for _ in range(3):
        run()
    peak = _status_kb("VmHWM")
    print(json.dumps({"peak_bytes": (peak - before) * 1024}))


def peak_memory(model_name: str, variant: str) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", model_name, variant],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"])


def has_opacus() -> bool:
    try:
        import opacus  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--no-opacus", action="store_true")
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    # Repeated steps on one batch can drive values subnormal, which x86 computes
    # tens of times slower; flush them so every variant is timed on normal numbers.
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        child_memory(*args.memory_child)
        return

    opacus = has_opacus() and not args.no_opacus
    print(
        f"batch {BATCH}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    if not opacus:
        print("Opacus not installed: comparing veil with plain SGD only")
    for model_name in args.models:
        names = variants(opacus)
        best, cpu, wall = time_steps(model_name, names, args.rounds, args.steps)
        print(f"\n{model_name}")
        print(
            f"{'variant':<20}{'best ms':>8}{'x plain':>9}{'cpu ms':>8}{'x plain':>9}"
            f"{'wall ms':>9}{'x plain':>9}{'peak MB':>9}{'x plain':>9}"
        )
        memory = {v: peak_memory(model_name, v) for v in names}
        for v in names:
            mem_ratio = memory[v] / max(memory["plain"], 1.0)
            print(
                f"{v:<20}{best[v] * 1e3:>8.2f}{best[v] / best['plain']:>9.2f}"
                f"{cpu[v] * 1e3:>8.2f}{cpu[v] / cpu['plain']:>9.2f}"
                f"{wall[v] * 1e3:>9.2f}{wall[v] / wall['plain']:>9.2f}"
                f"{memory[v] / 2**20:>9.1f}{mem_ratio:>9.2f}"
            )


if __name__ == "__main__":
    main()
