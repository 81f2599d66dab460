"""Per-example gradients from torch.func equal those of a loop over single examples."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from veil.errors import PrivacyError
from veil.models import build_model, replace_batchnorm
from veil.privacy import per_example_gradients, trainable_parameters


def loop_gradients(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Reference: one ordinary backward pass per example."""
    params = trainable_parameters(model)
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in params}
    for i in range(len(x)):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for n, p in params.items():
            assert p.grad is not None
            rows[n].append(p.grad.detach().clone())
    return {n: torch.stack(r) for n, r in rows.items()}


class Tied(nn.Module):
    """Two layers share one weight matrix: its gradient is the sum of both uses."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(6, 6)
        self.second = nn.Linear(6, 6)
        self.second.weight = self.first.weight
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.second(torch.tanh(self.first(x)))))


def conv_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.GroupNorm(1, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 5 * 5, 4),
    )


def frozen_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    model[0].weight.requires_grad_(False)
    return model


CASES = {
    "linear": (lambda: nn.Linear(5, 3), (5,), 3),
    "conv": (conv_model, (2, 5, 5), 4),
    "tied": (Tied, (6,), 3),
    "frozen": (frozen_model, (5,), 3),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_per_example_gradients_match_a_loop(case: str) -> None:
    make, shape, classes = CASES[case]
    torch.manual_seed(1)
    model = make()
    x = torch.randn(7, *shape)
    y = torch.randint(0, classes, (7,))

    grads, losses = per_example_gradients(model, x, y)
    expected = loop_gradients(model, x, y)

    assert grads.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-4, atol=1e-6)
    single = [F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]) for i in range(7)]
    torch.testing.assert_close(losses, torch.stack(single).detach())


def test_tied_weight_appears_once_and_sums_both_uses() -> None:
    torch.manual_seed(2)
    model = Tied()
    x, y = torch.randn(3, 6), torch.randint(0, 3, (3,))
    grads, _ = per_example_gradients(model, x, y)
    assert "first.weight" in grads and "second.weight" not in grads
    # Untie: the tied gradient must be the sum of the two separate ones.
    untied = Tied()
    untied.load_state_dict(model.state_dict())
    untied.second.weight = nn.Parameter(model.first.weight.detach().clone())
    separate, _ = per_example_gradients(untied, x, y)
    torch.testing.assert_close(
        grads["first.weight"], separate["first.weight"] + separate["second.weight"]
    )


def test_frozen_parameter_gets_no_gradient() -> None:
    model = frozen_model()
    grads, _ = per_example_gradients(model, torch.randn(4, 5), torch.zeros(4).long())
    assert "0.weight" not in grads
    assert set(grads) == {"0.bias", "2.weight", "2.bias"}


def test_batchnorm_is_refused_with_name_and_fix() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten())
    with pytest.raises(PrivacyError, match=r"'1'.*BatchNorm2d.*GroupNorm"):
        per_example_gradients(model, torch.randn(2, 1, 5, 5), torch.zeros(2).long())


def test_replace_batchnorm_makes_the_model_usable() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.Flatten(), nn.Linear(6 * 9, 10)
    )
    model[1].weight.data.fill_(2.0)
    replace_batchnorm(model, num_groups=4)
    assert isinstance(model[1], nn.GroupNorm)
    assert model[1].num_groups == 2  # gcd(4, 6)
    assert bool((model[1].weight == 2.0).all())
    x, y = torch.randn(3, 1, 5, 5), torch.randint(0, 10, (3,))
    grads, _ = per_example_gradients(model, x, y)
    expected = loop_gradients(model, x, y)
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["tanh-cnn", "2nn"])
def test_bundled_models_have_per_example_gradients(name: str) -> None:
    torch.manual_seed(4)
    model = build_model(name)
    x, y = torch.randn(3, 1, 28, 28), torch.randint(0, 10, (3,))
    grads, _ = per_example_gradients(model, x, y)
    expected = loop_gradients(model, x, y)
    for key in expected:
        torch.testing.assert_close(grads[key], expected[key], rtol=1e-4, atol=1e-6)
