"""The ghost engine gives the functional engine's clipped sums, and knows its limits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from veil.errors import PrivacyError
from veil.models import build_model
from veil.privacy import GeneratorNoise, ghost, noisy_gradient
from veil.privacy.ghost import clipped_sum, supports, unsupported_reason


class Sequence(nn.Module):
    """A Linear layer applied to every position of a (B, T, d) input."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(5, 6)
        self.head = nn.Linear(6 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.proj(x)).flatten(1))


def strided_conv() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1, dilation=1),
        nn.Tanh(),
        nn.Conv2d(4, 3, 2, dilation=2, bias=False),
        nn.Flatten(),
        nn.Linear(3 * 1 * 1, 4),
    )
    model[4].bias.requires_grad_(False)
    return model


def frozen_weight() -> nn.Module:
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    model[0].weight.requires_grad_(False)
    return model


class Twice(nn.Module):
    """One Linear layer applied twice in a forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(torch.tanh(self.layer(x)))


def tied() -> nn.Module:
    """Two Linear layers sharing one weight, each with its own bias; the second
    layer's bias frozen."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    model[2].weight = model[0].weight
    model[2].bias.requires_grad_(False)
    return model


class TiedConv(nn.Module):
    """One Conv2d applied at two strides, then a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.head = nn.Linear(3 * 6 * 6 + 3 * 3 * 3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fine = torch.tanh(self.conv(x))
        coarse = self.conv(x[:, :, ::2, ::2])
        return self.head(torch.cat([fine.flatten(1), coarse.flatten(1)], 1))


class Gram(nn.Module):
    """A Linear layer over 2 positions of 16 features: the Gram-matrix path."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.proj(x)).flatten(1))


class NoGradBranch(nn.Module):
    """A layer called once with gradients and once under torch.no_grad, with a
    keyword argument."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            fixed = self.layer(x)
        return self.layer(input=torch.tanh(x)) * fixed


def conv1d() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(3, 4, 3, padding=2, dilation=2),
        nn.ReLU(),
        nn.Conv1d(4, 2, 2, stride=2),
        nn.Flatten(),
        nn.Linear(2 * 4, 3),
    )


def conv3d() -> nn.Module:
    return nn.Sequential(
        nn.Conv3d(1, 2, (2, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
        nn.Flatten(),
        nn.Linear(2 * 2 * 3 * 3, 3),
    )


CASES = {
    "frozen-weight": (frozen_weight, (5,), 3),
    "conv1d": (conv1d, (3, 9), 3),
    "conv3d": (conv3d, (1, 3, 5, 5), 3),
    "gram": (Gram, (2, 16), 3),
    "no-grad-branch": (NoGradBranch, (4,), 4),
    "tied": (tied, (4,), 4),
    "tied-conv": (TiedConv, (2, 6, 6), 4),
    "twice": (Twice, (4,), 4),
    "tanh-cnn": (lambda: build_model("tanh-cnn"), (1, 28, 28), 10),
    "2nn": (lambda: build_model("2nn"), (1, 28, 28), 10),
    "sequence": (Sequence, (4, 5), 3),
    "strided-conv": (strided_conv, (2, 6, 6), 4),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("clipping_norm", [0.05, 1e3])
def test_ghost_equals_functional(case: str, clipping_norm: float) -> None:
    make, shape, classes = CASES[case]
    torch.manual_seed(0)
    model = make()
    assert supports(model)
    x, y = torch.randn(9, *shape), torch.randint(0, classes, (9,))
    results = {
        engine: noisy_gradient(
            model,
            x,
            y,
            clipping_norm=clipping_norm,
            noise_multiplier=0.5,
            expected_batch_size=8.0,
            noise=GeneratorNoise(torch.Generator().manual_seed(1)),
            max_physical_batch=4,
            engine=engine,
        )
        for engine in ("ghost", "functional")
    }
    ghost, functional = results["ghost"], results["functional"]
    assert ghost.grads.keys() == functional.grads.keys()
    for name, g in functional.grads.items():
        torch.testing.assert_close(ghost.grads[name], g, rtol=1e-4, atol=1e-6)
    assert ghost.clipped == functional.clipped
    assert ghost.clipped == (9 if clipping_norm < 1 else 0)
    assert ghost.loss_sum == pytest.approx(functional.loss_sum, rel=1e-5)


def test_clip_sees_the_true_per_example_norms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ghost, "_CHUNK_ELEMENTS", 2000)  # several chunks per layer
    torch.manual_seed(2)
    model = build_model("tanh-cnn")
    x, y = torch.randn(5, 1, 28, 28), torch.randint(0, 10, (5,))
    seen = []
    clipped_sum(model, x, y, lambda n: seen.append(n) or torch.ones_like(n))
    for i in range(5):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        norm = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters()))
        assert float(seen[0][i]) == pytest.approx(float(norm), rel=1e-4)


class OutsideUse(nn.Module):
    """Uses its layer's weight a second time outside the layer's own call."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x) + x @ self.layer.weight


def test_unsupported_models_are_named_and_auto_falls_back() -> None:
    norm = nn.Sequential(nn.Linear(4, 4), nn.GroupNorm(2, 4))
    grouped = nn.Sequential(nn.Conv1d(2, 2, 1, groups=2), nn.Flatten())
    assert "GroupNorm" in (unsupported_reason(norm) or "")
    assert "groups" in (unsupported_reason(grouped) or "")
    x, y = torch.randn(3, 4), torch.randint(0, 4, (3,))
    with pytest.raises(PrivacyError, match="engine='functional'"):
        clipped_sum(norm, x, y, torch.ones_like)
    with pytest.raises(PrivacyError, match="outside its layer's forward call"):
        clipped_sum(OutsideUse(), x, y, torch.ones_like)
    in_place = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 4))
    with pytest.raises(PrivacyError, match="modified in place"):
        clipped_sum(in_place, x, y, torch.ones_like)
    args = {
        "clipping_norm": 0.1,
        "noise_multiplier": 0.0,
        "expected_batch_size": 3.0,
        "noise": GeneratorNoise(torch.Generator()),
    }
    for model in (norm, OutsideUse(), in_place):
        auto = noisy_gradient(model, x, y, **args)
        functional = noisy_gradient(model, x, y, engine="functional", **args)
        assert auto.grads.keys() == functional.grads.keys()
        for name, g in functional.grads.items():
            torch.testing.assert_close(auto.grads[name], g)


@pytest.mark.parametrize("case", ["2nn", "sequence", "tied-conv", "twice"])
def test_out_buffers_receive_the_clipped_sum(case: str) -> None:
    # Adding into given buffers (the DP-SGD step passes its noise there) gives the
    # buffers' values plus the sums computed into new tensors.
    make, shape, classes = CASES[case]
    torch.manual_seed(3)
    model = make()
    x, y = torch.randn(6, *shape), torch.randint(0, classes, (6,))

    def clip(norms: torch.Tensor) -> torch.Tensor:
        return (0.2 / norms).clamp(max=1.0)

    fresh, norms, loss = clipped_sum(model, x, y, clip)
    start = {n: torch.randn_like(g) for n, g in fresh.items()}
    out = {n: t.clone() for n, t in start.items()}
    buffers = {n: t.data_ptr() for n, t in out.items()}
    clipper = ghost.GhostClipper(model)
    added, norms_out, loss_out = clipper.clipped_sum(x, y, clip, out=out)
    assert added is out
    for name, g in fresh.items():
        assert out[name].data_ptr() == buffers[name]  # added in place
        torch.testing.assert_close(out[name], start[name] + g, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norms_out, norms)
    assert float(loss_out) == pytest.approx(float(loss))
