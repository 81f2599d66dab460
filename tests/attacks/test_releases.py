"""The attacks see what veil's own modules release: each release is checked against
an independent computation of the mechanism, and the secure aggregation view against
the protocol's guarantees (uniform masked inputs, an exact sum)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from veil.attacks import (
    SecAggRound,
    dp_fedavg_client_release,
    dp_fedavg_model_release,
    dpsgd_release,
    dssgd_release,
    fedavg_release,
    invert_gradients,
    label_accuracy,
    plain_view,
    psnr,
    secagg_round,
)
from veil.errors import VeilError
from veil.learning.dssgd import DSSGDSettings, decode_sparse, upload_count
from veil.privacy import DPSGDTrainer
from veil.secagg import Step

LR = 0.1


def small_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


def example(seed: int, label: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    return x, torch.tensor([label])


def gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The flat gradient of the mean cross-entropy, independently of veil's code."""
    return torch.cat([g.flatten() for g in plain_view(model, x, y).grads.values()])


def flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.flatten().double() for t in tensors.values()])


def clipped(v: torch.Tensor, norm: float) -> torch.Tensor:
    return v * min(1.0, norm / float(v.norm()))


def test_fedavg_release_is_minus_lr_times_the_gradient() -> None:
    model = small_mlp()
    x, y = example(0, 3)
    release = fedavg_release(model, x, y, lr=LR)
    expected = -LR * gradient(model, x, y).double()
    assert torch.allclose(flat(release.observed.grads), expected, atol=1e-7)
    assert release.gradient_scale == -LR and release.payload is None


@pytest.mark.parametrize("engine", ["functional", "ghost"])
def test_dpsgd_release_is_the_trainers_clipped_noised_step(engine: str) -> None:
    warnings.simplefilter("ignore")
    model = small_mlp()
    x, y = example(1, 7)
    c = 0.05
    quiet = DPSGDTrainer(
        lr=LR, clipping_norm=c, noise_multiplier=0.0, sample_rate=1.0, engine=engine
    )
    g = torch.Generator().manual_seed(0)
    exact = flat(dpsgd_release(model, x, y, quiet, g).observed.grads)
    assert torch.allclose(
        exact, -LR * clipped(gradient(model, x, y).double(), c), atol=1e-7
    )
    # With noise: the difference is N(0, (lr z C)^2) in every coordinate.
    noisy = DPSGDTrainer(
        lr=LR, clipping_norm=c, noise_multiplier=2.0, sample_rate=1.0, engine=engine
    )
    release = dpsgd_release(model, x, y, noisy, g)
    residual = (flat(release.observed.grads) - exact).numpy()
    assert residual.std() == pytest.approx(LR * 2.0 * c, rel=0.05)
    assert release.clipping_norm == c and release.gradient_scale == -LR


def test_dpsgd_engines_release_the_same_step() -> None:
    warnings.simplefilter("ignore")
    model = small_mlp()
    x, y = example(2, 1)
    out = []
    for engine in ("functional", "ghost"):
        trainer = DPSGDTrainer(
            lr=LR,
            clipping_norm=0.1,
            noise_multiplier=1.0,
            sample_rate=1.0,
            engine=engine,
        )
        g = torch.Generator().manual_seed(5)
        out.append(flat(dpsgd_release(model, x, y, trainer, g).observed.grads))
    assert torch.allclose(out[0], out[1], atol=1e-6)


@pytest.mark.parametrize("fraction", [0.1, 0.01, 0.37])
def test_dssgd_upload_holds_ceil_theta_u_p_largest_entries(fraction: float) -> None:
    model = small_mlp()
    x, y = example(3, 4)
    release = dssgd_release(model, x, y, DSSGDSettings(fraction), lr=LR)
    size = sum(p.numel() for p in model.parameters())
    assert release.payload is not None
    vector = decode_sparse(release.payload)
    assert vector.count == upload_count(fraction, size) == math.ceil(fraction * size)
    known = torch.cat([m.flatten() for m in release.observed.known.values()])
    assert int(known.sum()) == vector.count
    assert torch.equal(torch.nonzero(known).flatten(), vector.positions())
    # The released values are the client's SGD step at its largest coordinates.
    delta = -LR * gradient(model, x, y).double()
    values = flat(release.observed.grads)
    assert torch.allclose(values[known], delta[known], atol=1e-7)
    assert delta[known].abs().min() >= delta[~known].abs().max() - 1e-7
    assert (values[~known] == 0).all()


def test_dssgd_threshold_selection_uploads_only_above_tau() -> None:
    model = small_mlp()
    x, y = example(4, 9)
    tau = 1e-4
    settings = DSSGDSettings(0.05, selection="threshold", threshold=tau)
    release = dssgd_release(model, x, y, settings, lr=LR, seed=3)
    known = torch.cat([m.flatten() for m in release.observed.known.values()])
    values = flat(release.observed.grads)[known]
    size = sum(p.numel() for p in model.parameters())
    assert 0 < int(known.sum()) <= upload_count(0.05, size)
    assert (values.abs() > tau - 1e-9).all()
    other = dssgd_release(model, x, y, settings, lr=LR, seed=4)
    other_known = torch.cat([m.flatten() for m in other.observed.known.values()])
    assert not torch.equal(known, other_known)  # chosen at random


def test_dp_fedavg_central_server_receives_the_clipped_update_without_noise() -> None:
    model = small_mlp()
    x, y = example(5, 2)
    s = 0.01
    release = dp_fedavg_client_release(
        model, x, y, lr=LR, clipping_norm=s, noise_multiplier=1.0
    )
    expected = clipped(-LR * gradient(model, x, y).double(), s)
    assert torch.allclose(flat(release.observed.grads), expected, atol=1e-7)
    assert release.clipping_norm == pytest.approx(s / LR)


def test_dp_fedavg_noise_shares_and_model_release() -> None:
    model = small_mlp()
    x, y = example(6, 0)
    s, z, n = 0.01, 2.0, 16
    base = clipped(-LR * gradient(model, x, y).double(), s)
    share = dp_fedavg_client_release(
        model,
        x,
        y,
        lr=LR,
        clipping_norm=s,
        noise_multiplier=z,
        placement="distributed",
        round_clients=n,
    )
    residual = (flat(share.observed.grads) - base).numpy()
    assert residual.std() == pytest.approx(z * s / math.sqrt(n), rel=0.05)
    for placement in ("central", "distributed"):
        release = dp_fedavg_model_release(
            model,
            x,
            y,
            lr=LR,
            clipping_norm=s,
            noise_multiplier=z,
            placement=placement,
        )
        residual = (flat(release.observed.grads) - base).numpy()
        assert residual.std() == pytest.approx(z * s, rel=0.05)


def round_of(model: nn.Module, labels: list[int], seed: int = 0) -> SecAggRound:
    batches = [example(10 + k, label) for k, label in enumerate(labels)]
    return secagg_round(model, batches, lr=LR, seed=seed)


def test_secagg_sum_is_exactly_the_sum_of_the_inputs() -> None:
    model = small_mlp()
    run = round_of(model, [1, 2, 3])
    modulus = 2**run.algorithm.secagg.bits
    expected = sum(v.astype(object) for v in run.inputs.values()) % modulus
    assert np.array_equal(run.result.total.astype(object), expected)
    assert sorted(run.masked) == [0, 1, 2] == list(run.result.included)
    # Decoded, it is the mean of the clients' updates up to quantisation.
    updates = [
        fedavg_release(model, *example(10 + k, lab), lr=LR)
        for k, lab in enumerate([1, 2, 3])
    ]
    mean = sum(flat(u.observed.grads) for u in updates) / 3
    got = flat(run.sum_release().observed.grads)
    assert torch.allclose(got, mean, atol=run.algorithm.encoder.step * 3)


def test_secagg_masked_input_is_what_the_server_received() -> None:
    model = small_mlp()
    run = round_of(model, [4, 5])
    for k, vector in run.masked.items():
        release = run.masked_release(k)
        assert release.payload == run.messages[Step.MASKED_INPUT][k]
        assert vector.tobytes() in release.payload  # the vector travels verbatim


def test_secagg_masked_inputs_are_uniform_and_independent_of_the_input() -> None:
    model = small_mlp()
    bits = 32
    one = round_of(model, [7, 7, 7], seed=0)
    # The same round with the victim's example replaced by another one.
    two = secagg_round(
        model,
        [example(99, 2), example(11, 7), example(12, 7)],
        lr=LR,
        seed=0,
    )
    a = one.masked[0].astype(np.float64) / 2**bits
    b = two.masked[0].astype(np.float64) / 2**bits
    # Uniform on [0, 1): 16 equal bins, chi-square.
    for u in (a, b):
        counts = np.histogram(u, bins=16, range=(0, 1))[0]
        assert stats.chisquare(counts).pvalue > 1e-3
    # Independent of the input: the two victims' views are alike, and neither
    # correlates with the victim's own (unmasked) input.
    assert stats.ks_2samp(a, b).pvalue > 1e-3
    x = one.inputs[0].astype(np.float64)
    assert abs(np.corrcoef(a, x)[0, 1]) < 5 / math.sqrt(len(a))
    # The unmasked inputs differ, of course.
    assert not np.array_equal(one.inputs[0], two.inputs[0])


def test_inverting_a_masked_input_gives_nothing() -> None:
    model = small_mlp()
    x, y = example(10, 6)
    run = round_of(model, [6, 1, 2])
    release = run.masked_release(0)
    rec = invert_gradients(
        model,
        release.observed,
        input_shape=(1, 8, 8),
        config=release.attack(match="cosine", iterations=10, input_bounds=(0, 1)),
    )
    assert psnr(rec.x, x).item() < 15
    plain = fedavg_release(model, x, y, lr=LR)
    rec = invert_gradients(
        model,
        plain.observed,
        input_shape=(1, 8, 8),
        config=plain.attack(match="cosine", iterations=10, input_bounds=(0, 1)),
    )
    assert label_accuracy(rec.labels, y) == 1.0 and psnr(rec.x, x).item() > 30


def test_bad_batches_are_refused() -> None:
    model = small_mlp()
    x, y = example(0, 0)
    with pytest.raises(VeilError, match="same number"):
        fedavg_release(model, x, y[:0], lr=LR)
    with pytest.raises(VeilError, match="at least 2 clients"):
        secagg_round(model, [(x, y)], lr=LR)
    with pytest.raises(VeilError, match="no buffers"):
        fedavg_release(nn.Sequential(nn.Flatten(), nn.BatchNorm1d(64)), x, y, lr=LR)
